r"""The distillation-loss base class, the batch it reads, the registry and the total loss.

Global batch under data parallelism: a ``batch_structure`` loss (PKDOT, SP, RKD, PKT, CRD) gathers every
tensor of the batch from all W workers with the differentiable ``all_gather``, so a worker's rows receive
:math:`W\, \partial \mathcal{L} / \partial z_\text{local}` and DistributedDataParallel's *mean* of the
workers' gradients is the gradient of the global-batch loss. Per-sample losses (KD, FitNet) need no gather."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor, nn

from pkdot.config import LOSSES, DistillConfig, LossOptions, loss_names_problem, loss_terms
from pkdot.errors import ConfigError, StageError

_REGISTRY: dict[str, type[DistillLoss]] = {}


@dataclass
class DistillBatch:
    """One training batch: embeddings ``student_z`` (B, Ds) and ``teacher_z`` (B, Dt, frozen), logits or
    regression outputs (B, C) of each, class indices or targets ``labels`` (B,), and ``index`` (B,), each
    sample's row in the training set (CRD's memory bank)."""

    student_z: Tensor
    teacher_z: Tensor
    student_logits: Tensor
    teacher_logits: Tensor
    labels: Tensor | None = None
    index: Tensor | None = None


class DistillLoss(nn.Module):
    """Base class of the registered distillation losses; extra state (FitNet's adapter, CRD's memory) are its
    parameters/buffers, optimised and saved with the student.

    ``student_dim``, ``teacher_dim``: Ds and Dt; ``num_outputs``: C (1 for regression); ``num_samples``: rows
    of the training set (``DistillBatch.index``); ``options``: the loss's :class:`pkdot.config.LossOptions` fields
    (weight excepted), kept in ``self.options``. Subclasses implement ``compute``."""

    name: ClassVar[str] = ""
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
        **options: Any,
    ) -> None:
        super().__init__()
        names = ("student_dim", "teacher_dim", "num_outputs", "num_samples")
        for field, value in zip(names, (student_dim, teacher_dim, num_outputs, num_samples), strict=True):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"distill loss {self.name!r}: {field} must be a positive int, got {value!r}"
                )
        self.student_dim, self.teacher_dim, self.num_outputs = student_dim, teacher_dim, num_outputs
        self.regression, self.num_samples, self.options = bool(regression), num_samples, options

    def compute(self, batch: DistillBatch) -> Tensor:
        """The scalar loss of a validated batch whose teacher tensors are detached."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute(batch)")

    def forward(self, batch: DistillBatch) -> Tensor:
        """Validate ``batch``, detach the teacher's tensors and return ``compute(batch)`` (unweighted, shape ());
        with ``batch_structure`` and W > 1 workers, on the global batch (every tensor through :func:`gather_rows`)."""
        self._check_batch(batch)
        frozen = replace(
            batch, teacher_z=batch.teacher_z.detach(), teacher_logits=batch.teacher_logits.detach()
        )
        if self.batch_structure and world_size() > 1:
            present = {f.name: v for f in fields(frozen) if (v := getattr(frozen, f.name)) is not None}
            frozen = replace(frozen, **{name: gather_rows(v) for name, v in present.items()})
        loss = self.compute(frozen)
        if loss.dim() != 0:
            raise StageError(
                f"distill loss {self.name!r} returned shape {tuple(loss.shape)}, expected a scalar"
            )
        return loss

    def _check_batch(self, batch: DistillBatch) -> None:
        where = f"distill loss {self.name!r}: DistillBatch"
        size = batch.student_z.shape[0] if batch.student_z.dim() > 0 else -1
        names = ("student_z", "teacher_z", "student_logits", "teacher_logits")
        widths = (self.student_dim, self.teacher_dim, self.num_outputs, self.num_outputs)
        for field, width in zip(names, widths, strict=True):
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
    """Class decorator: register a :class:`DistillLoss` subclass as loss ``name`` (one of ``config.LOSSES``)."""

    def decorate(cls: type[DistillLoss]) -> type[DistillLoss]:
        if not (isinstance(cls, type) and issubclass(cls, DistillLoss)):
            raise ConfigError(f"register({name!r}): {cls!r} is not a DistillLoss subclass")
        if name not in LOSSES:
            raise ConfigError(
                f"register({name!r}): not a loss of pkdot.config.LOSSES ({', '.join(LOSSES)}); add its "
                "options section to pkdot.config.DistillConfig first"
            )
        if (existing := _REGISTRY.get(name, cls).__qualname__) != cls.__qualname__:
            raise ConfigError(f"register({name!r}): name already used by {existing}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


class CompositeLoss(nn.Module):
    """A sum of registered losses (``kd+pkdot``): ``forward`` returns each term, unweighted, by name;
    :func:`total_loss` weighs each with its own ``distill.<term>.weight``. The terms are submodules, so their
    parameters (FitNet's adapter, CRD's heads) are optimised and saved like a single loss's."""

    def __init__(self, name: str, terms: Mapping[str, DistillLoss]) -> None:
        super().__init__()
        self.name, self.terms = name, nn.ModuleDict(terms)

    def forward(self, batch: DistillBatch) -> dict[str, Tensor]:
        return {term: loss(batch) for term, loss in self.terms.items()}


def available_losses() -> list[str]:
    """Names of the registered distillation losses, sorted."""
    return sorted(_REGISTRY)


def build_loss(
    name: str, *, options: LossOptions | Mapping[str, LossOptions] | None = None, **dims: int | bool
) -> DistillLoss | CompositeLoss:
    """Build the registered loss ``name`` with its options (``distill.<name>``; None: the defaults) and the
    :class:`DistillLoss` dimensions ``dims`` (student_dim, teacher_dim, num_outputs, regression, num_samples).

    A sum ``a+b`` builds a :class:`CompositeLoss`, ``options`` then mapping each term to its options
    (``DistillConfig.options("a+b")``). :class:`ConfigError` for an unknown name or another loss's options."""
    if "+" in name:
        if problem := loss_names_problem([name]):
            raise ConfigError(f"distill.losses: {problem}")
        given = options or {}
        return CompositeLoss(name, {t: build_loss(t, **dims, options=given.get(t)) for t in loss_terms(name)})
    if name not in _REGISTRY:
        raise ConfigError(
            f"distill.losses: unknown loss {name!r} (available: {', '.join(available_losses())})"
        )
    options = LOSSES[name]() if options is None else options
    if type(options) is not LOSSES[name]:
        raise ConfigError(f"build_loss({name!r}): options must be a {LOSSES[name].__name__}, got {options!r}")
    return _REGISTRY[name](**dims, **options.model_dump(exclude={"weight"}))


def total_loss(
    task_loss: Tensor, distill_loss: Tensor | Mapping[str, Tensor], cfg: DistillConfig, name: str
) -> dict[str, Tensor]:
    r"""The student's objective :math:`w_\text{task} \mathcal{L}_\text{task} + \sum_t w_t \mathcal{L}_t` and its
    weighted parts, ``{"loss": total, "loss_task": ..., "loss_<t>": ...}``; :math:`w_t` = ``cfg.<t>.weight``
    for each term t of ``name`` (``distill_loss``: a scalar, or :class:`CompositeLoss`'s dict for a sum)."""
    terms = dict(distill_loss) if isinstance(distill_loss, Mapping) else {name: distill_loss}
    if task_loss.dim() != 0 or any(v.dim() != 0 for v in terms.values()):
        shapes = {k: tuple(v.shape) for k, v in terms.items()}
        raise StageError(
            f"total_loss expects scalar losses, got task {tuple(task_loss.shape)}, distill {shapes}"
        )
    if sorted(terms) != sorted(loss_terms(name)):
        raise StageError(f"total_loss of {name!r}: got the terms {sorted(terms)}")
    out = {"loss_task": cfg.task_weight * task_loss}
    out |= {f"loss_{t}": cfg.weight(t) * v.to(task_loss) for t, v in terms.items()}
    return {"loss": sum(out.values()), **out}


def world_size() -> int:
    """Workers of the default ``torch.distributed`` process group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B_r, ...) of every worker in rank order -> (sum_r B_r, ...), differentiably; B_r may
    differ. With no process group, or W = 1, ``x`` unchanged."""
    world = world_size()
    if world == 1:
        return x
    rows = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(rows, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts = [int(r.item()) for r in rows]
    most = max(counts)
    if x.shape[0] < most:  # all_gather needs equal shapes: pad, gather, cut the padding out
        x = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))], dim=0)
    parts = dist_fn.all_gather(x)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)], dim=0)
