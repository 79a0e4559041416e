"""Student job of one loss x fold x seed: distil the frozen teacher into the video-only student (a video backbone,
the full-fold teacher's T-Net(s), frozen and *loaded* (the authors' script forgot to), its own fusion and head).
``train.student_init``: ``teacher-frozen`` (the paper's; trains from the cache alone, cached video tokens in),
``teacher-finetune``, ``scratch`` or ``pretrained`` (these read the face crops and run the backbone every step).
With cross-fitted targets every training batch holds one crossfit group, for every loss."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from pkdot.config import RunConfig
from pkdot.distill import DistillBatch, build_loss, total_loss
from pkdot.errors import ConfigError, StageError
from pkdot.folds import crossfit_groups_of
from pkdot.models import build_backbone, build_student, load_pretrained_video
from pkdot.rundir import RunDir, atomic_torch_save, atomic_write_json
from pkdot.train.cache import check_cache, read_cache
from pkdot.train.data import FoldData, SampleSet, load_samples
from pkdot.train.jobs import (
    Job,
    WorkerContext,
    frame_metric,
    load_checkpoint,
    split_predictions,
    val_metric,
    write_job_files,
)
from pkdot.train.loops import Amp, epoch_batches, fit, group_batches, seed_everything, task_loss
from pkdot.train.teacher import load_teacher


def load_student_samples(cfg: RunConfig, run_dir: Path) -> SampleSet:
    """Ids/targets of every sample; raw video frames too when the student backbone is trained (not frozen)."""
    samples = load_samples(cfg, run_dir, modalities=[cfg.data.student_modalities[0]])
    if cfg.train.student_backbone_frozen:
        samples.arrays = {}  # ids and targets only
    return samples


class DistillationObjective(nn.Module):
    """Student + distillation loss as one module (so data-parallel wrapping syncs the loss's parameters too); the
    student's forward pass runs under the caller's autocast, the task and distillation losses in float32."""

    def __init__(self, student: nn.Module, distill_loss: nn.Module, cfg: RunConfig) -> None:
        super().__init__()
        self.student, self.distill_loss, self.cfg = student, distill_loss, cfg

    def forward(
        self,
        student_input: torch.Tensor,
        teacher_z: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        index: torch.Tensor,
        from_features: bool,
    ) -> dict[str, torch.Tensor]:
        student: Any = self.student
        out = student.forward_from_features(student_input) if from_features else student(student_input)
        with torch.autocast(target.device.type, enabled=False):
            task = task_loss(out.logits, target, self.cfg.data.is_regression)
            batch = DistillBatch(
                student_z=out.embedding.float(),
                teacher_z=teacher_z.float(),
                student_logits=out.logits.float(),
                teacher_logits=teacher_logits.float(),
                labels=target,
                index=index,
            )
            distill = self.distill_loss(batch)
            return total_loss(task, distill, self.cfg.distill, self.distill_loss.name)


def build_student_for_job(
    cfg: RunConfig, fold: int, seed: int, device: torch.device | str = "cpu", *, initialise: bool = True
):
    """The untrained student of (fold, seed): its video backbone as ``train.student_init`` says, the full-fold
    teacher's loaded T-Nets, fresh fusion and head. ``initialise=False`` skips loading
    ``model.pretrained_video`` (a trained student's saved state_dict replaces every weight anyway)."""
    teacher, tnets, shapes = load_teacher(cfg, RunDir(cfg.run_dir).teacher(fold, seed), device)
    video = cfg.data.student_modalities[0]
    mode = cfg.train.student_init
    if mode in ("teacher-frozen", "teacher-finetune"):
        backbone = teacher.backbones[video]
    else:
        if video not in shapes:
            raise StageError(f"teacher checkpoint of fold {fold} seed {seed} has no {video!r} input shape")
        fresh = cfg.model.model_copy(update={"pretrained_video": None})
        backbone = build_backbone(video, shapes[video], fresh, seed=seed * 7919 + fold * 31 + 404)
        if mode == "pretrained" and initialise:
            if video != "video":
                raise ConfigError(
                    f"train.student_init 'pretrained' loads a video backbone, the student reads {video!r}"
                )
            load_pretrained_video(backbone, cfg.model.pretrained_video)
    student = build_student(
        cfg,
        shapes,
        video_backbone=backbone,
        tnets=dict(tnets.items()) if cfg.distill.use_tnet else None,
        freeze_backbone=mode == "teacher-frozen",
    )
    return student.to(device), shapes


def run_student_job(cfg: RunConfig, job: Job, data: FoldData, ctx: WorkerContext) -> dict[str, float]:
    """Train (or resume) one student; rank 0 writes student.pt, predictions, history, metrics, DONE."""
    assert job.loss is not None
    started = time.perf_counter()
    regression = cfg.data.is_regression
    metric = "ccc" if regression else "accuracy"
    crossfit = crossfit_groups_of(cfg)
    meta = check_cache(cfg.run_dir, job.fold, job.seed, crossfit, cfg.distill.teacher_source)
    video = cfg.data.student_modalities[0]
    from_features = cfg.train.student_backbone_frozen
    # the cached teacher arrays of every part (``target_group`` of the training part with cross-fitted targets)
    columns = ("teacher_embedding", "teacher_logits", *(("video_tokens",) if from_features else ()))
    for part in (data.train, data.val, data.test):
        extra = ("target_group",) if crossfit is not None and part is data.train else ()
        part.arrays.update(
            read_cache(cfg.run_dir, job.fold, job.seed, part.sample_ids, crossfit, columns + extra)
        )
    input_key = "video_tokens" if from_features else video
    if not from_features and video not in data.train.arrays:
        raise StageError(
            f"train.student_init {cfg.train.student_init!r} trains the {video} backbone: the student's samples "
            f"need the {video} inputs (load them with load_student_samples)"
        )
    train_groups = data.train.arrays.get("target_group") if crossfit is not None else None
    if train_groups is not None and (train_groups < 0).any():
        raise StageError(
            f"fold {job.fold} seed {job.seed}: {int((train_groups < 0).sum())} training samples have no crossfit "
            "teacher target (the cache and splits.json disagree; rebuild the cache)"
        )

    seed_everything(job.seed * 7919 + job.fold * 31 + 303)
    student, _shapes = build_student_for_job(cfg, job.fold, job.seed, ctx.device)
    dim = cfg.model.embed_dim
    distill_loss = build_loss(
        job.loss,
        student_dim=dim,
        teacher_dim=dim,
        num_outputs=cfg.data.num_outputs,
        regression=regression,
        num_samples=len(data.train),
        options=cfg.distill.options(job.loss),
    ).to(ctx.device)
    objective = DistillationObjective(student, distill_loss, cfg)
    train_objective = ctx.wrap(objective)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.train.lr_student, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=3)
    b = cfg.train.batch_size
    amp = Amp.of(cfg.train.precision, ctx.device)

    def step(index: np.ndarray) -> dict[str, torch.Tensor]:
        arrays = data.train.arrays
        inputs = [amp.tensor(arrays[k][index]) for k in (input_key, "teacher_embedding", "teacher_logits")]
        target, rows = amp.tensor(data.train.targets[index]), amp.tensor(index.astype(np.int64))
        return train_objective(*inputs, target, rows, from_features)

    @amp.wrap
    def forward(part: SampleSet, index: np.ndarray):
        x = amp.tensor(part.arrays[input_key][index])
        o = student.forward_from_features(x) if from_features else student(x)
        return o.logits, o.embedding

    def recalibrate(epoch: int) -> None:
        if not from_features:  # a trainable backbone: exact BatchNorm statistics of the current weights
            batches = epoch_batches(len(data.train), b, seed=0, epoch=epoch, drop_last=False)
            update_bn((amp.tensor(data.train.arrays[input_key][idx]) for idx in batches), student)

    def batches_for_epoch(epoch: int) -> list[np.ndarray]:
        seed = job.seed * 1000 + job.fold
        if train_groups is not None:  # one crossfit group (one teacher's embedding space) per batch
            return group_batches(train_groups, b, seed=seed, epoch=epoch, rank=ctx.rank, world=ctx.world)
        return epoch_batches(len(data.train), b, seed=seed, epoch=epoch, rank=ctx.rank, world=ctx.world)

    phase = f"student-{job.loss}"
    state = fit(
        student,
        optimizer,
        train_step=step,
        validate=lambda: val_metric(forward, data, b, student, regression),
        epochs=cfg.train.epochs_student,
        batches_for_epoch=batches_for_epoch,
        scheduler=scheduler,
        train_modules=[train_objective],
        recalibrate=recalibrate,
        amp=amp,
        **ctx.fit_hooks(phase),
    )
    metrics: dict[str, float] = {}
    if ctx.is_chief:
        frames = split_predictions(phase, job, data, forward, b, regression, [student])
        metrics = {f"{f['split'].iloc[0]}_{metric}": frame_metric(f, regression) for f in frames}
        metrics["best_epoch"] = state.best_epoch
        saved = {"state_dict": student.state_dict(), "loss_state": distill_loss.state_dict(), "cache": meta}
        keys = {"fold": job.fold, "seed": job.seed, "loss": job.loss, "student_init": cfg.train.student_init}
        atomic_torch_save(saved | keys, Path(job.out_dir) / "student.pt")
        write_job_files(job, frames, {phase: state}, metrics, metric)
        done = {"cache": meta, "seconds": round(time.perf_counter() - started, 2)}
        atomic_write_json(job.done_marker, done, indent=None)
    return metrics


def load_trained_student(cfg: RunConfig, loss: str, fold: int, seed: int, device: torch.device | str = "cpu"):
    """The trained student of (loss, fold, seed), frozen, in eval mode (takes raw video input)."""
    saved = load_checkpoint(RunDir(cfg.run_dir).student(loss, fold, seed) / "student.pt", device)
    student, shapes = build_student_for_job(cfg, fold, seed, device, initialise=False)
    student.load_state_dict(saved["state_dict"])
    return student.eval().requires_grad_(False), shapes
