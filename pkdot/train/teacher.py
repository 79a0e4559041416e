"""Teacher job of one fold x seed: unimodal backbones, then the fusion teacher, then the T-Net(s).

Phases, as the paper trains them:

1. ``unimodal-<m>`` for every training modality: backbone + head on that modality alone (also the
   video-only / physio-only / audio-only reference models of the report).
2. ``teacher``: the gated cross-attention fusion on all modalities, backbones initialised from phase 1
   (backbone lr ``lr_teacher_backbone``, fusion/head lr ``lr_fusion``).
3. ``tnet``: for each privileged modality, a T-Net from the teacher's pooled video features to the teacher's
   pooled privileged features, trained with an RBF-kernel MMD (lr ``lr_tnet``); the teacher is frozen.

Model selection uses the fold's *validation subjects* only; test predictions are written once, at the end.

A cross-fitting job (``job.group`` set, ``distill.teacher_targets = "crossfit"``) runs phases 1 and 2 on the
fold's training subjects minus one crossfit group and skips the T-Net (the student's T-Nets come from the
full-fold teacher); it writes no ``predictions.parquet`` (it is not a model of the report), only its
checkpoints, history, metrics and ``DONE.json``. Every job's ``DONE.json`` records the subjects it trained on
and its seconds, which is how the cache proves that no target comes from a teacher that saw the subject, and
how the benchmark reports the cost of cross-fitting.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pkdot.config import RunConfig
from pkdot.models import Backbone, UnimodalModel, build_backbone, build_teacher, build_tnets, mmd_rbf
from pkdot.train.data import FoldData, SampleSet
from pkdot.train.jobs import (
    Job,
    WorkerContext,
    atomic_torch_save,
    atomic_write_text,
    file_hash,
    split_predictions,
    write_history,
    write_predictions,
)
from pkdot.train.loops import (
    FitState,
    epoch_batches,
    fit,
    predict,
    recalibrate_batchnorm,
    seed_everything,
    task_loss,
    task_metric,
)

log = logging.getLogger(__name__)


def _optimizer(cfg: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=cfg.train.weight_decay)
    return torch.optim.Adam(groups, weight_decay=cfg.train.weight_decay)


def _phase_path(job: Job, phase: str) -> Path:
    return Path(job.out_dir) / f"{phase}.pt"


def _fit_supervised(
    cfg: RunConfig,
    job: Job,
    ctx: WorkerContext,
    phase: str,
    model: nn.Module,
    forward,
    data: FoldData,
    groups: list[dict],
    epochs: int,
    batch_size: int,
) -> FitState:
    """Train ``model`` (``forward(sampleset, index) -> ModelOutput``) on the task loss, select on val."""
    regression = cfg.data.is_regression
    train_model = ctx.wrap(model)
    optimizer = _optimizer(cfg, groups)

    def step(index: np.ndarray) -> dict[str, torch.Tensor]:
        out = forward(train_model, data.train, index)
        target = torch.from_numpy(data.train.targets[index]).to(ctx.device)
        return {"loss": task_loss(out.logits, target, regression)}

    def validate() -> float:
        outputs, _ = predict(
            lambda idx: _out_emb(forward(model, data.val, idx)), len(data.val), batch_size, [model]
        )
        return task_metric(data.val.targets, outputs, regression)

    seed = job.seed * 1000 + job.fold

    def recalibrate(epoch: int) -> None:
        # every worker recalibrates on the whole training set, so all ranks hold the same statistics
        recalibrate_batchnorm(
            model,
            lambda idx: forward(model, data.train, idx),
            epoch_batches(len(data.train), batch_size, seed=seed, epoch=epoch, drop_last=False),
        )

    return fit(
        model,
        optimizer,
        train_step=step,
        validate=validate,
        epochs=epochs,
        batches_for_epoch=lambda e: epoch_batches(
            len(data.train), batch_size, seed=seed, epoch=e, rank=ctx.rank, world=ctx.world
        ),
        on_epoch_end=ctx.epoch_hook(phase),
        resume=ctx.resume_for(phase),
        train_modules=[train_model],
        progress=ctx.progress_hook(phase),
        recalibrate=recalibrate,
    )


def _out_emb(out):
    return out.logits, out.embedding


def _modality_forward(modality: str, device: torch.device):
    def forward(model: nn.Module, samples: SampleSet, index: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(samples.arrays[modality][index])).to(device)
        return model(x)

    return forward


def _multi_forward(modalities: list[str], device: torch.device):
    def forward(model: nn.Module, samples: SampleSet, index: np.ndarray):
        inputs = {
            m: torch.from_numpy(np.ascontiguousarray(samples.arrays[m][index])).to(device) for m in modalities
        }
        return model(inputs)

    return forward


def _predictions(cfg: RunConfig, job: Job, name: str, model: nn.Module, forward, data: FoldData, batch: int):
    return split_predictions(
        model=name,
        job=job,
        parts={"val": data.val, "test": data.test},
        forward=lambda part, idx: _out_emb(forward(model, part, idx)),
        batch_size=batch,
        regression=cfg.data.is_regression,
        modules=[model],
    )


@torch.no_grad()
def pooled_features(
    backbone: nn.Module, samples: SampleSet, modality: str, batch: int, device: torch.device
) -> torch.Tensor:
    """(N, D) mean-pooled backbone tokens of every sample (eval mode, no grad)."""
    backbone.eval()
    out = []
    for start in range(0, len(samples), batch):
        x = torch.from_numpy(np.ascontiguousarray(samples.arrays[modality][start : start + batch])).to(device)
        out.append(backbone(x).mean(1))
    return torch.cat(out)


def run_teacher_job(cfg: RunConfig, job: Job, data: FoldData, ctx: WorkerContext) -> dict[str, float]:
    """Train (or resume) every phase of a teacher job; rank 0 writes the job's files. Returns test metrics."""
    import time

    started = time.perf_counter()
    out = Path(job.out_dir)
    full_fold = job.group is None
    regression = cfg.data.is_regression
    n_out = cfg.data.num_outputs
    shapes = data.input_shapes
    metric = "ccc" if regression else "accuracy"
    histories: dict[str, FitState] = {}
    frames = []
    backbones: dict[str, Backbone] = {}

    # 1. unimodal models
    for modality in cfg.data.modalities:
        phase = f"unimodal-{modality}"
        seed_everything(job.seed * 7919 + job.fold * 31 + len(backbones))
        model = UnimodalModel(
            build_backbone(modality, shapes[modality], cfg.model),
            n_out,
            regression,
            bounded=cfg.data.task != "regression",
        ).to(ctx.device)
        fwd = _modality_forward(modality, ctx.device)
        path = _phase_path(job, phase)
        if path.is_file():
            saved = torch.load(path, weights_only=False, map_location=ctx.device)
            model.load_state_dict(saved["state_dict"])
            histories[phase] = FitState(**saved["fit"])
        else:
            groups = [{"params": list(model.parameters()), "lr": cfg.train.lr_backbone}]
            state = _fit_supervised(
                cfg,
                job,
                ctx,
                phase,
                model,
                fwd,
                data,
                groups,
                cfg.train.epochs_unimodal,
                cfg.train.teacher_batch_size,
            )
            histories[phase] = state
            if ctx.is_chief:
                atomic_torch_save(
                    {
                        "state_dict": model.state_dict(),
                        "input_shape": shapes[modality],
                        "fit": _fit_summary(state),
                    },
                    path,
                )
        backbones[modality] = model.backbone
        frames += _predictions(cfg, job, phase, model, fwd, data, cfg.train.teacher_batch_size)

    # 2. fusion teacher, backbones initialised from the unimodal models
    phase = "teacher"
    seed_everything(job.seed * 7919 + job.fold * 31 + 101)
    teacher = build_teacher(cfg, shapes, backbones=backbones).to(ctx.device)
    fwd = _multi_forward(cfg.data.modalities, ctx.device)
    path = _phase_path(job, phase)
    if path.is_file():
        saved = torch.load(path, weights_only=False, map_location=ctx.device)
        teacher.load_state_dict(saved["state_dict"])
        histories[phase] = FitState(**saved["fit"])
    else:
        backbone_params = [p for p in teacher.backbones.parameters()]
        ids = {id(p) for p in backbone_params}
        other = [p for p in teacher.parameters() if id(p) not in ids]
        groups = [
            {"params": backbone_params, "lr": cfg.train.lr_teacher_backbone},
            {"params": other, "lr": cfg.train.lr_fusion},
        ]
        state = _fit_supervised(
            cfg,
            job,
            ctx,
            phase,
            teacher,
            fwd,
            data,
            groups,
            cfg.train.epochs_teacher,
            cfg.train.teacher_batch_size,
        )
        histories[phase] = state
        if ctx.is_chief:
            atomic_torch_save(
                {"state_dict": teacher.state_dict(), "input_shapes": shapes, "fit": _fit_summary(state)}, path
            )
    frames += _predictions(cfg, job, "teacher", teacher, fwd, data, cfg.train.teacher_batch_size)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()

    # 3. T-Nets: teacher video features -> teacher privileged features (MMD); full-fold teachers only
    student_modality = cfg.data.student_modalities[0]
    phase = "tnet"
    tnets = nn.ModuleDict(build_tnets(cfg)).to(ctx.device)
    path = _phase_path(job, phase)
    if full_fold and path.is_file():
        saved = torch.load(path, weights_only=False, map_location=ctx.device)
        tnets.load_state_dict(saved["state_dict"])
        histories[phase] = FitState(**saved["fit"])
    elif full_fold:
        seed_everything(job.seed * 7919 + job.fold * 31 + 202)
        b = cfg.train.teacher_batch_size
        vid = teacher.backbones[student_modality]
        x_train = pooled_features(vid, data.train, student_modality, b, ctx.device)
        x_val = pooled_features(vid, data.val, student_modality, b, ctx.device)
        y_train = {p: pooled_features(teacher.backbones[p], data.train, p, b, ctx.device) for p in tnets}
        y_val = {p: pooled_features(teacher.backbones[p], data.val, p, b, ctx.device) for p in tnets}
        optimizer = torch.optim.Adam(tnets.parameters(), lr=cfg.train.lr_tnet)

        def step(index: np.ndarray) -> dict[str, torch.Tensor]:
            losses = {f"mmd_{p}": mmd_rbf(tnets[p](x_train[index]), y_train[p][index]) for p in tnets}
            total = torch.stack(list(losses.values())).sum()
            return {"loss": total, **losses}

        @torch.no_grad()
        def validate() -> float:
            tnets.eval()
            return -float(sum(mmd_rbf(tnets[p](x_val), y_val[p]) for p in tnets))

        state = fit(
            tnets,
            optimizer,
            train_step=step,
            validate=validate,
            epochs=cfg.train.epochs_tnet,
            # T-Nets train on precomputed features: every worker takes the whole batch (identical
            # updates on every rank, no gradient exchange needed)
            batches_for_epoch=lambda e: epoch_batches(
                len(data.train), b, seed=job.seed * 1000 + job.fold, epoch=e
            ),
            on_epoch_end=ctx.epoch_hook(phase),
            resume=ctx.resume_for(phase),
            train_modules=[tnets],
            progress=ctx.progress_hook(phase),
        )
        histories[phase] = state
        if ctx.is_chief:
            atomic_torch_save({"state_dict": tnets.state_dict(), "fit": _fit_summary(state)}, path)

    metrics: dict[str, float] = {}
    if ctx.is_chief:
        if full_fold:
            write_predictions(frames, out / "predictions.parquet")
        write_history(out / "history.json", histories, metric)
        for f in frames:
            if f["split"].iloc[0] == "test":
                scores = np.stack(f["scores"].to_numpy())
                metrics[f"{f['model'].iloc[0]}/test_{metric}"] = task_metric(
                    f["y_true"].to_numpy(), scores, regression
                )
        import json

        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
        record = {
            "teacher_hash": file_hash(_phase_path(job, "teacher")),
            "train_subjects": sorted(set(data.train.subject_ids.tolist())),
            "seconds": round(time.perf_counter() - started, 2),
        }
        if full_fold:
            record["tnet_hash"] = file_hash(_phase_path(job, "tnet"))
        else:
            record["held_out_group"] = job.group
        atomic_write_text(job.done_marker, json.dumps(record, indent=1))
    return metrics


def _fit_summary(state: FitState) -> dict:
    """A FitState without the heavy weights (stored next to the phase's weights)."""
    return {
        "epoch": state.epoch,
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "resumed_from": state.resumed_from,
    }


def load_teacher(
    cfg: RunConfig, job_dir: Path, device: torch.device | str = "cpu", *, with_tnets: bool = True
):
    """The trained teacher and T-Nets of a job folder (frozen, eval mode).

    ``with_tnets=False`` (cross-fitting teachers, which train none): the T-Nets returned are None.
    """
    from pkdot.errors import StageError

    path = Path(job_dir) / "teacher.pt"
    if not path.is_file():
        raise StageError(f"teacher checkpoint {path} does not exist (run `pkdot train-teacher` first)")
    saved = torch.load(path, weights_only=False, map_location=device)
    teacher = build_teacher(cfg, saved["input_shapes"])
    teacher.load_state_dict(saved["state_dict"])
    modules: list[nn.Module] = [teacher]
    tnets = None
    if with_tnets:
        tnets = nn.ModuleDict(build_tnets(cfg))
        tpath = Path(job_dir) / "tnet.pt"
        if not tpath.is_file():
            raise StageError(f"T-Net checkpoint {tpath} does not exist (run `pkdot train-teacher` first)")
        tnets.load_state_dict(torch.load(tpath, weights_only=False, map_location=device)["state_dict"])
        modules.append(tnets)
    for m in modules:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return teacher.to(device), (tnets.to(device) if tnets is not None else None), saved["input_shapes"]


def load_unimodal(cfg: RunConfig, job_dir: Path, modality: str, device: torch.device | str = "cpu"):
    """The trained ``unimodal-<modality>`` model of a teacher job folder (phase 1), frozen, eval mode."""
    from pkdot.errors import StageError

    path = Path(job_dir) / f"unimodal-{modality}.pt"
    if not path.is_file():
        raise StageError(f"{path} does not exist (run `pkdot train-teacher` first)")
    saved = torch.load(path, weights_only=False, map_location=device)
    model = UnimodalModel(
        build_backbone(modality, tuple(saved["input_shape"]), cfg.model),
        cfg.data.num_outputs,
        cfg.data.is_regression,
        bounded=cfg.data.task != "regression",
    )
    model.load_state_dict(saved["state_dict"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)
