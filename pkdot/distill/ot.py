r"""Entropic optimal transport between point clouds: a log-domain Sinkhorn solver with epsilon-scaling.

This module solves, for two discrete measures :math:`\alpha = \sum_i a_i \delta_{x_i}` and
:math:`\beta = \sum_j b_j \delta_{y_j}` (points :math:`x \in \mathbb{R}^{N \times D}`,
:math:`y \in \mathbb{R}^{M \times D}`),

.. math::
    \mathrm{OT}_\varepsilon(\alpha, \beta) = \min_{\pi \ge 0,\ \pi 1 = a,\ \pi^T 1 = b}
        \langle \pi, C \rangle + \varepsilon\, \mathrm{KL}(\pi \,\|\, a \otimes b),
    \qquad C_{ij} = \tfrac{1}{2} \|x_i - y_j\|^2,

through its dual potentials :math:`(f, g)`, and returns the debiased Sinkhorn divergence

.. math::
    S_\varepsilon(\alpha, \beta) = \mathrm{OT}_\varepsilon(\alpha, \beta)
        - \tfrac{1}{2} \mathrm{OT}_\varepsilon(\alpha, \alpha) - \tfrac{1}{2} \mathrm{OT}_\varepsilon(\beta, \beta)
        = \langle a, f_{ba} - f_{aa} \rangle + \langle b, g_{ab} - g_{bb} \rangle,

which is non-negative, zero iff :math:`\alpha = \beta`, and a smooth function of the points.
The temperature is :math:`\varepsilon = \text{blur}^p` (``p = 2``: blur 0.1 gives eps 0.01).

The algorithm is GeomLoss's symmetric Sinkhorn loop (Feydy 2020, Algorithm 3.5) on dense tensors:
epsilon-scaling (the temperature starts at :math:`\text{diameter}^p` and is divided by
:math:`\text{scaling}^p` per iteration down to :math:`\text{blur}^p`, :func:`epsilon_schedule`), log-domain
soft-min updates (max-shifted log-sum-exp, in place on one buffer; exponents below -80 are clamped, which
changes nothing at float64 precision but avoids CPU ``exp``'s 10-20x slower underflow path), the four
problems of the debiased divergence solved as one batched ``(4, N, N)`` tensor when :math:`N = M`, and
gradients by the envelope theorem: the loop runs without autograd and only a last soft-min step is
differentiated, which gives :math:`\nabla_{x_i} \mathrm{OT}_\varepsilon = \sum_j \pi_{ij} (x_i - y_j)`.
It reproduces ``geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling)`` to float rounding.

Why our own solver: at our sizes it takes 0.46-0.66x GeomLoss's time (B = 64..256, k = 30, forward +
backward on a 2-core CPU, ``benchmarks/bench_ot.py``, ``benchmarks/results/speed.md``) and ~1/250 of POT's
log-domain Sinkhorn, which has no epsilon-scaling. GeomLoss is a development dependency only:
``tests/distill/test_ot.py`` pins our values and gradients to it.

References
----------
.. [1] J. Feydy, T. Séjourné, F.-X. Vialard, S. Amari, A. Trouvé, G. Peyré. "Interpolating between Optimal
   Transport and MMD using Sinkhorn Divergences." AISTATS 2019.
.. [2] J. Feydy. "Geometric data analysis, beyond convolutions." PhD thesis, Université Paris-Saclay, 2020,
   Section 3.3 (Algorithm 3.5, Eqs. 3.186, 3.209, 3.226).
.. [3] B. Schmitzer. "Stabilized sparse scaling algorithms for entropy regularized transport problems."
   SIAM J. Sci. Comput. 2019 (log-domain stabilisation, epsilon-scaling).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from pkdot.errors import ConfigError, StageError

logger = logging.getLogger(__name__)

__all__ = [
    "cloud_diameter",
    "epsilon_schedule",
    "float32_math",
    "sinkhorn_divergence",
    "sinkhorn_potentials",
    "squared_euclidean_cost",
    "transport_plan",
]


F = TypeVar("F", bound=Callable[..., Any])


def float32_math(fn: F) -> F:
    """Run ``fn`` outside autocast with its float16/bfloat16 tensor arguments cast to float32 (float64 kept).

    Under mixed precision (``train.precision``) the cosine matrices and the Sinkhorn iterations stay in float32:
    exponents of -C/eps with eps = 0.01 are far beyond half precision's 8 (bf16) or 11 (fp16) mantissa bits.
    """

    def up(v: Any) -> Any:
        return v.float() if isinstance(v, Tensor) and v.dtype in (torch.float16, torch.bfloat16) else v

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        device = next((v.device.type for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})

    return wrapped  # type: ignore[return-value]


def squared_euclidean_cost(x: Tensor, y: Tensor) -> Tensor:
    r"""Halved squared Euclidean cost :math:`C_{ij} = \tfrac{1}{2}\|x_i - y_j\|^2`.

    Parameters
    ----------
    x : Tensor, shape (..., N, D)
    y : Tensor, shape (..., M, D)

    Returns
    -------
    Tensor, shape (..., N, M)
        Computed as :math:`(\|x_i\|^2 - 2 x_i \cdot y_j + \|y_j\|^2) / 2` (one matrix product).
    """
    x_sq = (x * x).sum(-1).unsqueeze(-1)
    y_sq = (y * y).sum(-1).unsqueeze(-2)
    return (x_sq - 2.0 * (x @ y.transpose(-1, -2)) + y_sq) / 2.0


def cloud_diameter(x: Tensor, y: Tensor) -> float:
    r"""Upper bound on :math:`\max_{i,j} \|x_i - y_j\|`: the diagonal of the joint bounding box.

    Parameters
    ----------
    x : Tensor, shape (N, D)
    y : Tensor, shape (M, D)

    Returns
    -------
    float
        :math:`\| \max(x \cup y) - \min(x \cup y) \|_2` with max/min taken per coordinate
        (GeomLoss's ``max_diameter``); the starting scale of the epsilon-scaling schedule.
    """
    both = torch.cat([x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1])], dim=0)
    return float((both.max(dim=0).values - both.min(dim=0).values).norm())


def epsilon_schedule(diameter: float, blur: float, scaling: float, p: int = 2) -> list[float]:
    r"""Temperatures of the epsilon-scaling (annealing) descent.

    .. math::
        \varepsilon_0 = \text{diameter}^p,\quad
        \varepsilon_t = \exp\big(p \log \text{diameter} + t\, p \log \text{scaling}\big)
        \ \text{while}\ > \text{blur}^p,\quad \varepsilon_{\text{last}} = \text{blur}^p.

    Parameters
    ----------
    diameter : float
        Upper bound on the distances between points (:func:`cloud_diameter`).
    blur : float
        Target blur; the final temperature is ``blur ** p``.
    scaling : float in (0, 1)
        Ratio between two successive blur values.
    p : int
        Exponent of the cost (2 for the squared Euclidean cost).

    Returns
    -------
    list of float
        The temperatures, one Sinkhorn iteration each (the same list as GeomLoss's ``epsilon_schedule``).
    """
    if not 0.0 < scaling < 1.0:
        raise ConfigError(f"distill.pkdot.scaling must be in (0, 1), got {scaling}")
    if blur <= 0.0:
        raise ConfigError(f"distill.pkdot.blur must be > 0, got {blur}")
    if diameter <= 0.0:  # all points coincide: no annealing needed (and log(0) is undefined)
        return [blur**p]
    start, stop, step = p * math.log(diameter), p * math.log(blur), p * math.log(scaling)
    n_steps = max(0, math.ceil((stop - start) / step))  # same count as numpy.arange(start, stop, step)
    schedule = [diameter**p] + [math.exp(start + i * step) for i in range(n_steps)]
    schedule.append(blur**p)
    return schedule


#: Exponents below this (relative to the row maximum) are clamped before ``exp``: their terms are
#: < e^-80 ~ 1.8e-35 of the largest one, far below float64 rounding, and CPU ``exp`` is 10-20x slower on
#: arguments that underflow (its vectorised path falls back to a slow one).
_LOG_FLOOR = -80.0


def _log_softmin_parts(eps: float, cost: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """In-place core of the soft-min: returns ``(exp(z - max z), max z)`` for ``z = h_j - C_ij / eps``.

    One (..., N, M) buffer is allocated and reused in place: on CPU, fresh large buffers per operation
    (page faults) cost more than the arithmetic.
    """
    z = torch.sub(h.unsqueeze(-2), cost, alpha=1.0 / eps)
    z_max = z.amax(dim=-1, keepdim=True)
    return z.sub_(z_max).clamp_(min=_LOG_FLOOR).exp_(), z_max.squeeze(-1)


def _softmin_nograd(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    r"""Soft-C-transform :math:`f_i = -\varepsilon \log \sum_j \exp(h_j - C_{ij}/\varepsilon)`, no autograd.

    ``cost`` has shape (..., N, M), ``h`` (..., M); returns (..., N).
    """
    weights, z_max = _log_softmin_parts(eps, cost, h)
    return weights.sum(dim=-1).log_().add_(z_max).mul_(-eps)


class _Softmin(torch.autograd.Function):
    r"""Differentiable soft-min; the backward uses the softmax weights
    :math:`P_{ij} = \exp(h_j - C_{ij}/\varepsilon - (h - C_i/\varepsilon)_{\mathrm{lse}})`:
    :math:`\partial f_i / \partial C_{ij} = P_{ij}`, :math:`\partial f_i / \partial h_j = -\varepsilon P_{ij}`."""

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
        grad_cost = weights * grad_f.unsqueeze(-1) if ctx.needs_input_grad[1] else None
        grad_h = None
        if ctx.needs_input_grad[2]:
            grad_h = (weights * grad_f.unsqueeze(-1)).sum(dim=-2).mul_(-ctx.eps)
        return None, grad_cost, grad_h


def _softmin(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    r"""Soft-C-transform :math:`f_i = -\varepsilon \log \sum_j \exp(h_j - C_{ij}/\varepsilon)`.

    ``cost`` has shape (..., N, M), ``h`` (..., M); returns (..., N). Differentiable in ``cost`` and ``h``
    when autograd is on; an in-place, allocation-light path otherwise.
    """
    if torch.is_grad_enabled() and (cost.requires_grad or h.requires_grad):
        return _Softmin.apply(eps, cost, h)
    return _softmin_nograd(eps, cost, h)


def _uniform_log_weights(n: int, like: Tensor) -> Tensor:
    return torch.full((n,), -math.log(n), dtype=like.dtype, device=like.device)


def _log_weights(w: Tensor | None, n: int, like: Tensor, name: str) -> Tensor:
    if w is None:
        return _uniform_log_weights(n, like)
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
def sinkhorn_potentials(
    x: Tensor,
    y: Tensor,
    *,
    a: Tensor | None = None,
    b: Tensor | None = None,
    blur: float = 0.1,
    scaling: float = 0.5,
    debias: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor, float]:
    r"""Dual potentials of the entropic OT problems between :math:`\alpha` and :math:`\beta`.

    Runs the epsilon-scaling loop without autograd, then one differentiable soft-min step per potential
    (envelope theorem: the returned potentials carry the gradient of the OT value with respect to
    ``x`` and ``y`` at convergence; second derivatives are not supported).

    Parameters
    ----------
    x : Tensor, shape (N, D)
        Support of the first measure.
    y : Tensor, shape (M, D)
        Support of the second measure.
    a, b : Tensor, shapes (N,) and (M,), optional
        Non-negative weights summing to 1 (default uniform ``1/N``, ``1/M``).
    blur : float
        Final blur; :math:`\varepsilon = \text{blur}^2`.
    scaling : float in (0, 1)
        Epsilon-scaling ratio.
    debias : bool
        Also solve the symmetric problems :math:`a \to a` and :math:`b \to b`.

    Returns
    -------
    f_aa : Tensor (N,) or None
        Potential of :math:`\mathrm{OT}_\varepsilon(\alpha, \alpha)` (None without ``debias``).
    g_bb : Tensor (M,) or None
        Potential of :math:`\mathrm{OT}_\varepsilon(\beta, \beta)` (None without ``debias``).
    g_ab : Tensor (M,)
        Potential on :math:`y` of :math:`\mathrm{OT}_\varepsilon(\alpha, \beta)`.
    f_ba : Tensor (N,)
        Potential on :math:`x` of :math:`\mathrm{OT}_\varepsilon(\alpha, \beta)`.
    eps : float
        The final temperature :math:`\text{blur}^2`.
    """
    _check_clouds(x, y)
    n, m = x.shape[0], y.shape[0]
    a_log = _log_weights(a, n, x, "a")
    b_log = _log_weights(b, m, x, "b")
    eps_list = epsilon_schedule(cloud_diameter(x, y), blur, scaling, p=2)
    eps_final = eps_list[-1]
    # Cost matrices: the right-hand points are detached, so that each matrix carries the gradient with
    # respect to its *row* points only (the C_yx matrix carries y's gradient), as in GeomLoss.
    if debias and n == m:
        return (*_potentials_stacked(x, y, a_log, b_log, eps_list), eps_final)
    c_xy = squared_euclidean_cost(x, y.detach())
    c_yx = squared_euclidean_cost(y, x.detach())
    c_xx = squared_euclidean_cost(x, x.detach()) if debias else None
    c_yy = squared_euclidean_cost(y, y.detach()) if debias else None
    with torch.no_grad():
        eps = eps_list[0]
        g_ab = _softmin(eps, c_yx, a_log)
        f_ba = _softmin(eps, c_xy, b_log)
        f_aa = _softmin(eps, c_xx, a_log) if c_xx is not None else None
        g_bb = _softmin(eps, c_yy, b_log) if c_yy is not None else None
        for eps in eps_list:
            ft_ba = _softmin(eps, c_xy, b_log + g_ab / eps)
            gt_ab = _softmin(eps, c_yx, a_log + f_ba / eps)
            f_ba, g_ab = 0.5 * (f_ba + ft_ba), 0.5 * (g_ab + gt_ab)
            if c_xx is not None and c_yy is not None and f_aa is not None and g_bb is not None:
                ft_aa = _softmin(eps, c_xx, a_log + f_aa / eps)
                gt_bb = _softmin(eps, c_yy, b_log + g_bb / eps)
                f_aa, g_bb = 0.5 * (f_aa + ft_aa), 0.5 * (g_bb + gt_bb)
    eps = eps_final
    f_ba_out = _softmin(eps, c_xy, b_log + g_ab / eps)
    g_ab_out = _softmin(eps, c_yx, a_log + f_ba / eps)
    f_aa_out = _softmin(eps, c_xx, a_log + f_aa / eps) if c_xx is not None and f_aa is not None else None
    g_bb_out = _softmin(eps, c_yy, b_log + g_bb / eps) if c_yy is not None and g_bb is not None else None
    return f_aa_out, g_bb_out, g_ab_out, f_ba_out, eps_final


def _potentials_stacked(
    x: Tensor, y: Tensor, a_log: Tensor, b_log: Tensor, eps_list: list[float]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four debiased problems at once, for clouds of equal size N: one (4, N, N) logsumexp per step.

    Problem order (rows -> columns): 0: x -> y (f_ba), 1: y -> x (g_ab), 2: x -> x (f_aa), 3: y -> y (g_bb).
    The potential of each problem on its *columns* is that of problem ``partner[i]``.
    """
    rows = torch.stack([x, y, x, y])
    cols = torch.stack([y, x, x, y]).detach()
    cost = squared_euclidean_cost(rows, cols)  # (4, N, N), differentiable in the row points only
    col_log_w = torch.stack([b_log, a_log, a_log, b_log])  # (4, N)
    partner = [1, 0, 2, 3]
    with torch.no_grad():
        cost_nograd = cost.detach()
        pot = _softmin(eps_list[0], cost_nograd, col_log_w)
        for eps in eps_list:
            pot = 0.5 * (pot + _softmin(eps, cost_nograd, col_log_w + pot[partner] / eps))
    eps = eps_list[-1]
    pot = _softmin(eps, cost, col_log_w + pot[partner] / eps)
    return pot[2], pot[3], pot[1], pot[0]


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
    r"""Debiased Sinkhorn divergence :math:`S_\varepsilon(\alpha, \beta)` between two point clouds.

    .. math::
        S_\varepsilon(\alpha, \beta) = \mathrm{OT}_\varepsilon(\alpha, \beta)
            - \tfrac{1}{2}\mathrm{OT}_\varepsilon(\alpha, \alpha) - \tfrac{1}{2}\mathrm{OT}_\varepsilon(\beta, \beta),
        \quad C_{ij} = \tfrac{1}{2}\|x_i - y_j\|^2,\ \varepsilon = \text{blur}^2,

    computed as :math:`\langle a, f_{ba} - f_{aa} \rangle + \langle b, g_{ab} - g_{bb} \rangle`
    (``debias=False``: the raw :math:`\mathrm{OT}_\varepsilon(\alpha, \beta) = \langle a, f_{ba} \rangle +
    \langle b, g_{ab} \rangle`).

    Parameters
    ----------
    x : Tensor, shape (N, D)
    y : Tensor, shape (M, D)
    a, b : Tensor, shapes (N,) and (M,), optional
        Weights (default uniform).
    blur : float
        Final blur (:math:`\varepsilon = \text{blur}^2`).
    scaling : float in (0, 1)
        Epsilon-scaling ratio.
    debias : bool
        Debiased divergence (default) or raw entropic OT cost.

    Returns
    -------
    Tensor, shape ()
        Differentiable with respect to ``x`` and ``y`` (envelope-theorem gradient).

    Notes
    -----
    Equal to ``geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=debias)(x, y)``
    up to float rounding.
    """
    f_aa, g_bb, g_ab, f_ba, _ = sinkhorn_potentials(x, y, a=a, b=b, blur=blur, scaling=scaling, debias=debias)
    a_w = torch.full_like(f_ba, 1.0 / f_ba.shape[0]) if a is None else a.to(f_ba)
    b_w = torch.full_like(g_ab, 1.0 / g_ab.shape[0]) if b is None else b.to(g_ab)
    if f_aa is not None and g_bb is not None:
        return (a_w * (f_ba - f_aa)).sum() + (b_w * (g_ab - g_bb)).sum()
    return (a_w * f_ba).sum() + (b_w * g_ab).sum()


@float32_math
def transport_plan(
    x: Tensor,
    y: Tensor,
    *,
    a: Tensor | None = None,
    b: Tensor | None = None,
    blur: float = 0.1,
    scaling: float = 0.5,
    tol: float = 1e-3,
    max_iter: int = 10000,
) -> Tensor:
    r"""Entropic transport plan between two point clouds (for plots and inspection).

    .. math::
        \pi_{ij} = a_i\, b_j \exp\big( (f_i + g_j - C_{ij}) / \varepsilon \big),
        \qquad C_{ij} = \tfrac{1}{2}\|x_i - y_j\|^2,\ \varepsilon = \text{blur}^2,

    with :math:`(f, g)` the potentials of :math:`\mathrm{OT}_\varepsilon(\alpha, \beta)`: the
    epsilon-scaling loop of :func:`sinkhorn_potentials` (few iterations: enough for the divergence's value
    and gradient), then alternate Sinkhorn updates at the final temperature until the marginals match,
    :math:`\max_i |(\pi 1)_i - a_i| \le \text{tol} \cdot \max_i a_i` (column marginals are exact after each
    update), or ``max_iter`` updates.

    Parameters
    ----------
    x : Tensor, shape (N, D)
    y : Tensor, shape (M, D)
    a, b : Tensor, shapes (N,) and (M,), optional
        Weights (default uniform).
    blur, scaling : float
        As in :func:`sinkhorn_divergence`.
    tol : float
        Relative tolerance on the row marginals.
    max_iter : int
        Cap on the extra Sinkhorn updates (a warning is logged if the tolerance is not reached).

    Returns
    -------
    Tensor, shape (N, M)
        The plan: non-negative, columns summing to ``b``, rows to ``a`` within ``tol``; no autograd.
    """
    with torch.no_grad():
        x, y = x.detach(), y.detach()
        _, _, g, f, eps = sinkhorn_potentials(x, y, a=a, b=b, blur=blur, scaling=scaling, debias=False)
        n, m = x.shape[0], y.shape[0]
        a_log = _log_weights(a, n, x, "a")
        b_log = _log_weights(b, m, x, "b")
        cost = squared_euclidean_cost(x, y)
        cost_t = cost.T.contiguous()
        a_max = float(a_log.exp().max())
        for it in range(max_iter + 1):
            g = _softmin(eps, cost_t, a_log + f / eps)  # columns now exact
            log_plan = a_log[:, None] + b_log[None, :] + (f[:, None] + g[None, :] - cost) / eps
            row_error = float((torch.logsumexp(log_plan, dim=1).exp() - a_log.exp()).abs().max())
            if row_error <= tol * a_max:
                logger.debug("transport_plan: marginals within tol after %d extra updates", it)
                break
            if it == max_iter:
                logger.warning(
                    "transport_plan: row marginals off by %.2e (tol %.1e) after %d updates",
                    row_error,
                    tol,
                    it,
                )
                break
            f = _softmin(eps, cost, b_log + g / eps)
        return torch.exp(log_plan)
