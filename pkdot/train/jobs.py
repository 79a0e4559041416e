"""Training jobs (one per fold x seed [x loss]) and what they share: context, checkpoints, prediction files.

A job runs in a Ray Train worker (or directly, in tests) as *phases*; rank 0 writes each finished phase to the
job's folder, so a restarted job loads finished phases and resumes the running one from its last checkpoint."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from pkdot.errors import StageError
from pkdot.folds import Fold, FoldPlan, as_plan, crossfit_groups_of
from pkdot.rundir import DONE, HISTORY, METRICS, RunDir, atomic_write_json, atomic_write_parquet
from pkdot.train.data import FoldData
from pkdot.train.loops import FitState, predict, task_metric

if TYPE_CHECKING:
    from pkdot.config import RunConfig

PREDICTION_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("subject_id", pa.string()),
        ("y_true", pa.float64()),
        ("y_pred", pa.float64()),
        ("scores", pa.list_(pa.float32())),
        ("embedding", pa.list_(pa.float32())),
        ("model", pa.string()),
        ("fold", pa.int64()),
        ("seed", pa.int64()),
        ("split", pa.string()),
    ]
)


@dataclass(frozen=True)
class Job:
    """One unit of training: a fold, a seed and (for students) a distillation loss. ``group`` (cross-fitting
    teachers): the crossfit group this teacher is trained *without* (it gives that group's targets); None: the
    full-fold job. ``with_test`` (``train.teacher_scope: all``): train on the test part too."""

    key: str
    out_dir: str
    fold: int
    seed: int
    loss: str | None = None
    group: int | None = None
    with_test: bool = False

    @property
    def done_marker(self) -> Path:
        return Path(self.out_dir) / DONE

    def is_done(self) -> bool:
        return self.done_marker.is_file()


def teacher_jobs(cfg: RunConfig, folds: Any) -> list[Job]:
    """The teacher jobs of a run: one per (seed, fold), plus J per (seed, fold) with cross-fitted targets (job
    ``j`` trains without ``Fold.crossfit[j]``). ``folds``: anything :func:`~pkdot.folds.as_plan` takes."""
    run = RunDir(cfg.run_dir)
    groups = crossfit_groups_of(cfg)
    leak = cfg.train.teacher_scope == "all"
    jobs = []
    for s, f in as_plan(folds).pairs(cfg.train.seeds):
        base = f"teacher/fold-{f.index}/seed-{s}"
        jobs.append(Job(base, str(run.teacher(f.index, s)), f.index, s, with_test=leak))
        if groups is None:
            continue
        if len(f.crossfit) != groups:
            raise StageError(
                f"fold {f.index} of seed {s} has {len(f.crossfit)} crossfit groups, distill.crossfit_groups is "
                f"{groups} (the fold plan was made for another setting: rerun train-teacher)"
            )
        for j in range(groups):
            out_dir = str(run.teacher(f.index, s, j, groups))
            jobs.append(Job(f"{base}/without-{j}-of-{groups}", out_dir, f.index, s, group=j, with_test=leak))
    return jobs


def student_jobs(cfg: RunConfig, folds: Any, losses: list[str]) -> list[Job]:
    """One student job per (loss, seed, fold) of the fold plan (``folds`` as in :func:`teacher_jobs`)."""
    rd = RunDir(cfg.run_dir)
    pairs = [(s, f.index) for s, f in as_plan(folds).pairs(cfg.train.seeds)]
    return [
        Job(f"student/{loss}/fold-{k}/seed-{s}", str(rd.student(loss, k, s)), k, s, loss=loss)
        for loss in losses
        for s, k in pairs
    ]


def fold_for_job(plan: FoldPlan, job: Job) -> Fold:
    """The fold a training job trains on: its (seed, fold), minus its crossfit group when it has one, plus
    its test part for a teacher under ``train.teacher_scope: all``."""
    fold = plan.fold(job.seed, job.fold)
    fold = fold if job.group is None else fold.without_group(job.group)
    return fold.with_test_in_training() if job.with_test else fold


def teacher_cost(jobs: list[Job]) -> dict[str, float]:
    """Counts and job-seconds (from each job's ``DONE.json``) of full-fold and cross-fitting teacher jobs.
    ``crossfit_jobs`` / ``crossfit_seconds`` are the extra cost of ``distill.teacher_targets = "crossfit"``."""
    out = {"teacher_jobs": 0, "teacher_seconds": 0.0, "crossfit_jobs": 0, "crossfit_seconds": 0.0}
    for job in jobs:
        seconds = float(json.loads(job.done_marker.read_text()).get("seconds", 0.0)) if job.is_done() else 0.0
        prefix = "teacher" if job.group is None else "crossfit"
        out[f"{prefix}_jobs"] += 1
        out[f"{prefix}_seconds"] = round(out[f"{prefix}_seconds"] + seconds, 2)
    return out


@dataclass
class WorkerContext:
    """What a job needs to know about where it runs."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: called after every epoch with (phase key, FitState, metrics); the Ray runner reports a checkpoint
    on_epoch_end: Callable[[str, FitState, dict[str, float]], None] | None = None
    #: a resumable state from a checkpoint: {"phase": key, "state": FitState}
    resume: dict[str, Any] | None = None
    #: wraps a module for data-parallel training (Ray's prepare_model); identity by default
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    progress: Callable[[str, int, dict[str, float]], None] | None = None

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def fit_hooks(self, phase: str) -> dict[str, Any]:
        """:func:`~pkdot.train.loops.fit`'s ``on_epoch_end``, ``resume`` and ``progress`` for ``phase``."""
        report, progress = self.on_epoch_end, self.progress
        return {
            "on_epoch_end": None if report is None else lambda s: report(phase, s, dict(s.history[-1])),
            "resume": self.resume["state"] if self.resume and self.resume.get("phase") == phase else None,
            "progress": None if progress is None else lambda epoch, record: progress(phase, epoch, record),
        }


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint of tensors and plain values (``torch.load(weights_only=True)``: a pickled object is refused
    with a :class:`StageError`, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(
            f"checkpoint {path} does not exist (run `pkdot train-teacher` / `pkdot distill` first)"
        )
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise StageError(
            f"checkpoint {path} is not a state_dict of tensors and plain values (refused: pkdot never unpickles "
            f"objects from a run directory; retrain to rewrite it): {str(exc).splitlines()[0]}"
        ) from exc


def split_predictions(
    model: str,
    job: Job,
    data: FoldData,
    forward: Callable[[Any, np.ndarray], Any],
    batch_size: int,
    regression: bool,
    modules: list[torch.nn.Module],
) -> list[pd.DataFrame]:
    """``predictions.parquet`` rows (:data:`PREDICTION_SCHEMA`) of one model on the val and test parts;
    ``forward(sample_set, index) -> (outputs, embeddings)``."""
    frames = []
    for split, part in (("val", data.val), ("test", data.test)):
        outputs, emb = predict(lambda idx, p=part: forward(p, idx), len(part), batch_size, modules)
        if regression:
            y_pred, scores = outputs[:, 0].astype(np.float64), outputs.astype(np.float32)
        else:
            y_pred = outputs.argmax(1).astype(np.float64)
            scores = torch.softmax(torch.from_numpy(outputs.astype(np.float32)), dim=1).numpy()
        frame = {
            "sample_id": part.sample_ids,
            "subject_id": [str(s) for s in part.subject_ids],
            "y_true": part.targets.astype(np.float64),
            "y_pred": y_pred,
            "scores": [row.tolist() for row in scores],
            "embedding": [row.astype(np.float32).tolist() for row in emb],
        }
        frames.append(pd.DataFrame(frame | dict(model=model, fold=job.fold, seed=job.seed, split=split)))
    return frames


def val_metric(
    forward: Callable, data: FoldData, batch: int, model: torch.nn.Module, regression: bool
) -> float:
    """The task metric of ``forward`` (as in :func:`split_predictions`) on the val part, in eval mode."""
    outputs, _ = predict(lambda idx: forward(data.val, idx), len(data.val), batch, [model])
    return task_metric(data.val.targets, outputs, regression)


def frame_metric(frame: pd.DataFrame, regression: bool) -> float:
    """The task metric of one :func:`split_predictions` frame."""
    return task_metric(frame["y_true"].to_numpy(), np.stack(frame["scores"].to_numpy()), regression)


def write_job_files(
    job: Job,
    frames: list[pd.DataFrame] | None,
    phases: dict[str, FitState],
    metrics: dict[str, float],
    metric: str,
) -> None:
    """Rank 0's files of a finished job but ``DONE.json``: ``predictions.parquet`` (unless ``frames`` is None),
    ``history.json`` (per phase the per-epoch records and the selected epoch, the last phase's also at the top
    level), ``metrics.json``."""
    out = Path(job.out_dir)
    if frames is not None:
        df = pd.concat(frames, ignore_index=True)
        table = pa.Table.from_pandas(df, schema=PREDICTION_SCHEMA, preserve_index=False)
        atomic_write_parquet(table, out / "predictions.parquet")
    history: dict[str, Any] = {"metric": metric, "phases": {}}
    for k, s in phases.items():
        record = {"epochs": s.history, "best_epoch": s.best_epoch, "best_val": s.best_score}
        history["phases"][k] = record | {"resumed_from": list(s.resumed_from)}
        history |= {"epochs": s.history, "best_epoch": s.best_epoch}
    atomic_write_json(out / HISTORY, history)
    atomic_write_json(out / METRICS, metrics)
