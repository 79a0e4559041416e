"""Teacher job of one fold x seed, phases as the paper trains them (model selection on validation subjects only):
``unimodal-<m>`` per modality (backbone + head; also the report's reference models), ``teacher`` (gated
cross-attention fusion, backbones from phase 1), ``tnet`` (per privileged modality, pooled video -> pooled
privileged features of the frozen teacher, RBF-kernel MMD). A cross-fitting job (``job.group`` set) trains phases
1-2 without one crossfit group and writes no predictions. ``DONE.json`` records the subjects trained on."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from pkdot.config import RunConfig
from pkdot.models import Backbone, UnimodalModel, build_backbone, build_teacher, build_tnets, mmd_rbf
from pkdot.rundir import atomic_torch_save, atomic_write_json, content_hash
from pkdot.train.data import FoldData, SampleSet
from pkdot.train.jobs import (
    Job,
    WorkerContext,
    frame_metric,
    load_checkpoint,
    split_predictions,
    val_metric,
    write_job_files,
)
from pkdot.train.loops import Amp, FitState, epoch_batches, fit, seed_everything, task_loss


def _optimizer(cfg: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=cfg.train.weight_decay)
    return torch.optim.Adam(groups, weight_decay=cfg.train.weight_decay)


def _phase_path(job: Job, phase: str) -> Path:
    return Path(job.out_dir) / f"{phase}.pt"


def checkpoint_files(job: Job) -> list[Path]:
    """The checkpoints a finished teacher job leaves (cross-fitting jobs train no T-Net)."""
    return [_phase_path(job, phase) for phase in ("teacher", "tnet")[: 2 if job.group is None else 1]]


def _phase(
    job: Job, ctx: WorkerContext, phase: str, model: nn.Module, train: Callable[[], FitState], **extra: Any
) -> FitState:
    """Load a finished phase's weights from ``<job>/<phase>.pt``, or train it and (rank 0) save them."""
    if (path := _phase_path(job, phase)).is_file():
        saved = load_checkpoint(path, ctx.device)
        model.load_state_dict(saved["state_dict"])
        return FitState(**saved["fit"])
    state = train()
    if ctx.is_chief:  # the FitState without its weights
        fit = {k: getattr(state, k) for k in ("epoch", "best_score", "best_epoch", "history", "resumed_from")}
        atomic_torch_save({"state_dict": model.state_dict(), **extra, "fit": fit}, path)
    return state


def _supervised_phase(
    cfg: RunConfig,
    job: Job,
    ctx: WorkerContext,
    phase: str,
    model: nn.Module,
    modalities: str | list[str],
    data: FoldData,
    groups: list[dict],
    **extra: Any,
) -> tuple[FitState, list[pd.DataFrame]]:
    """Train ``model`` on the task loss, select on val (or load the finished phase); with its val/test prediction
    rows. ``modalities``: one modality (the model takes its tensor) or a list (it takes a dict of them)."""
    regression = cfg.data.is_regression
    batch_size = cfg.train.teacher_batch_size
    seed = job.seed * 1000 + job.fold
    amp = Amp.of(cfg.train.precision, ctx.device)

    def inputs(part: SampleSet, idx: np.ndarray) -> Any:
        if isinstance(modalities, str):
            return amp.tensor(part.arrays[modalities][idx])
        return {m: amp.tensor(part.arrays[m][idx]) for m in modalities}

    @amp.wrap
    def forward(part: SampleSet, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(inputs(part, idx))
        return out.logits, out.embedding

    def recalibrate(epoch: int) -> None:
        # "precise BN": exact BatchNorm statistics of the current weights over the whole training set (on
        # every worker, so all ranks hold the same); few steps per epoch leave the running averages far behind
        batches = epoch_batches(len(data.train), batch_size, seed=seed, epoch=epoch, drop_last=False)
        update_bn((inputs(data.train, idx) for idx in batches), model)

    def train() -> FitState:
        train_model = ctx.wrap(model)

        def step(index: np.ndarray) -> dict[str, torch.Tensor]:
            out = train_model(inputs(data.train, index))
            return {"loss": task_loss(out.logits, amp.tensor(data.train.targets[index]), regression)}

        return fit(
            model,
            _optimizer(cfg, groups),
            train_step=step,
            validate=lambda: val_metric(forward, data, batch_size, model, regression),
            epochs=cfg.train.epochs_teacher if phase == "teacher" else cfg.train.epochs_unimodal,
            batches_for_epoch=lambda e: epoch_batches(
                len(data.train), batch_size, seed=seed, epoch=e, rank=ctx.rank, world=ctx.world
            ),
            train_modules=[train_model],
            recalibrate=recalibrate,
            amp=amp,
            **ctx.fit_hooks(phase),
        )

    state = _phase(job, ctx, phase, model, train, **extra)
    return state, split_predictions(phase, job, data, forward, batch_size, regression, [model])


@torch.no_grad()
def pooled_features(
    backbone: nn.Module, samples: SampleSet, modality: str, batch: int, amp: Amp
) -> torch.Tensor:
    """(N, D) mean-pooled backbone tokens of every sample (eval mode, no grad, autocast; float32)."""
    backbone.eval()
    run = amp.wrap(lambda x: backbone(x).mean(1).float())
    arrays = samples.arrays[modality]
    return torch.cat([run(amp.tensor(arrays[s : s + batch])) for s in range(0, len(samples), batch)])


def _unimodal(
    cfg: RunConfig, modality: str, shape: tuple[int, ...], device: torch.device | str
) -> UnimodalModel:
    backbone = build_backbone(modality, shape, cfg.model)
    bounded = cfg.data.task != "regression"
    return UnimodalModel(backbone, cfg.data.num_outputs, cfg.data.is_regression, bounded=bounded).to(device)


def _train_tnets(
    cfg: RunConfig, job: Job, ctx: WorkerContext, teacher: nn.Module, tnets: nn.ModuleDict, data: FoldData
) -> FitState:
    """T-Nets: the teacher's pooled video features -> its pooled privileged features (RBF-kernel MMD); the
    features come from the teacher under ``train.precision``, the T-Nets and their MMD train in float32."""
    seed_everything(job.seed * 7919 + job.fold * 31 + 202)
    b = cfg.train.teacher_batch_size
    amp = Amp.of(cfg.train.precision, ctx.device)
    video = cfg.data.student_modalities[0]
    x_train = pooled_features(teacher.backbones[video], data.train, video, b, amp)
    x_val = pooled_features(teacher.backbones[video], data.val, video, b, amp)
    y_train = {p: pooled_features(teacher.backbones[p], data.train, p, b, amp) for p in tnets}
    y_val = {p: pooled_features(teacher.backbones[p], data.val, p, b, amp) for p in tnets}

    def step(index: np.ndarray) -> dict[str, torch.Tensor]:
        losses = {f"mmd_{p}": mmd_rbf(tnets[p](x_train[index]), y_train[p][index]) for p in tnets}
        return {"loss": torch.stack(list(losses.values())).sum(), **losses}

    @torch.no_grad()
    def validate() -> float:
        tnets.eval()
        return -float(sum(mmd_rbf(tnets[p](x_val), y_val[p]) for p in tnets))

    return fit(
        tnets,
        torch.optim.Adam(tnets.parameters(), lr=cfg.train.lr_tnet),
        train_step=step,
        validate=validate,
        epochs=cfg.train.epochs_tnet,
        # precomputed features: every worker takes the whole batch (identical updates, no gradient exchange)
        batches_for_epoch=lambda e: epoch_batches(
            len(data.train), b, seed=job.seed * 1000 + job.fold, epoch=e
        ),
        train_modules=[tnets],
        **ctx.fit_hooks("tnet"),
    )


def run_teacher_job(cfg: RunConfig, job: Job, data: FoldData, ctx: WorkerContext) -> dict[str, float]:
    """Train (or resume) every phase of a teacher job; rank 0 writes the job's files. Returns test metrics."""
    started = time.perf_counter()
    full_fold = job.group is None
    shapes = data.train.input_shapes
    histories: dict[str, FitState] = {}
    frames = []
    backbones: dict[str, Backbone] = {}

    # 1. unimodal models
    for modality in cfg.data.modalities:
        phase = f"unimodal-{modality}"
        seed_everything(job.seed * 7919 + job.fold * 31 + len(backbones))
        model = _unimodal(cfg, modality, shapes[modality], ctx.device)
        groups = [{"params": list(model.parameters()), "lr": cfg.train.lr_backbone}]
        histories[phase], rows = _supervised_phase(
            cfg, job, ctx, phase, model, modality, data, groups, input_shape=shapes[modality]
        )
        backbones[modality] = model.backbone
        frames += rows

    # 2. fusion teacher, backbones initialised from the unimodal models
    seed_everything(job.seed * 7919 + job.fold * 31 + 101)
    teacher = build_teacher(cfg, shapes, backbones=backbones).to(ctx.device)
    backbone_params = list(teacher.backbones.parameters())
    ids = {id(p) for p in backbone_params}
    groups = [
        {"params": backbone_params, "lr": cfg.train.lr_teacher_backbone},
        {"params": [p for p in teacher.parameters() if id(p) not in ids], "lr": cfg.train.lr_fusion},
    ]
    histories["teacher"], rows = _supervised_phase(
        cfg, job, ctx, "teacher", teacher, cfg.data.modalities, data, groups, input_shapes=shapes
    )
    frames += rows
    teacher.requires_grad_(False).eval()

    # 3. T-Nets (full-fold teachers only)
    if full_fold:
        tnets = nn.ModuleDict(build_tnets(cfg)).to(ctx.device)
        histories["tnet"] = _phase(
            job, ctx, "tnet", tnets, lambda: _train_tnets(cfg, job, ctx, teacher, tnets, data)
        )

    metrics: dict[str, float] = {}
    if ctx.is_chief:
        metric = "ccc" if cfg.data.is_regression else "accuracy"
        for f in frames:
            if f["split"].iloc[0] == "test":
                metrics[f"{f['model'].iloc[0]}/test_{metric}"] = frame_metric(f, cfg.data.is_regression)
        record = {
            "teacher_hash": content_hash(_phase_path(job, "teacher")),
            "train_subjects": sorted(set(data.train.subject_ids.tolist())),
            "seconds": round(time.perf_counter() - started, 2),
        }
        if full_fold:
            record["tnet_hash"] = content_hash(_phase_path(job, "tnet"))
        else:
            record["held_out_group"] = job.group
        write_job_files(job, frames if full_fold else None, histories, metrics, metric)
        atomic_write_json(job.done_marker, record)
    return metrics


def load_teacher(
    cfg: RunConfig, job_dir: Path, device: torch.device | str = "cpu", *, with_tnets: bool = True
):
    """The trained teacher, T-Nets (None with ``with_tnets=False``) and input shapes of a job folder (frozen)."""
    saved = load_checkpoint(Path(job_dir) / "teacher.pt", device)
    teacher = build_teacher(cfg, saved["input_shapes"])
    teacher.load_state_dict(saved["state_dict"])
    tnets = None
    if with_tnets:
        tnets = nn.ModuleDict(build_tnets(cfg))
        tnets.load_state_dict(load_checkpoint(Path(job_dir) / "tnet.pt", device)["state_dict"])
        tnets = tnets.requires_grad_(False).eval().to(device)
    return teacher.requires_grad_(False).eval().to(device), tnets, saved["input_shapes"]


def load_unimodal(cfg: RunConfig, job_dir: Path, modality: str, device: torch.device | str = "cpu"):
    """The trained ``unimodal-<modality>`` model of a teacher job folder (phase 1), frozen, eval mode."""
    saved = load_checkpoint(Path(job_dir) / f"unimodal-{modality}.pt", device)
    model = _unimodal(cfg, modality, tuple(saved["input_shape"]), "cpu")
    model.load_state_dict(saved["state_dict"])
    return model.requires_grad_(False).eval().to(device)
