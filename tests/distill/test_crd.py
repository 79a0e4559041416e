"""CRD: embedding heads, momentum memory banks updated by index, NCE with sampled negatives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from pkdot.config import CRDOptions
from pkdot.distill import DistillBatch, build_loss
from pkdot.distill.crd import nce_loss, sample_negatives
from pkdot.errors import ConfigError, StageError


def _crd(num_samples: int = 40, **options):
    return build_loss(
        "crd",
        student_dim=12,
        teacher_dim=20,
        num_outputs=3,
        regression=False,
        num_samples=num_samples,
        options=CRDOptions(**options),
    )


def test_defaults_and_state() -> None:
    loss = _crd(num_samples=40)
    assert (
        loss.n_negatives == 39 and loss.temperature == 0.07 and loss.momentum == 0.5 and loss.feat_dim == 128
    )
    assert _crd(num_samples=10_000).n_negatives == 4096
    state = loss.state_dict()
    assert state["memory_student"].shape == state["memory_teacher"].shape == (40, 128)
    assert {"embed_student.weight", "embed_teacher.weight"} <= {n for n, _ in loss.named_parameters()}
    assert torch.equal(_crd(seed=3).memory_student, _crd(seed=3).memory_student)
    assert not torch.equal(_crd(seed=3).memory_student, _crd(seed=4).memory_student)


def test_memory_rows_of_the_batch_move_and_the_others_do_not(make_batch) -> None:
    loss = _crd(num_samples=50, n_negatives=16)
    batch = make_batch(num_samples=50)
    before_s, before_t = loss.memory_student.clone(), loss.memory_teacher.clone()
    loss(batch)
    index = batch.index
    others = torch.ones(50, dtype=torch.bool)
    others[index] = False
    assert torch.equal(loss.memory_student[others], before_s[others])
    assert torch.equal(loss.memory_teacher[others], before_t[others])
    with torch.no_grad():
        v_s = F.normalize(loss.embed_student(batch.student_z), dim=1)
        expected = F.normalize(0.5 * before_s[index] + 0.5 * v_s, dim=1)
    assert torch.allclose(loss.memory_student[index], expected, atol=1e-6)
    assert torch.allclose(loss.memory_student[index].norm(dim=1), torch.ones(len(index)), atol=1e-5)
    # In eval mode the memory is read, not written.
    loss.eval()
    frozen = loss.memory_student.clone()
    loss(batch)
    assert torch.equal(loss.memory_student, frozen)


def test_negatives_exclude_the_positive_and_are_seeded() -> None:
    index = torch.tensor([0, 5, 9])
    rows = sample_negatives(index, 10, 200, torch.Generator().manual_seed(0))
    assert rows.shape == (3, 201)
    assert torch.equal(rows[:, 0], index)
    for i, positive in enumerate(index.tolist()):
        assert positive not in rows[i, 1:].tolist()
        assert set(rows[i, 1:].tolist()) == set(range(10)) - {positive}
    again = sample_negatives(index, 10, 200, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)


def test_nce_prefers_a_high_positive_score() -> None:
    good = torch.tensor([[10.0, 0.01, 0.01, 0.01]])
    bad = torch.tensor([[0.01, 10.0, 0.01, 0.01]])
    assert nce_loss(good, 100).item() < nce_loss(bad, 100).item()
    assert nce_loss(good, 100).item() > 0


def test_training_aligns_matched_pairs(make_batch) -> None:
    """Optimising the student (and the heads) on a fixed set lowers the loss: positives are recognised."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(32, 20, generator=gen)
    student = torch.randn(32, 12, generator=gen, requires_grad=True)
    loss = _crd(num_samples=32, n_negatives=16)
    optimiser = torch.optim.Adam([student, *loss.parameters()], lr=0.05)
    index = torch.arange(32)
    values = []
    for _ in range(60):
        optimiser.zero_grad()
        value = loss(DistillBatch(student, teacher, torch.zeros(32, 3), torch.zeros(32, 3), index=index))
        value.backward()
        optimiser.step()
        values.append(value.item())
    assert sum(values[-5:]) / 5 < 0.7 * sum(values[:5]) / 5


def test_gradient_reaches_student_and_heads_not_teacher(make_batch) -> None:
    loss = _crd(num_samples=50, n_negatives=8)
    batch = make_batch(num_samples=50)
    loss(batch).backward()
    assert batch.student_z.grad is not None and batch.teacher_z.grad is None
    assert loss.embed_student.weight.grad is not None and loss.embed_teacher.weight.grad is not None


def test_index_required_and_checked(make_batch) -> None:
    loss = _crd(num_samples=50)
    batch = make_batch(num_samples=50)
    batch.index = None
    with pytest.raises(StageError, match="index is required"):
        loss(batch)
    batch = make_batch(num_samples=50)
    batch.index = batch.index + 50
    with pytest.raises(StageError, match=r"\[0, 50\)"):
        loss(batch)
    with pytest.raises(ValidationError, match="n_negatives"):
        _crd(n_negatives=0)
    with pytest.raises(ConfigError, match="num_samples"):
        _crd(num_samples=1)


def test_same_seed_same_losses(make_batch) -> None:
    batch = make_batch(num_samples=50)
    values = []
    for _ in range(2):
        torch.manual_seed(123)  # the heads' nn.Linear initialisation
        loss = _crd(num_samples=50, n_negatives=8, seed=7)
        values.append([loss(batch).item() for _ in range(3)])
    assert values[0] == values[1]
