r"""Entropic optimal transport between point clouds: a log-domain Sinkhorn solver with epsilon-scaling.

GeomLoss's symmetric Sinkhorn loop (Feydy 2020, Algorithm 3.5) on dense tensors, gradients by the envelope
theorem (only a last soft-min step is differentiated). Why our own: at our sizes 0.46-0.66x GeomLoss's time
(B = 64..256, k = 30, ``benchmarks/bench_ot.py``) and ~1/250 of POT's log-domain Sinkhorn (no epsilon-scaling);
GeomLoss, a development dependency only, pins our values and gradients in ``tests/distill/test_ot.py``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from pkdot.errors import ConfigError, StageError

F = TypeVar("F", bound=Callable[..., Any])


def float32_math(fn: F) -> F:
    """Run ``fn`` outside autocast with float16/bfloat16 tensor arguments cast to float32 (float64 kept):
    exponents of -C/eps with eps = 0.01 are far beyond half precision's mantissa."""

    def up(v: Any) -> Any:
        return v.float() if isinstance(v, Tensor) and v.dtype in (torch.float16, torch.bfloat16) else v

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        device = next((v.device.type for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

    return wrapped  # type: ignore[return-value]


def squared_euclidean_cost(x: Tensor, y: Tensor) -> Tensor:
    r""":math:`C_{ij} = \tfrac{1}{2}\|x_i - y_j\|^2`: (..., N, D), (..., M, D) -> (..., N, M), by one matmul."""
    x_sq = (x * x).sum(-1).unsqueeze(-1)
    y_sq = (y * y).sum(-1).unsqueeze(-2)
    return (x_sq - 2.0 * (x @ y.transpose(-1, -2)) + y_sq) / 2.0


def cloud_diameter(x: Tensor, y: Tensor) -> float:
    """Upper bound on ``max ||x_i - y_j||``: the joint bounding box's diagonal (GeomLoss's ``max_diameter``)."""
    both = torch.cat([x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1])], dim=0)
    return float((both.max(dim=0).values - both.min(dim=0).values).norm())


def epsilon_schedule(diameter: float, blur: float, scaling: float, p: int = 2) -> list[float]:
    """Temperatures of the epsilon-scaling descent (GeomLoss's): diameter^p, then a geometric descent by
    scaling^p while above blur^p, then blur^p; one Sinkhorn iteration each."""
    if not 0.0 < scaling < 1.0:
        raise ConfigError(f"distill.pkdot.scaling must be in (0, 1), got {scaling}")
    if blur <= 0.0:
        raise ConfigError(f"distill.pkdot.blur must be > 0, got {blur}")
    if diameter <= 0.0:  # all points coincide: no annealing needed (and log(0) is undefined)
        return [blur**p]
    start, stop, step = p * math.log(diameter), p * math.log(blur), p * math.log(scaling)
    n_steps = max(0, math.ceil((stop - start) / step))  # same count as numpy.arange(start, stop, step)
    return [diameter**p] + [math.exp(start + i * step) for i in range(n_steps)] + [blur**p]


#: Exponents below this (relative to the row maximum) are clamped before ``exp``: such terms are below float64
#: rounding, and CPU ``exp`` is 10-20x slower on arguments that underflow.
_LOG_FLOOR = -80.0


def _log_softmin_parts(eps: float, cost: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """``(exp(z - max z), max z)`` for ``z = h_j - C_ij / eps``, in one reused (..., N, M) buffer (on CPU, fresh
    buffers cost more than the arithmetic)."""
    z = torch.sub(h.unsqueeze(-2), cost, alpha=1.0 / eps)
    z_max = z.amax(dim=-1, keepdim=True)
    return z.sub_(z_max).clamp_(min=_LOG_FLOOR).exp_(), z_max.squeeze(-1)


class _Softmin(torch.autograd.Function):
    r"""Differentiable soft-min; with the softmax weights :math:`P_{ij}` over j,
    :math:`\partial f_i / \partial C_{ij} = P_{ij}` and :math:`\partial f_i / \partial h_j = -\varepsilon P_{ij}`."""

    @staticmethod
    def forward(ctx, eps: float, cost: Tensor, h: Tensor) -> Tensor:  # type: ignore[override]
        weights, z_max = _log_softmin_parts(eps, cost, h)
        total = weights.sum(dim=-1)
        weights.div_(total.unsqueeze(-1))  # softmax over j
        ctx.eps = eps
        ctx.save_for_backward(weights)
        return total.log_().add_(z_max).mul_(-eps)

    @staticmethod
    def backward(ctx, grad_f: Tensor) -> tuple[None, Tensor | None, Tensor | None]:  # type: ignore[override]
        (weights,) = ctx.saved_tensors
        weighted = weights * grad_f.unsqueeze(-1)
        grad_h = weighted.sum(dim=-2).mul_(-ctx.eps) if ctx.needs_input_grad[2] else None
        return None, weighted if ctx.needs_input_grad[1] else None, grad_h


def _softmin(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    r"""Soft-C-transform :math:`f_i = -\varepsilon \log \sum_j \exp(h_j - C_{ij}/\varepsilon)`: (..., N, M),
    (..., M) -> (..., N); differentiable when autograd is on, in place otherwise."""
    if torch.is_grad_enabled() and (cost.requires_grad or h.requires_grad):
        return _Softmin.apply(eps, cost, h)
    weights, z_max = _log_softmin_parts(eps, cost, h)
    return weights.sum(dim=-1).log_().add_(z_max).mul_(-eps)


def _log_weights(w: Tensor | None, n: int, like: Tensor, name: str) -> Tensor:
    if w is None:
        return torch.full((n,), -math.log(n), dtype=like.dtype, device=like.device)
    if w.shape != (n,):
        raise StageError(f"OT weights {name} must have shape ({n},), got {tuple(w.shape)}")
    log_w = w.to(like).log()
    return torch.where(w > 0, log_w, torch.full_like(log_w, -100000.0))


def _check_clouds(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise StageError(
            f"OT point clouds must be (N, D) and (M, D) tensors, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.shape[1] != y.shape[1]:
        raise StageError(f"OT point clouds must share their dimension D, got {x.shape[1]} and {y.shape[1]}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise StageError("OT point clouds must have at least one point each")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise StageError("OT point clouds contain NaN or infinite values")


@float32_math
def sinkhorn_divergence(
    x: Tensor,
    y: Tensor,
    *,
    a: Tensor | None = None,
    b: Tensor | None = None,
    blur: float = 0.1,
    scaling: float = 0.5,
    debias: bool = True,
) -> Tensor:
    r"""Debiased Sinkhorn divergence :math:`S_\varepsilon(\alpha, \beta)` between x (N, D) and y (M, D).

    .. math::
        S_\varepsilon(\alpha, \beta) = \langle a, f_{ba} - f_{aa} \rangle + \langle b, g_{ab} - g_{bb} \rangle,
        \quad C_{ij} = \tfrac{1}{2}\|x_i - y_j\|^2,\ \varepsilon = \text{blur}^2

    with :math:`\mathrm{OT}_\varepsilon(\alpha, \beta) = \min_{\pi 1 = a, \pi^T 1 = b} \langle \pi, C \rangle
    + \varepsilon \mathrm{KL}(\pi \| a \otimes b)` (``debias=False``: the raw :math:`\mathrm{OT}_\varepsilon`).
    Weights ``a`` (N,), ``b`` (M,) default to uniform. A scalar, differentiable in ``x`` and ``y``, equal to
    ``geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=debias)(x, y)`` up to rounding.

    References: Feydy et al., "Interpolating between Optimal Transport and MMD using Sinkhorn Divergences",
    AISTATS 2019; Feydy, PhD thesis, 2020, Section 3.3; Schmitzer, SIAM J. Sci. Comput. 2019."""
    _check_clouds(x, y)
    a_log = _log_weights(a, x.shape[0], x, "a")
    b_log = _log_weights(b, y.shape[0], x, "b")
    eps_list = epsilon_schedule(cloud_diameter(x, y), blur, scaling, p=2)
    # Each cost matrix carries the gradient with respect to its *row* points only (its columns are
    # detached), as in GeomLoss. Problems (rows -> columns): x -> y (f_ba), y -> x (g_ab), x -> x (f_aa),
    # y -> y (g_bb); the potential of problem i on its columns is that of problem ``partner[i]``.
    n, partner = (4 if debias else 2), [1, 0, 2, 3]
    rows, cols, col_log_ws = [x, y, x, y][:n], [y, x, x, y][:n], [b_log, a_log, a_log, b_log][:n]
    stacked = debias and x.shape[0] == y.shape[0]  # one (4, N, N) logsumexp per step
    if stacked:
        rows, cols, col_log_ws = [torch.stack(rows)], [torch.stack(cols)], [torch.stack(col_log_ws)]
    costs = [squared_euclidean_cost(r, c.detach()) for r, c in zip(rows, cols, strict=True)]

    def step(eps: float, pots: list[Tensor]) -> list[Tensor]:
        partners = [pots[0][partner]] if stacked else [pots[j] for j in partner[:n]]
        return [_softmin(eps, c, w + h / eps) for c, w, h in zip(costs, col_log_ws, partners, strict=True)]

    with torch.no_grad():
        pots = [_softmin(eps_list[0], c, w) for c, w in zip(costs, col_log_ws, strict=True)]
        for eps in eps_list:
            pots = [0.5 * (p + q) for p, q in zip(pots, step(eps, pots), strict=True)]
    pots = step(eps_list[-1], pots)
    f_ba, g_ab, *self_pots = pots[0].unbind() if stacked else pots
    a_w = torch.full_like(f_ba, 1.0 / f_ba.shape[0]) if a is None else a.to(f_ba)
    b_w = torch.full_like(g_ab, 1.0 / g_ab.shape[0]) if b is None else b.to(g_ab)
    if debias:
        return (a_w * (f_ba - self_pots[0])).sum() + (b_w * (g_ab - self_pots[1])).sum()
    return (a_w * f_ba).sum() + (b_w * g_ab).sum()
