"""Gated cross-attention fusion of per-modality token sequences (the PKDOT teacher's and student's fusion).

Reference: Aslam et al., "Distilling Privileged Multimodal Information for Expression Recognition using Optimal
Transport", IEEE FG 2024 (arXiv 2401.15489)."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from pkdot.errors import ConfigError, StageError


def sinusoidal_positions(
    num_tokens: int, dim: int, *, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Position codes ``(num_tokens, dim)``: ``P[n, 2i] = sin(n / 10000^(2i / dim))``, ``P[n, 2i + 1]`` the cos."""
    position = torch.arange(num_tokens, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(num_tokens, dim, device=device, dtype=torch.float32)
    codes[:, 0::2] = torch.sin(position * freq)
    codes[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return codes.to(dtype)


def module_dict(modules: dict[str, nn.Module]) -> nn.ModuleDict:
    """``nn.ModuleDict`` keyed by modality, with a clear error for names a ModuleDict cannot hold."""
    out = nn.ModuleDict()
    for name, module in modules.items():
        try:
            out[name] = module
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"modality name {name!r} cannot name a model part (it must be a non-empty string without '.' "
                f"and not an nn.ModuleDict attribute): {exc}"
            ) from exc
    return out


class GatedCrossAttentionFusion(nn.Module):
    """Fuse ``{modality: tokens (B, N_m, D)}`` in ``modalities`` order into ``z (B, D)`` and gates ``(B, M)``.

    1. ``H_m = Encoder_m(X_m + P_{N_m})``: a ``layers``-deep transformer encoder over each sample's tokens, with
       sinusoidal positions ``P`` (the authors' code attended across the batch; here a sample's output never
       depends on the other samples of its batch).
    2. ``A_m = LayerNorm(H_m + MHA(query=H_m, key=value=[H_o for o != m]))``; ``c_m = mean_n A_m`` ``(B, D)``.
    3. Gate. ``M = 2``: ``g = sigmoid(W [c_1; c_2] + b)``, ``z = g * c_1 + (1 - g) * c_2``. ``M > 2``:
       ``G = softmax_m(reshape(W [c_1; ..; c_M] + b, (M, D)))``, ``z = sum_m G_m * c_m``. ``M = 1``: ``z = c_1``.

    ``gates``: each modality's gate weights averaged over the ``D`` features (rows sum to 1)."""

    def __init__(
        self, modalities: list[str], dim: int, heads: int, layers: int = 1, dropout: float = 0.1
    ) -> None:
        super().__init__()
        modalities = list(modalities)
        if len(set(modalities)) != len(modalities):
            raise ConfigError(f"fusion: modalities must be distinct, got {modalities}")
        if dim % heads:
            raise ConfigError(f"model.embed_dim ({dim}) must be divisible by model.fusion_heads ({heads})")
        self.modalities, self.dim = modalities, dim
        new_layer = partial(nn.TransformerEncoderLayer, dim, heads, 2 * dim, dropout, batch_first=True)
        self.encoders = module_dict(
            {m: nn.TransformerEncoder(new_layer(), layers, enable_nested_tensor=False) for m in modalities}
        )
        num = len(modalities)
        crossed = modalities if num > 1 else []
        self.cross_attention = module_dict(
            {m: nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True) for m in crossed}
        )
        self.cross_norm = module_dict({m: nn.LayerNorm(dim) for m in crossed})
        self.cross_dropout = nn.Dropout(dropout)
        self.gate = nn.Linear(num * dim, dim if num == 2 else num * dim) if num > 1 else None

    def _check(self, tokens: dict[str, Tensor]) -> None:
        if missing := [m for m in self.modalities if m not in tokens]:
            raise StageError(f"fusion: tokens for modalities {missing} are missing (got {sorted(tokens)})")
        for m in self.modalities:
            t = tokens[m]
            if t.dim() != 3 or t.shape[-1] != self.dim:
                raise StageError(f"fusion: tokens of {m!r} must be (B, N, {self.dim}), got {tuple(t.shape)}")
        if torch.compiler.is_compiling():
            return  # symbolic batch sizes under torch.export: comparing them would specialise the batch
        sizes = {m: int(tokens[m].shape[0]) for m in self.modalities}
        if len(set(sizes.values())) > 1:
            raise StageError(f"fusion: batch sizes differ across modalities: {sizes}")
        if empty := [m for m in self.modalities if tokens[m].shape[1] == 0]:
            raise StageError(f"fusion: modalities {empty} have no tokens (N = 0)")

    def forward(self, tokens: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``{modality: (B, N_m, D)}`` (extra entries ignored) -> ``z (B, D)``, ``gates (B, M)``."""
        self._check(tokens)
        encoded: list[Tensor] = []
        for m in self.modalities:
            t = tokens[m]
            t = t + sinusoidal_positions(t.shape[1], self.dim, device=t.device, dtype=t.dtype)
            encoded.append(self.encoders[m](t))
        num = len(self.modalities)
        if num == 1:
            z = encoded[0].mean(dim=1)
            return z, z.new_ones(z.shape[0], 1)
        pooled: list[Tensor] = []
        for i, m in enumerate(self.modalities):
            others = torch.cat([e for j, e in enumerate(encoded) if j != i], dim=1)
            attended, _ = self.cross_attention[m](encoded[i], others, others, need_weights=False)
            pooled.append(self.cross_norm[m](encoded[i] + self.cross_dropout(attended)).mean(dim=1))
        assert self.gate is not None
        if num == 2:
            g = torch.sigmoid(self.gate(torch.cat(pooled, dim=-1)))  # (B, D)
            z = g * pooled[0] + (1.0 - g) * pooled[1]
            return z, torch.stack([g.mean(dim=-1), (1.0 - g).mean(dim=-1)], dim=1)
        stacked = torch.stack(pooled, dim=1)  # (B, M, D)
        weights = torch.softmax(self.gate(stacked.flatten(1)).view(-1, num, self.dim), dim=1)
        return (weights * stacked).sum(dim=1), weights.mean(dim=-1)
