r"""The distillation-loss base class, the batch it reads, the registry and the total loss.

Every method is a plain loss function (``similarity_preserving_loss(student_z, teacher_z)``) plus a thin
class registered under a name::

    @register("sp")
    class SimilarityPreserving(DistillLoss):
        def compute(self, batch: DistillBatch) -> Tensor:
            return similarity_preserving_loss(batch.student_z, batch.teacher_z)

Adding a method is one new module in ``pkdot/distill/`` with one decorator: the package imports every
module it contains, so the registry fills itself. ``DistillLoss.forward`` checks the batch's shapes against
the dimensions the loss was built for, detaches the teacher's tensors (the teacher is frozen: no gradient
ever reaches it) and calls ``compute``. Extra state (FitNet's adapter, CRD's embedding heads and memory
bank) are parameters/buffers of the module: the trainer puts ``loss.parameters()`` in its optimiser and
saves ``loss.state_dict()``.

Weights. Each class states its ``default_weight``, taken from its paper or reference code and cited in its
docstring; ``distill.weights`` (loss name -> weight) overrides it, and a name that is not a registered loss
raises :class:`ConfigError`. :func:`total_loss` returns the weighted terms separately
(``{"loss", "loss_task", "loss_<name>"}``) so the training loop logs each one.

Global batch under data parallelism. A loss whose value depends on the relations *between* samples of a
batch (``batch_structure = True``: PKDOT, SP, RKD, PKT, and CRD, whose NCE mean and memory update follow the
batch) would otherwise see only its worker's shard, so the number of Ray workers would change the loss.
When ``torch.distributed`` is initialised with world size W > 1, :meth:`DistillLoss.forward` gathers every
tensor of the batch from all workers (rank order) and computes the loss on the global batch. The gather is
differentiable: each worker's gradient with respect to its own rows is the *sum* over workers of
:math:`\partial \mathcal{L} / \partial z_\text{local}`, i.e. :math:`W\, \partial \mathcal{L} / \partial
z_\text{local}` (every worker back-propagates the same global loss), so DistributedDataParallel's *mean* of
the workers' parameter gradients is exactly the gradient of the global-batch loss. Per-sample losses (KD,
FitNet) need no gather: DDP's mean of the shard means is already the global mean.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pkdot.config import DistillConfig
from pkdot.errors import ConfigError, StageError

logger = logging.getLogger(__name__)

__all__ = [
    "DistillBatch",
    "DistillLoss",
    "available_losses",
    "build_loss",
    "check_weights",
    "default_weights",
    "gather_batch",
    "gather_rows",
    "loss_weight",
    "register",
    "total_loss",
    "world_size",
]

_REGISTRY: dict[str, type[DistillLoss]] = {}


@dataclass
class DistillBatch:
    """One training batch as the distillation losses see it.

    Attributes
    ----------
    student_z : Tensor, shape (B, Ds)
        Student embeddings (with gradient).
    teacher_z : Tensor, shape (B, Dt)
        Frozen teacher embeddings (no gradient reaches them).
    student_logits : Tensor, shape (B, C) or (B, 1)
        Student logits (classification) or outputs (regression).
    teacher_logits : Tensor, shape (B, C) or (B, 1)
        Teacher logits or outputs.
    labels : Tensor, shape (B,), optional
        Class indices (long) or regression targets (float).
    index : Tensor, shape (B,), optional
        Row index of each sample in the training set (long; CRD's memory bank).
    """

    student_z: Tensor
    teacher_z: Tensor
    student_logits: Tensor
    teacher_logits: Tensor
    labels: Tensor | None = None
    index: Tensor | None = None


class DistillLoss(nn.Module):
    """Base class of the registered distillation losses.

    Parameters
    ----------
    student_dim : int
        Ds, the width of ``DistillBatch.student_z``.
    teacher_dim : int
        Dt, the width of ``DistillBatch.teacher_z``.
    num_outputs : int
        C, the width of the logits (1 for regression).
    regression : bool
        Whether the task is regression (valence/arousal) rather than classification.
    num_samples : int
        Size of the training set (rows addressed by ``DistillBatch.index``).
    cfg : DistillConfig
        The run's distillation section (temperature, PKDOT's k/anchors/blur/scaling, ...).
    **options
        Per-loss options (``cfg.options[name]``); each subclass lists the names it accepts in
        ``option_names``; any other name raises :class:`ConfigError`.

    Subclasses implement :meth:`compute`; :meth:`forward` validates the batch, detaches the teacher and,
    for ``batch_structure`` losses under ``torch.distributed`` with more than one worker, gathers the
    global batch.

    Attributes
    ----------
    loss_weight : float
        This loss's weight in :func:`total_loss`: ``cfg.weights[name]``, else the class's ``default_weight``.
    """

    name: ClassVar[str] = ""
    option_names: ClassVar[tuple[str, ...]] = ()
    #: Weight of the loss in the student's objective when ``distill.weights`` does not name it (cite the
    #: paper or reference code it comes from in the subclass's docstring).
    default_weight: ClassVar[float] = 1.0
    #: True for losses computed from relations between the samples of a batch: gathered across workers.
    batch_structure: ClassVar[bool] = False

    def __init__(
        self,
        *,
        student_dim: int,
        teacher_dim: int,
        num_outputs: int,
        regression: bool,
        num_samples: int,
        cfg: DistillConfig,
        **options: Any,
    ) -> None:
        super().__init__()
        where = f"distill loss {self.name!r}"
        for field, value in (
            ("student_dim", student_dim),
            ("teacher_dim", teacher_dim),
            ("num_outputs", num_outputs),
            ("num_samples", num_samples),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {field} must be a positive int, got {value!r}")
        if not isinstance(cfg, DistillConfig):
            raise ConfigError(f"{where}: cfg must be a pkdot.config.DistillConfig, got {type(cfg).__name__}")
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            allowed = ", ".join(self.option_names) if self.option_names else "none"
            raise ConfigError(
                f"distill.options.{self.name}: unknown option(s) {unknown} (accepted: {allowed})"
            )
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.num_outputs = num_outputs
        self.regression = bool(regression)
        self.num_samples = num_samples
        self.cfg = cfg
        self.options: dict[str, Any] = dict(options)
        self.loss_weight = loss_weight(cfg, self.name)

    def compute(self, batch: DistillBatch) -> Tensor:
        """The loss on a validated batch whose teacher tensors are detached; a scalar tensor."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute(batch)")

    def forward(self, batch: DistillBatch) -> Tensor:
        """Validate ``batch`` (shapes, sizes), detach the teacher's tensors and return ``compute(batch)``.

        With ``batch_structure`` and an initialised process group of W > 1 workers, ``compute`` sees the
        global batch (:func:`gather_batch`): every worker returns the same value, the loss of the
        concatenation of all workers' batches in rank order.

        Returns
        -------
        Tensor, shape ()
            The distillation loss, unweighted (:func:`total_loss` applies ``loss_weight``).
        """
        self._check_batch(batch)
        frozen = replace(
            batch, teacher_z=batch.teacher_z.detach(), teacher_logits=batch.teacher_logits.detach()
        )
        if self.batch_structure and world_size() > 1:
            frozen = gather_batch(frozen)
        loss = self.compute(frozen)
        if loss.dim() != 0:
            raise StageError(
                f"distill loss {self.name!r} returned shape {tuple(loss.shape)}, expected a scalar"
            )
        return loss

    def _check_batch(self, batch: DistillBatch) -> None:
        where = f"distill loss {self.name!r}: DistillBatch"
        expected = {
            "student_z": (self.student_dim,),
            "teacher_z": (self.teacher_dim,),
            "student_logits": (self.num_outputs,),
            "teacher_logits": (self.num_outputs,),
        }
        size = batch.student_z.shape[0] if batch.student_z.dim() > 0 else -1
        for field, (width,) in expected.items():
            value = getattr(batch, field)
            if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[1] != width:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise StageError(f"{where}.{field} has shape {shape}, expected (B, {width})")
            if value.shape[0] != size:
                raise StageError(
                    f"{where}.{field} has {value.shape[0]} rows, expected B = {size} (student_z)"
                )
        if size < 2:
            raise StageError(f"{where} has B = {size} samples; distillation needs at least 2")
        for field in ("labels", "index"):
            value = getattr(batch, field)
            if value is not None and (value.dim() != 1 or value.shape[0] != size):
                raise StageError(f"{where}.{field} has shape {tuple(value.shape)}, expected ({size},)")


def register(name: str) -> Callable[[type[DistillLoss]], type[DistillLoss]]:
    """Class decorator: register a :class:`DistillLoss` subclass under ``name`` (sets ``cls.name``).

    Raises
    ------
    ConfigError
        If ``name`` is already taken by another class, or the class is not a DistillLoss.
    """

    def decorate(cls: type[DistillLoss]) -> type[DistillLoss]:
        if not (isinstance(cls, type) and issubclass(cls, DistillLoss)):
            raise ConfigError(f"register({name!r}): {cls!r} is not a DistillLoss subclass")
        existing = _REGISTRY.get(name)
        same_class = existing is not None and (existing.__module__, existing.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )  # a module imported twice (e.g. reloaded) re-registers its own class
        if existing is not None and not same_class:
            raise ConfigError(
                f"register({name!r}): name already used by {existing.__module__}.{existing.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        logger.debug("registered distillation loss %r -> %s", name, cls.__qualname__)
        return cls

    return decorate


def available_losses() -> list[str]:
    """Names of the registered distillation losses, sorted."""
    return sorted(_REGISTRY)


def build_loss(name: str, **kwargs: Any) -> DistillLoss:
    """Build the registered loss ``name``.

    ``kwargs`` are the :class:`DistillLoss` constructor's (``student_dim``, ``teacher_dim``,
    ``num_outputs``, ``regression``, ``num_samples``, ``cfg``) plus options; options found in
    ``cfg.options[name]`` are added, explicit keyword arguments winning.

    Raises
    ------
    ConfigError
        Unknown name (the message lists the available losses), or invalid dimensions/options.
    """
    if name not in _REGISTRY:
        raise ConfigError(
            f"distill.losses: unknown loss {name!r} (available: {', '.join(available_losses())})"
        )
    cfg = kwargs.get("cfg")
    if isinstance(cfg, DistillConfig):
        kwargs = {**cfg.options.get(name, {}), **kwargs}
    missing = [
        k
        for k in ("student_dim", "teacher_dim", "num_outputs", "regression", "num_samples", "cfg")
        if k not in kwargs
    ]
    if missing:
        raise ConfigError(f"build_loss({name!r}): missing argument(s) {missing}")
    return _REGISTRY[name](**kwargs)


def default_weights() -> dict[str, float]:
    """Registered loss name -> its ``default_weight`` (the paper's or reference code's), sorted by name."""
    return {name: float(_REGISTRY[name].default_weight) for name in available_losses()}


def check_weights(weights: dict[str, float]) -> None:
    """Check ``distill.weights``: every key a registered loss, every value a finite number >= 0.

    Raises
    ------
    ConfigError
        Naming the offending key ``distill.weights.<key>`` and what was expected.
    """
    for key, value in weights.items():
        if key not in _REGISTRY:
            raise ConfigError(
                f"distill.weights.{key}: unknown loss {key!r} (available: {', '.join(available_losses())})"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ConfigError(f"distill.weights.{key}: expected a finite number >= 0, got {value!r}")


def loss_weight(cfg: DistillConfig, name: str) -> float:
    """The weight of loss ``name``: ``cfg.weights[name]`` if set, else the class's ``default_weight``.

    Raises
    ------
    ConfigError
        Unknown ``name``, or an invalid entry of ``cfg.weights`` (see :func:`check_weights`).
    """
    check_weights(cfg.weights)
    if name not in _REGISTRY:
        raise ConfigError(
            f"distill loss {name!r} is not registered (available: {', '.join(available_losses())})"
        )
    return float(cfg.weights.get(name, _REGISTRY[name].default_weight))


def total_loss(task_loss: Tensor, distill_loss: Tensor, cfg: DistillConfig, name: str) -> dict[str, Tensor]:
    r"""The student's training objective and its weighted parts, for logging each separately.

    .. math:: \mathcal{L} = w_\text{task}\, \mathcal{L}_\text{task} + w_\text{name}\, \mathcal{L}_\text{name}

    Parameters
    ----------
    task_loss : Tensor, shape ()
        Cross-entropy (classification) or the regression loss.
    distill_loss : Tensor, shape ()
        The (unweighted) output of the :class:`DistillLoss` registered as ``name``.
    cfg : DistillConfig
        Supplies ``task_weight`` and ``weights`` (:func:`loss_weight`).
    name : str
        The registered name of the distillation loss.

    Returns
    -------
    dict
        ``{"loss": total, "loss_task": w_task * task_loss, "loss_<name>": w_name * distill_loss}``: the
        total and each weighted term.
    """
    if task_loss.dim() != 0 or distill_loss.dim() != 0:
        raise StageError(
            f"total_loss expects scalar losses, got task {tuple(task_loss.shape)}, distill {tuple(distill_loss.shape)}"
        )
    weighted_task = cfg.task_weight * task_loss
    weighted_distill = loss_weight(cfg, name) * distill_loss.to(task_loss)
    return {
        "loss": weighted_task + weighted_distill,
        "loss_task": weighted_task,
        f"loss_{name}": weighted_distill,
    }


def world_size() -> int:
    """Workers of the default ``torch.distributed`` process group (1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllGatherRows(torch.autograd.Function):
    """Concatenate equal-shaped (M, ...) tensors of all workers; backward: sum the gradients of all workers
    (every worker back-propagates its own loss through the whole gathered tensor) and keep this worker's
    rows."""

    @staticmethod
    def forward(ctx: Any, local: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        summed = grad.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B_r, ...) of every worker in rank order -> (sum_r B_r, ...); B_r may differ.

    Differentiable when ``x`` requires grad: the gradient reaching worker r's ``x`` is the sum over workers
    of the gradient each one back-propagates into rows r (see the module doc). Every worker must call it
    (it is a collective); with no process group, or W = 1, ``x`` is returned unchanged.
    """
    world = world_size()
    if world == 1:
        return x
    local_rows = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    all_rows = [torch.zeros_like(local_rows) for _ in range(world)]
    dist.all_gather(all_rows, local_rows)
    rows = [int(r.item()) for r in all_rows]
    most = max(rows)
    padded = x
    if x.shape[0] < most:  # all_gather needs equal shapes: pad, gather, cut the padding out
        padded = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))], dim=0)
    if padded.requires_grad:
        gathered = _AllGatherRows.apply(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        gathered = torch.cat(parts, dim=0)
    if all(r == most for r in rows):
        return gathered
    return torch.cat([gathered[i * most : i * most + r] for i, r in enumerate(rows)], dim=0)


def gather_batch(batch: DistillBatch) -> DistillBatch:
    """The global batch: every tensor of ``batch`` gathered from all workers (:func:`gather_rows`).

    ``labels``/``index`` are gathered when present (they are present or absent on every worker alike).
    """
    return DistillBatch(
        student_z=gather_rows(batch.student_z),
        teacher_z=gather_rows(batch.teacher_z),
        student_logits=gather_rows(batch.student_logits),
        teacher_logits=gather_rows(batch.teacher_logits),
        labels=None if batch.labels is None else gather_rows(batch.labels),
        index=None if batch.index is None else gather_rows(batch.index),
    )


def zero_loss(like: Tensor) -> Tensor:
    """A scalar zero on ``like``'s device and dtype (no gradient needed)."""
    return torch.zeros((), dtype=like.dtype, device=like.device)
