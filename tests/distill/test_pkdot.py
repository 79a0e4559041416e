"""PKDOT: anchored cosine structures and the Sinkhorn divergence between them."""

from __future__ import annotations

import pytest
import torch
from geomloss import SamplesLoss

from pkdot.config import PkdotOptions
from pkdot.distill import build_loss, pkdot_loss, pkdot_structure
from pkdot.distill.pkdot import cosine_similarity_matrix
from pkdot.errors import ConfigError, StageError
from pkdot.evaluate.plots import transport_plan_pot


def _embeddings(batch_size: int = 32, student_dim: int = 16, teacher_dim: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, student_dim, generator=gen), torch.randn(
        batch_size, teacher_dim, generator=gen
    )


def test_structure_shapes_shift_and_anchors() -> None:
    student_z, teacher_z = _embeddings()
    clouds = pkdot_structure(student_z, teacher_z, k=5, anchors="least")
    assert clouds.student_sim.shape == clouds.teacher_sim.shape == (32, 32)
    assert clouds.anchor_index.shape == clouds.student_cloud.shape == clouds.teacher_cloud.shape == (32, 5)
    for sim in (clouds.student_sim, clouds.teacher_sim):
        assert float(sim.min()) == pytest.approx(0.0, abs=1e-6)  # shifted non-negative
    raw_teacher = cosine_similarity_matrix(teacher_z)
    assert torch.allclose(clouds.teacher_sim, raw_teacher - raw_teacher.min())
    # "least": each row's anchors are its k smallest teacher similarities (ascending).
    smallest = torch.sort(raw_teacher, dim=1).values[:, :5]
    assert torch.allclose(raw_teacher.gather(1, clouds.anchor_index), smallest)
    # The same columns are gathered from both matrices.
    assert torch.equal(clouds.student_cloud, clouds.student_sim.gather(1, clouds.anchor_index))
    most = pkdot_structure(student_z, teacher_z, k=5, anchors="most")
    largest = torch.sort(raw_teacher, dim=1, descending=True).values[:, :5]
    assert torch.allclose(raw_teacher.gather(1, most.anchor_index), largest)
    assert torch.equal(most.anchor_index[:, 0], torch.arange(32))  # self-similarity 1 is the largest


@pytest.mark.parametrize("k", ["all", 32, 100])
def test_all_columns(k) -> None:
    student_z, teacher_z = _embeddings()
    clouds = pkdot_structure(student_z, teacher_z, k=k)
    assert clouds.student_cloud.shape == (32, 32)
    assert torch.equal(clouds.student_cloud, clouds.student_sim)


def test_loss_is_geomloss_on_the_clouds() -> None:
    student_z, teacher_z = _embeddings(batch_size=64)
    clouds = pkdot_structure(student_z, teacher_z, k=30)
    reference = SamplesLoss("sinkhorn", p=2, blur=0.1, scaling=0.5)(
        clouds.teacher_cloud, clouds.student_cloud
    )
    assert pkdot_loss(student_z, teacher_z, k=30).item() == pytest.approx(reference.item(), rel=1e-3)


def test_gradient_matches_geomloss_through_the_structure() -> None:
    student_z, teacher_z = _embeddings(batch_size=48)
    ours_z = student_z.clone().requires_grad_(True)
    pkdot_loss(ours_z, teacher_z, k=10).backward()
    ref_z = student_z.clone().requires_grad_(True)
    clouds = pkdot_structure(ref_z, teacher_z, k=10)
    SamplesLoss("sinkhorn", p=2, blur=0.1, scaling=0.5)(clouds.student_cloud, clouds.teacher_cloud).backward()
    assert ours_z.grad is not None and ours_z.grad.abs().max() > 0
    assert torch.allclose(ours_z.grad, ref_z.grad, rtol=1e-3, atol=1e-3 * float(ref_z.grad.abs().max()))


@pytest.mark.parametrize("anchors", ["least", "most"])
@pytest.mark.parametrize("k", [5, "all"])
def test_zero_for_the_same_cosine_structure(anchors: str, k, random_orthogonal) -> None:
    _, teacher_z = _embeddings(batch_size=40)
    rotated = teacher_z @ random_orthogonal(24, seed=1)
    # A wider student with the same structure: rotate, then pad with zero coordinates.
    wider = torch.cat([rotated, torch.zeros(40, 8)], dim=1)
    for student_z in (teacher_z.clone(), rotated, 3.0 * wider):
        assert abs(pkdot_loss(student_z, teacher_z, k=k, anchors=anchors).item()) < 1e-4
    unrelated, _ = _embeddings(batch_size=40, seed=5)
    assert pkdot_loss(unrelated, teacher_z, k=k, anchors=anchors).item() > 1e-2


def test_invariant_to_a_joint_permutation_of_the_batch() -> None:
    student_z, teacher_z = _embeddings(batch_size=64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    for k in (5, 30, "all"):
        base = pkdot_loss(student_z, teacher_z, k=k).item()
        assert pkdot_loss(student_z[perm], teacher_z[perm], k=k).item() == pytest.approx(base, rel=1e-4)


def test_gradient_reaches_the_student_only_and_descends() -> None:
    student_z, teacher_z = _embeddings(batch_size=32)
    teacher_z.requires_grad_(True)
    student = student_z.clone().requires_grad_(True)
    optimiser = torch.optim.SGD([student], lr=1.0)
    losses = []
    for _ in range(15):
        optimiser.zero_grad()
        loss = pkdot_loss(student, teacher_z, k=10)
        loss.backward()
        losses.append(loss.item())
        optimiser.step()
    assert teacher_z.grad is None
    assert losses[-1] < 0.5 * losses[0]


def test_registered_class_uses_its_options() -> None:
    student_z, teacher_z = _embeddings(batch_size=24)
    options = PkdotOptions(k=7, anchors="most", blur=0.2, scaling=0.6)
    loss = build_loss(
        "pkdot",
        student_dim=16,
        teacher_dim=24,
        num_outputs=2,
        regression=False,
        num_samples=24,
        options=options,
    )
    from pkdot.distill import DistillBatch

    batch = DistillBatch(student_z, teacher_z, torch.zeros(24, 2), torch.zeros(24, 2))
    expected = pkdot_loss(student_z, teacher_z, k=7, anchors="most", blur=0.2, scaling=0.6)
    assert loss(batch).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(batch).item() != pytest.approx(pkdot_loss(student_z, teacher_z, k=30).item(), rel=1e-3)


def test_structure_plan_is_diagonal_for_identical_structures() -> None:
    gen = torch.Generator().manual_seed(2)
    teacher_z = torch.randn(12, 8, generator=gen)
    clouds = pkdot_structure(teacher_z, teacher_z, k="all")
    plan = torch.from_numpy(
        transport_plan_pot(clouds.student_cloud.numpy(), clouds.teacher_cloud.numpy(), blur=0.1)
    )
    assert plan.shape == (12, 12)
    assert float(plan.sum()) == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(plan.argmax(dim=1), torch.arange(12))


def test_bad_inputs() -> None:
    student_z, teacher_z = _embeddings()
    with pytest.raises(StageError, match="rows"):
        pkdot_loss(student_z, teacher_z[:-1])
    with pytest.raises(StageError, match=r"\(B, D\)"):
        pkdot_loss(student_z[0], teacher_z)
    with pytest.raises(StageError, match="at least 2"):
        pkdot_loss(student_z[:1], teacher_z[:1])
    with pytest.raises(ConfigError, match="anchors"):
        pkdot_loss(student_z, teacher_z, anchors="random")
    with pytest.raises(ConfigError, match="distill.pkdot.k"):
        pkdot_loss(student_z, teacher_z, k=0)
