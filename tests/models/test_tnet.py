"""T-Net shape/layout and the unbiased multi-bandwidth RBF MMD."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pkdot.errors import ConfigError, StageError
from pkdot.models import TNet, build_tnets, mmd_rbf


def _gaussian(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_tnet_layout_and_shape():
    tnet = TNet(512, [256, 128, 256])
    linears = [m for m in tnet.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (512, 256),
        (256, 128),
        (128, 256),
        (256, 512),
    ]
    assert sum(isinstance(m, nn.ReLU) for m in tnet.layers) == 3
    out = tnet(torch.randn(4, 512))
    assert out.shape == (4, 512)
    assert (out < 0).any()  # linear output: hallucinated features can be negative
    with pytest.raises(ConfigError):
        TNet(16, [8, 0])


def test_build_tnets_one_per_privileged_modality(tiny_config):
    cfg = tiny_config(
        {
            "data.dataset": "table",
            "data.student_modalities": ["face"],
            "data.privileged_modalities": ["eda", "ecg"],
        }
    )
    tnets = build_tnets(cfg, seed=0)
    assert sorted(tnets) == ["ecg", "eda"]
    assert all(t.dim == 16 and t.hidden == [8, 4, 8] for t in tnets.values())
    again = build_tnets(cfg, seed=0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(tnets["eda"](x), again["eda"](x))
    assert not torch.allclose(tnets["eda"](x), tnets["ecg"](x))


def test_mmd_same_distribution_is_near_zero():
    x = _gaussian(600, 4, seed=0)
    assert abs(float(mmd_rbf(x, x))) < 0.02  # the same sample twice
    same = float(mmd_rbf(x, _gaussian(600, 4, seed=1)))  # two draws of one distribution
    different = float(mmd_rbf(x, _gaussian(600, 4, seed=1) + 1.0))
    assert abs(same) < 0.02
    assert different > 10 * max(abs(same), 1e-3)


@pytest.mark.parametrize("bandwidths", [None, (0.5, 2.0, 8.0)], ids=["median", "fixed"])
def test_mmd_decreases_as_gaussians_get_closer(bandwidths):
    x, y = _gaussian(300, 3, seed=2), _gaussian(300, 3, seed=3)
    values = [float(mmd_rbf(x, y + shift, bandwidths)) for shift in (2.0, 1.0, 0.5, 0.25, 0.0)]
    assert all(v > 0 for v in values[:-1])
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values


def test_mmd_is_differentiable_and_descent_reduces_it():
    target = _gaussian(64, 3, seed=4).float()
    source = (_gaussian(64, 3, seed=5).float() + 2.0).requires_grad_(True)
    before = mmd_rbf(source, target)
    before.backward()
    assert source.grad is not None and torch.isfinite(source.grad).all() and source.grad.abs().sum() > 0
    optimizer = torch.optim.SGD([source], lr=20.0)
    for _ in range(30):
        optimizer.zero_grad()
        loss = mmd_rbf(source, target)
        loss.backward()
        optimizer.step()
    assert float(mmd_rbf(source.detach(), target)) < 0.5 * float(before.detach())


def test_mmd_is_symmetric_and_permutation_invariant():
    x, y = _gaussian(40, 3, seed=6), _gaussian(30, 3, seed=7) + 0.5
    value = mmd_rbf(x, y)
    torch.testing.assert_close(mmd_rbf(y, x), value)
    torch.testing.assert_close(mmd_rbf(x[torch.randperm(40)], y[torch.randperm(30)]), value)


def test_mmd_errors():
    with pytest.raises(StageError, match="at least 2"):
        mmd_rbf(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(StageError, match="same d"):
        mmd_rbf(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(StageError, match="positive"):
        mmd_rbf(torch.randn(4, 3), torch.randn(4, 3), bandwidths=[1.0, 0.0])
