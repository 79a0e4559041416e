"""Gated cross-attention fusion: per-sample attention (never across the batch), gates, shapes, errors."""

from __future__ import annotations

import pytest
import torch

from pkdot.errors import ConfigError, StageError
from pkdot.models import GatedCrossAttentionFusion
from pkdot.models.fusion import sinusoidal_positions

DIM = 16
# token counts per modality differ on purpose
TOKENS = {"video": 5, "physio": 3, "audio": 1}
SETS = [["video"], ["video", "physio"], ["video", "physio", "audio"]]


def _tokens(modalities: list[str], batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, TOKENS[m], DIM, generator=g) for m in modalities}


def _fusion(modalities: list[str], layers: int = 1) -> GatedCrossAttentionFusion:
    torch.manual_seed(0)
    return GatedCrossAttentionFusion(modalities, DIM, heads=2, layers=layers, dropout=0.1).eval()


@pytest.mark.parametrize("modalities", SETS, ids=len)
def test_shapes_and_gates(modalities):
    fusion = _fusion(modalities)
    z, gates = fusion(_tokens(modalities, 4, seed=0))
    assert z.shape == (4, DIM)
    assert gates.shape == (4, len(modalities))
    assert (gates >= 0).all() and (gates <= 1).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(4))


@pytest.mark.parametrize("modalities", SETS, ids=len)
def test_sample_output_does_not_depend_on_the_rest_of_the_batch(modalities):
    fusion = _fusion(modalities, layers=2)
    batch = _tokens(modalities, 6, seed=0)
    z, gates = fusion(batch)
    changed = {m: t.clone() for m, t in batch.items()}
    replacement = _tokens(modalities, 5, seed=1)
    for m in modalities:
        changed[m][1:] = replacement[m]
    z2, gates2 = fusion(changed)
    torch.testing.assert_close(z2[0], z[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gates2[0], gates[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(z2[1:], z[1:])  # the other samples did change
    alone, _ = fusion({m: t[:1] for m, t in batch.items()})
    torch.testing.assert_close(alone[0], z[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("modalities", SETS[1:], ids=len)
def test_every_modality_reaches_the_fused_embedding(modalities):
    fusion = _fusion(modalities)
    tokens = {m: t.requires_grad_(True) for m, t in _tokens(modalities, 3, seed=0).items()}
    z, _ = fusion(tokens)
    z.pow(2).sum().backward()
    for m in modalities:
        assert tokens[m].grad is not None and tokens[m].grad.abs().sum() > 0, m
    assert all(p.grad is not None for n, p in fusion.named_parameters()), "unused fusion parameters"


def test_two_modality_gate_is_a_per_feature_convex_combination():
    fusion = _fusion(["video", "physio"])
    tokens = _tokens(["video", "physio"], 3, seed=0)

    def fused_with_gate_bias(bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            fusion.gate.weight.zero_()
            fusion.gate.bias.copy_(bias)
            return fusion(tokens)

    c_video, gates_video = fused_with_gate_bias(torch.full((DIM,), 50.0))  # g = 1: z = c_video
    c_physio, gates_physio = fused_with_gate_bias(torch.full((DIM,), -50.0))  # g = 0: z = c_physio
    torch.testing.assert_close(gates_video, torch.tensor([[1.0, 0.0]] * 3))
    torch.testing.assert_close(gates_physio, torch.tensor([[0.0, 1.0]] * 3))
    assert not torch.allclose(c_video, c_physio)
    g = torch.linspace(0.1, 0.9, DIM)
    z, gates = fused_with_gate_bias(torch.logit(g))
    torch.testing.assert_close(z, g * c_video + (1 - g) * c_physio, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gates[:, 0], torch.full((3,), float(g.mean())))


def test_three_modality_gate_softmax():
    fusion = _fusion(["video", "physio", "audio"])
    with torch.no_grad():
        fusion.gate.weight.zero_()
        fusion.gate.bias.copy_(torch.cat([torch.full((DIM,), 30.0), torch.zeros(2 * DIM)]))
    _, gates = fusion(_tokens(["video", "physio", "audio"], 2, seed=0))
    torch.testing.assert_close(gates, torch.tensor([[1.0, 0.0, 0.0]] * 2), atol=1e-6, rtol=0)


def test_errors():
    fusion = _fusion(["video", "physio"])
    with pytest.raises(StageError, match="missing"):
        fusion(_tokens(["video"], 2, seed=0))
    with pytest.raises(StageError, match=r"\(B, N, 16\)"):
        fusion({"video": torch.randn(2, 3, 8), "physio": torch.randn(2, 3, DIM)})
    with pytest.raises(StageError, match="batch sizes differ"):
        fusion({"video": torch.randn(2, 3, DIM), "physio": torch.randn(3, 3, DIM)})
    with pytest.raises(ConfigError, match="divisible"):
        GatedCrossAttentionFusion(["video"], 15, heads=2)
    with pytest.raises(ConfigError, match="distinct"):
        GatedCrossAttentionFusion(["video", "video"], DIM, heads=2)
    with pytest.raises(ConfigError, match="cannot name"):
        GatedCrossAttentionFusion(["video", "eda.phasic"], DIM, heads=2)


def test_sinusoidal_positions():
    codes = sinusoidal_positions(7, 6)
    assert codes.shape == (7, 6)
    torch.testing.assert_close(codes[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(codes[:, 0], torch.sin(torch.arange(7.0)))
    assert len({tuple(r.tolist()) for r in codes}) == 7  # distinct positions
    assert sinusoidal_positions(3, 5).shape == (3, 5)  # odd dimension
