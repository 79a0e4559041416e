"""The distillation-loss base class, the batch it reads, the registry and the total loss.

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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pkdot.config import DistillConfig
from pkdot.errors import ConfigError, StageError

logger = logging.getLogger(__name__)

__all__ = ["DistillBatch", "DistillLoss", "available_losses", "build_loss", "register", "total_loss"]

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

    Subclasses implement :meth:`compute`; :meth:`forward` validates the batch and detaches the teacher.
    """

    name: ClassVar[str] = ""
    option_names: ClassVar[tuple[str, ...]] = ()

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

    def compute(self, batch: DistillBatch) -> Tensor:
        """The loss on a validated batch whose teacher tensors are detached; a scalar tensor."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute(batch)")

    def forward(self, batch: DistillBatch) -> Tensor:
        """Validate ``batch`` (shapes, sizes), detach the teacher's tensors and return ``compute(batch)``.

        Returns
        -------
        Tensor, shape ()
            The distillation loss (to be weighted by :func:`total_loss`).
        """
        self._check_batch(batch)
        frozen = replace(
            batch, teacher_z=batch.teacher_z.detach(), teacher_logits=batch.teacher_logits.detach()
        )
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


def total_loss(task_loss: Tensor, distill_loss: Tensor, cfg: DistillConfig) -> dict[str, Tensor]:
    r"""The student's training objective and its parts, for logging each separately.

    .. math:: \mathcal{L} = w_\text{task}\, \mathcal{L}_\text{task} + w\, \mathcal{L}_\text{distill}

    Parameters
    ----------
    task_loss : Tensor, shape ()
        Cross-entropy (classification) or the regression loss.
    distill_loss : Tensor, shape ()
        The output of a :class:`DistillLoss`.
    cfg : DistillConfig
        Supplies ``task_weight`` and ``weight``.

    Returns
    -------
    dict
        ``{"loss": total, "loss_task": task_loss, "loss_distill": distill_loss}``.
    """
    if task_loss.dim() != 0 or distill_loss.dim() != 0:
        raise StageError(
            f"total_loss expects scalar losses, got task {tuple(task_loss.shape)}, distill {tuple(distill_loss.shape)}"
        )
    total = cfg.task_weight * task_loss + cfg.weight * distill_loss.to(task_loss)
    return {"loss": total, "loss_task": task_loss, "loss_distill": distill_loss}


def zero_loss(like: Tensor) -> Tensor:
    """A scalar zero on ``like``'s device and dtype (no gradient needed)."""
    return torch.zeros((), dtype=like.dtype, device=like.device)
