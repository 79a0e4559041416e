"""T-Net: hallucinate a privileged modality's embedding from the video embedding, and its MMD loss.

The T-Net, an MLP ``R^D -> R^D`` trained next to the teacher, maps the pooled video features ``v`` so that
``T(v)`` matches the distribution of the privileged features (:func:`mmd_rbf`); at test time the student fuses
``v`` with ``T(v)``. References: Gretton et al., JMLR 2012; Aslam et al., IEEE FG 2024."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pkdot.errors import ConfigError, StageError
from pkdot.models.heads import seeded

if TYPE_CHECKING:
    from pkdot.config import RunConfig


#: Multipliers of the median heuristic used when no bandwidths are given.
DEFAULT_BANDWIDTH_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


class TNet(nn.Module):
    """MLP ``dim -> hidden[0] -> ... -> hidden[-1] -> dim``, ReLU between layers (paper: D = 512, [256, 128, 256])."""

    def __init__(self, dim: int, hidden: list[int]) -> None:
        super().__init__()
        if dim < 1 or any(h < 1 for h in hidden):
            raise ConfigError(f"model.tnet_hidden: widths must be >= 1, got dim={dim}, hidden={list(hidden)}")
        self.dim, self.hidden = dim, list(hidden)
        layers = [m for cin, cout in pairwise([dim, *hidden, dim]) for m in (nn.Linear(cin, cout), nn.ReLU())]
        self.layers = nn.Sequential(*layers[:-1])

    def forward(self, video_embedding: Tensor) -> Tensor:
        return self.layers(video_embedding)


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: Sequence[float] | None = None) -> Tensor:
    r"""Unbiased squared maximum mean discrepancy with a sum of RBF kernels.

    .. math::

        \mathrm{MMD}^2_u = \frac{1}{n(n-1)} \sum_{i \ne j} k(x_i, x_j)
          + \frac{1}{m(m-1)} \sum_{i \ne j} k(y_i, y_j) - \frac{2}{nm} \sum_{i, j} k(x_i, y_j),
        \qquad k(a, b) = \sum_s \exp\left(-\|a - b\|^2 / h_s\right).

    ``x`` (n, d), ``y`` (m, d), n, m >= 2. ``bandwidths``: the ``h_s`` (> 0); default the median heuristic
    ``h_s = s * median`` (median squared distance between distinct points of ``[x; y]``, not differentiated;
    ``s`` in ``DEFAULT_BANDWIDTH_SCALES``). Unbiased, so slightly negative for equal distributions."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise StageError(
            f"mmd_rbf: expected x (n, d) and y (m, d) with the same d, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise StageError(
            f"mmd_rbf: the unbiased estimator needs at least 2 points per sample, got n={n}, m={m}"
        )
    z = torch.cat([x, y], dim=0)
    d2 = ((z * z).sum(1, keepdim=True) + (z * z).sum(1).unsqueeze(0) - 2.0 * z @ z.T).clamp_min(0.0)
    if bandwidths is None:
        off_diagonal = d2.detach()[~torch.eye(n + m, dtype=torch.bool, device=z.device)]
        median = off_diagonal.median().clamp_min(torch.finfo(d2.dtype).tiny)
        scales: list[Tensor | float] = [median * s for s in DEFAULT_BANDWIDTH_SCALES]
    elif len(bandwidths) == 0 or any(float(h) <= 0 for h in bandwidths):
        raise StageError(f"mmd_rbf: bandwidths must be positive numbers, got {list(bandwidths)}")
    else:
        scales = [float(h) for h in bandwidths]
    kernel = sum(torch.exp(-d2 / h) for h in scales)
    assert isinstance(kernel, Tensor)
    k_xx, k_yy, k_xy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    term_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    term_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return term_xx + term_yy - 2.0 * k_xy.mean()


def build_tnets(cfg: RunConfig, *, seed: int | None = None) -> dict[str, TNet]:
    """One fresh :class:`TNet` per privileged modality (``seed``: of the weights, global RNG restored)."""
    with seeded(seed):
        return {m: TNet(cfg.model.embed_dim, cfg.model.tnet_hidden) for m in cfg.data.privileged_modalities}
