"""One epoch of training and the fit loop: plain PyTorch, no Ray, no MLflow (Ray Train's workers and the tests
call the same functions). Each global batch is cut into ``world`` slices and worker ``rank`` takes its own, so
the samples of a step do not depend on the number of workers. :class:`Amp` is ``train.precision``."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from pkdot.errors import StageError
from pkdot.metrics import accuracy, ccc

StepFn = Callable[[np.ndarray], dict[str, torch.Tensor]]
F = TypeVar("F", bound=Callable[..., Any])
#: gradient-norm clipping of every step
GRAD_CLIP = 5.0
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Amp:
    """``train.precision`` on a device: autocast for forward passes, a gradient scaler (fp16 only) and
    host-to-device copies (pinned, non-blocking on CUDA). Losses stay in float32 (:func:`task_loss`)."""

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None  # None: float32, no autocast

    @classmethod
    def of(cls, precision: str, device: torch.device | str) -> Amp:
        """``auto``: bf16 on a CUDA device that supports it, else fp32; ``fp32`` / ``bf16`` / ``fp16``."""
        device = torch.device(device)
        if precision == "auto":
            bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            precision = "bf16" if bf16 else "fp32"
        return cls(device, AMP_DTYPES[precision])

    @property
    def name(self) -> str:
        return next(k for k, v in AMP_DTYPES.items() if v == self.dtype)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def wrap(self, fn: F) -> F:
        """``fn`` run under :meth:`autocast` (a forward function for :func:`predict`)."""
        return self.autocast()(fn)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """``array`` on the device (through pinned memory, non-blocking, on CUDA)."""
        t = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (CPU runs are then repeatable)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_batches(
    n: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1, drop_last: bool = True
) -> list[np.ndarray]:
    """Index batches for one epoch, the ``rank``-th slice of each global batch. With ``drop_last`` a last batch
    under 2 samples per worker is dropped (batch statistics and similarity structures need two)."""
    if drop_last and world > 1 and n < 2 * world:
        # every worker runs the same steps (DDP), and each needs two samples per batch
        raise StageError(
            f"{n} training samples cannot be split over train.num_workers = {world} workers (each needs at "
            f"least 2 per batch, so at least {2 * world} samples): use fewer workers or more training subjects"
        )
    order = np.random.default_rng([seed, epoch]).permutation(n)
    batches = [order[start : start + batch_size] for start in range(0, n, batch_size)]
    kept = [b for i, b in enumerate(batches) if i == 0 or not drop_last or len(b) >= max(2, world * 2)]
    return [np.array_split(b, world)[rank] for b in kept]


def group_batches(
    groups: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    drop_last: bool = True,
) -> list[np.ndarray]:
    """Like :func:`epoch_batches`, but every global batch holds samples of one group (``groups``: (N,) labels):
    each crossfit group's targets live in its own teacher's embedding space, and batch-structure losses compare
    the samples of a batch. A group's only batch is kept when it has at least 2 samples."""
    groups = np.asarray(groups)
    rng = np.random.default_rng([seed, epoch])
    global_batches = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        members = members[rng.permutation(len(members))]
        for start in range(0, len(members), batch_size):
            idx = members[start : start + batch_size]
            if drop_last and len(idx) < max(2, world * 2) and (start > 0 or len(idx) < 2):
                continue
            global_batches.append(idx)
    order = rng.permutation(len(global_batches))
    return [np.array_split(global_batches[i], world)[rank] for i in order]


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, regression: bool) -> torch.Tensor:
    """Cross-entropy for classification (outputs = logits (B, C)); MSE for regression (outputs (B, 1)).
    Computed in float32 outside autocast, whatever the precision of ``outputs``."""
    with torch.autocast(outputs.device.type, enabled=False):
        if regression:
            return nn.functional.mse_loss(outputs[:, 0].float(), targets.float())
        return nn.functional.cross_entropy(outputs.float(), targets.long())


def train_epoch(
    step: StepFn,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[np.ndarray],
    *,
    modules: Sequence[nn.Module] = (),
    amp: Amp = Amp(),
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; ``step(index)`` (under ``amp.autocast()``) returns named losses, ``"loss"`` the
    total. Returns the mean of every entry over the batches (each named loss is logged separately)."""
    for m in modules:
        m.train()
    scaler = amp.scaler() if scaler is None else scaler
    sums: dict[str, float] = {}
    for index in batches:
        with amp.autocast():
            losses = step(index)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        scaler.step(optimizer)
        scaler.update()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    return {k: v / max(1, len(batches)) for k, v in sums.items()}


def task_metric(targets: np.ndarray, outputs: np.ndarray, regression: bool) -> float:
    """Model-selection metric: accuracy (classification) or CCC (regression); higher is better."""
    if regression:
        return float(ccc(targets.astype(np.float64), outputs[:, 0].astype(np.float64)))
    return float(accuracy(targets, outputs.argmax(1)))


@torch.no_grad()
def predict(
    forward: Callable[[np.ndarray], Sequence[torch.Tensor]],
    n: int,
    batch_size: int,
    modules: Sequence[nn.Module] = (),
) -> tuple[np.ndarray, ...]:
    """Run ``forward(index) -> tensors`` (e.g. outputs, embedding) over all ``n`` samples in order, in eval mode;
    each output concatenated over the batches, as float32 numpy."""
    for m in modules:
        m.eval()
    batches = [
        [t.float().cpu().numpy() for t in forward(np.arange(start, min(n, start + batch_size)))]
        for start in range(0, n, batch_size)
    ]
    return tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))


@dataclass
class FitState:
    """Everything needed to resume a fit at an epoch boundary."""

    epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    best_state: dict[str, Any] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    model_state: dict[str, Any] | None = None
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    #: epochs after which the fit was resumed from a checkpoint (one entry per restart)
    resumed_from: list[int] = field(default_factory=list)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    train_step: StepFn,
    validate: Callable[[], float],
    epochs: int,
    batches_for_epoch: Callable[[int], Sequence[np.ndarray]],
    on_epoch_end: Callable[[FitState], None] | None = None,
    resume: FitState | None = None,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None,
    train_modules: Sequence[nn.Module] = (),
    progress: Callable[[int, dict[str, float]], None] | None = None,
    recalibrate: Callable[[int], None] | None = None,
    amp: Amp = Amp(),
) -> FitState:
    """Train ``epochs`` epochs, keep the weights of the best validation epoch (higher ``validate()`` is better).
    ``train_modules`` (default ``[model]``) are put in train mode; ``resume``: a state from ``on_epoch_end``."""
    state = resume or FitState()
    if resume is not None and resume.model_state is not None:
        state.resumed_from = [*state.resumed_from, state.epoch]
        model.load_state_dict(resume.model_state)
        if resume.optimizer_state is not None:
            optimizer.load_state_dict(resume.optimizer_state)
        if scheduler is not None and resume.scheduler_state is not None:
            scheduler.load_state_dict(resume.scheduler_state)
    mods = list(train_modules) or [model]
    scaler = amp.scaler()
    for epoch in range(state.epoch, epochs):
        losses = train_epoch(
            train_step, optimizer, batches_for_epoch(epoch), modules=mods, amp=amp, scaler=scaler
        )
        if recalibrate is not None:
            for m in mods:
                m.train()
            with amp.autocast():
                recalibrate(epoch)
        score = float(validate())
        if scheduler is not None:
            scheduler.step(-score)
        train_loss = losses.pop("loss", math.nan)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "val_metric": score, **losses}
        state.history.append(record)
        if score > state.best_score or state.best_state is None:
            state.best_score, state.best_epoch = score, epoch + 1
            state.best_state = copy.deepcopy(model.state_dict())
        state.epoch = epoch + 1
        state.model_state = copy.deepcopy(model.state_dict())
        state.optimizer_state = copy.deepcopy(optimizer.state_dict())
        state.scheduler_state = scheduler.state_dict() if scheduler is not None else None
        if progress is not None:
            progress(epoch + 1, record)
        if on_epoch_end is not None:
            on_epoch_end(state)
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    return state
