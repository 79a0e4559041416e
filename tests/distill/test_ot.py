"""The Sinkhorn solver of pkdot.distill.ot against GeomLoss, and its mathematical properties."""

from __future__ import annotations

import pytest
import torch
from geomloss import SamplesLoss
from geomloss._legacy.sinkhorn_divergence import epsilon_schedule as geomloss_epsilon_schedule

from pkdot.distill.ot import (
    cloud_diameter,
    epsilon_schedule,
    sinkhorn_divergence,
    squared_euclidean_cost,
)
from pkdot.distill.pkdot import pkdot_structure
from pkdot.errors import ConfigError, StageError


def _clouds(n: int, m: int, dim: int, seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dim, generator=gen, dtype=dtype)
    y = 1.5 * torch.rand(m, dim, generator=gen, dtype=dtype) + 0.1
    return x, y


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("batch_size", [16, 64, 128])
@pytest.mark.parametrize("dim", [5, 30])
def test_value_and_gradient_match_geomloss(batch_size: int, dim: int) -> None:
    x, y = _clouds(batch_size, batch_size, dim, seed=batch_size + dim)
    x.requires_grad_(True)
    y.requires_grad_(True)
    ours = sinkhorn_divergence(x, y, blur=0.1, scaling=0.5)
    ours_gx, ours_gy = torch.autograd.grad(ours, (x, y))
    reference = SamplesLoss("sinkhorn", p=2, blur=0.1, scaling=0.5)(x, y)
    ref_gx, ref_gy = torch.autograd.grad(reference, (x, y))
    assert ours.dtype == torch.float32
    assert abs(ours.item() - reference.item()) <= 1e-3 * abs(reference.item())
    assert _rel(ours_gx, ref_gx) < 1e-3
    assert _rel(ours_gy, ref_gy) < 1e-3


def test_unequal_sizes_weights_and_raw_ot_match_geomloss() -> None:
    x, y = _clouds(20, 13, 4, seed=3)
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(20, generator=gen) + 0.1
    b = torch.rand(13, generator=gen) + 0.1
    a, b = a / a.sum(), b / b.sum()
    for debias in (True, False):
        loss = SamplesLoss("sinkhorn", p=2, blur=0.1, scaling=0.5, debias=debias)
        assert sinkhorn_divergence(x, y, debias=debias) == pytest.approx(float(loss(x, y)), rel=1e-3)
        assert sinkhorn_divergence(x, y, a=a, b=b, debias=debias) == pytest.approx(
            float(loss(a, x, b, y)), rel=1e-3
        )


def test_matches_geomloss_on_cosine_structure_clouds() -> None:
    gen = torch.Generator().manual_seed(7)
    centres = torch.randn(4, 32, generator=gen)
    labels = torch.arange(128) % 4
    teacher_z = centres[labels] + 0.5 * torch.randn(128, 32, generator=gen)
    student_z = centres[labels] @ torch.randn(32, 16, generator=gen) + torch.randn(128, 16, generator=gen)
    for k in (5, 30):
        clouds = pkdot_structure(student_z, teacher_z, k=k, anchors="least")
        ours = sinkhorn_divergence(clouds.student_cloud, clouds.teacher_cloud)
        reference = SamplesLoss("sinkhorn", p=2, blur=0.1, scaling=0.5)(
            clouds.student_cloud, clouds.teacher_cloud
        )
        assert float(ours) == pytest.approx(float(reference), rel=1e-3)


def test_epsilon_schedule_is_geomloss_schedule() -> None:
    for diameter, blur, scaling in [(3.7, 0.1, 0.5), (10.9, 0.1, 0.5), (0.05, 0.1, 0.5), (2.0, 0.05, 0.8)]:
        ours = epsilon_schedule(diameter, blur, scaling, p=2)
        reference = geomloss_epsilon_schedule(2, diameter, blur, scaling)
        assert ours == pytest.approx([float(e) for e in reference], rel=1e-12)
        assert ours[-1] == pytest.approx(blur**2)
    assert epsilon_schedule(0.0, 0.1, 0.5) == [pytest.approx(0.01)]  # coincident points: no annealing


def test_gradient_is_the_derivative_of_the_value_float64() -> None:
    # The gradient comes from the envelope theorem, exact at convergence: anneal slowly (scaling 0.99,
    # ~56 iterations) to a large blur so that the loop converges, and compare with finite differences.
    x, y = _clouds(5, 4, 2, seed=11, dtype=torch.float64)
    x.requires_grad_(True)
    y.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda u, v: sinkhorn_divergence(u, v, blur=1.0, scaling=0.99), (x, y), eps=1e-6, atol=5e-5, rtol=1e-3
    )


def test_zero_on_identical_clouds_positive_otherwise_and_symmetric() -> None:
    x, y = _clouds(32, 32, 6, seed=5)
    assert abs(float(sinkhorn_divergence(x, x.clone()))) < 1e-5
    forward = float(sinkhorn_divergence(x, y))
    backward = float(sinkhorn_divergence(y, x))
    assert forward > 0.01
    assert forward == pytest.approx(backward, rel=1e-4)
    assert float(sinkhorn_divergence(x, x + 0.5)) > float(sinkhorn_divergence(x, x + 0.1)) > 0


def test_invariant_to_point_order() -> None:
    x, y = _clouds(24, 24, 5, seed=8)
    perm_x = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    perm_y = torch.randperm(24, generator=torch.Generator().manual_seed(2))
    assert float(sinkhorn_divergence(x[perm_x], y[perm_y])) == pytest.approx(
        float(sinkhorn_divergence(x, y)), rel=1e-4
    )


def test_cost_and_diameter() -> None:
    x, y = _clouds(6, 7, 3, seed=9, dtype=torch.float64)
    expected = 0.5 * torch.cdist(x, y) ** 2
    assert torch.allclose(squared_euclidean_cost(x, y), expected, atol=1e-12)
    both = torch.cat([x, y])
    assert cloud_diameter(x, y) >= float(torch.cdist(both, both).max()) - 1e-12


def test_bad_inputs_raise_pkdot_errors() -> None:
    x, y = _clouds(4, 4, 3, seed=0)
    with pytest.raises(StageError, match="dimension D"):
        sinkhorn_divergence(x, y[:, :2])
    with pytest.raises(StageError, match=r"\(N, D\)"):
        sinkhorn_divergence(x[0], y)
    with pytest.raises(StageError, match="NaN"):
        sinkhorn_divergence(x, torch.full_like(y, float("nan")))
    with pytest.raises(ConfigError, match="blur"):
        sinkhorn_divergence(x, y, blur=0.0)
    with pytest.raises(ConfigError, match="scaling"):
        sinkhorn_divergence(x, y, scaling=1.0)
    with pytest.raises(StageError, match="weights a"):
        sinkhorn_divergence(x, y, a=torch.ones(3) / 3)
