"""Training jobs (one per fold x seed [x loss]) and how their phases checkpoint and resume.

A job runs inside a Ray Train worker (or directly, in tests). It is made of *phases* (e.g. the unimodal
backbones, the fusion teacher, the T-Net); each finished phase is written to the job's folder (atomically, by
rank 0), so a restarted job loads finished phases and resumes the running one from its last epoch
checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pkdot.train.loops import FitState

if TYPE_CHECKING:
    from pkdot.config import RunConfig

log = logging.getLogger(__name__)

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
    """One unit of training: a fold, a seed and (for students) a distillation loss.

    ``group`` (teachers only, cross-fitted targets): the crossfit group of the fold's training subjects this
    teacher is trained *without*; it gives that group's distillation targets. None: the full-fold job.
    """

    key: str
    out_dir: str
    fold: int
    seed: int
    loss: str | None = None
    group: int | None = None

    @property
    def done_marker(self) -> Path:
        return Path(self.out_dir) / "DONE.json"

    def is_done(self) -> bool:
        return self.done_marker.is_file()


def teacher_jobs(cfg: RunConfig, folds: Any) -> list[Job]:
    """The teacher jobs of a run: one per (seed, fold), plus J per (seed, fold) with cross-fitted targets.

    ``folds``: a :class:`~pkdot.train.splits.FoldPlan`, a ``{seed: folds}`` mapping, or one list of folds for
    every seed of ``cfg.train.seeds``. A cross-fitting job ``teacher/fold-<k>/seed-<s>/without-<j>-of-<J>``
    trains on the fold's training subjects minus crossfit group j (``Fold.crossfit``).
    """
    from pkdot.train.cache import crossfit_groups_of, teacher_dir
    from pkdot.train.splits import as_plan

    run_dir = Path(cfg.run_dir)
    plan = as_plan(folds)
    groups = crossfit_groups_of(cfg)
    jobs = []
    for s, f in plan.pairs(cfg.train.seeds):
        base = f"teacher/fold-{f.index}/seed-{s}"
        jobs.append(Job(key=base, out_dir=str(teacher_dir(run_dir, f.index, s)), fold=f.index, seed=s))
        if groups is None:
            continue
        if len(f.crossfit) != groups:
            from pkdot.errors import StageError

            raise StageError(
                f"fold {f.index} of seed {s} has {len(f.crossfit)} crossfit groups, distill.crossfit_groups is "
                f"{groups} (the fold plan was made for another setting: rerun train-teacher)"
            )
        for j in range(groups):
            jobs.append(
                Job(
                    key=f"{base}/without-{j}-of-{groups}",
                    out_dir=str(teacher_dir(run_dir, f.index, s, j, groups)),
                    fold=f.index,
                    seed=s,
                    group=j,
                )
            )
    return jobs


def student_jobs(cfg: RunConfig, folds: Any, losses: list[str]) -> list[Job]:
    """One student job per (loss, seed, fold) of the fold plan (``folds`` as in :func:`teacher_jobs`)."""
    from pkdot.train.splits import as_plan
    from pkdot.train.student import student_dir

    plan = as_plan(folds)
    return [
        Job(
            key=f"student/{loss}/fold-{f.index}/seed-{s}",
            out_dir=str(student_dir(Path(cfg.run_dir), loss, f.index, s)),
            fold=f.index,
            seed=s,
            loss=loss,
        )
        for loss in losses
        for s, f in plan.pairs(cfg.train.seeds)
    ]


def teacher_checkpoints(job: Job) -> list[Path]:
    """The checkpoint files a finished teacher job leaves (cross-fitting jobs train no T-Net)."""
    names = ("teacher.pt", "tnet.pt") if job.group is None else ("teacher.pt",)
    return [Path(job.out_dir) / n for n in names]


def teacher_cost(jobs: list[Job]) -> dict[str, float]:
    """Counts and job-seconds (from each job's ``DONE.json``) of full-fold and cross-fitting teacher jobs.

    ``crossfit_jobs`` / ``crossfit_seconds`` are the extra cost of ``distill.teacher_targets = "crossfit"``.
    """
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

    def resume_for(self, phase: str) -> FitState | None:
        if self.resume and self.resume.get("phase") == phase:
            return self.resume["state"]
        return None

    def epoch_hook(self, phase: str) -> Callable[[FitState], None]:
        def hook(state: FitState) -> None:
            if self.on_epoch_end is not None:
                self.on_epoch_end(phase, state, dict(state.history[-1]))

        return hook

    def progress_hook(self, phase: str) -> Callable[[int, dict[str, float]], None] | None:
        if self.progress is None:
            return None
        fn = self.progress
        return lambda epoch, record: fn(phase, epoch, record)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def file_hash(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def state_to_bytes(state: FitState) -> bytes:
    buf = io.BytesIO()
    torch.save(state.__dict__, buf)
    return buf.getvalue()


def state_from_bytes(raw: bytes) -> FitState:
    d = torch.load(io.BytesIO(raw), weights_only=False)
    return FitState(**d)


def prediction_rows(
    *,
    model: str,
    fold: int,
    seed: int,
    split: str,
    sample_ids: list[str],
    subject_ids: np.ndarray,
    targets: np.ndarray,
    outputs: np.ndarray,
    embeddings: np.ndarray,
    regression: bool,
) -> pd.DataFrame:
    """Rows of a ``predictions.parquet`` (see docs/interfaces.md)."""
    if regression:
        y_pred = outputs[:, 0].astype(np.float64)
        scores = outputs.astype(np.float32)
    else:
        y_pred = outputs.argmax(1).astype(np.float64)
        scores = torch.softmax(torch.from_numpy(outputs.astype(np.float32)), dim=1).numpy()
    return pd.DataFrame(
        {
            "sample_id": sample_ids,
            "subject_id": [str(s) for s in subject_ids],
            "y_true": targets.astype(np.float64),
            "y_pred": y_pred,
            "scores": [row.tolist() for row in scores],
            "embedding": [row.astype(np.float32).tolist() for row in embeddings],
            "model": model,
            "fold": fold,
            "seed": seed,
            "split": split,
        }
    )


def split_predictions(
    *,
    model: str,
    job: Job,
    parts: dict[str, Any],
    forward: Callable[[Any, np.ndarray], Any],
    batch_size: int,
    regression: bool,
    modules: list[torch.nn.Module],
) -> list[pd.DataFrame]:
    """Prediction rows of one model on each named split (``{"val": SampleSet, "test": SampleSet}``).

    ``forward(sample_set, index) -> (outputs, embeddings)`` runs the model on rows ``index`` of a split.
    """
    from pkdot.train.loops import predict

    frames = []
    for split, part in parts.items():

        def run(idx: np.ndarray, p: Any = part) -> tuple[torch.Tensor, torch.Tensor]:
            return forward(p, idx)

        outputs, emb = predict(run, len(part), batch_size, modules)
        frames.append(
            prediction_rows(
                model=model,
                fold=job.fold,
                seed=job.seed,
                split=split,
                sample_ids=part.sample_ids,
                subject_ids=part.subject_ids,
                targets=part.targets,
                outputs=outputs,
                embeddings=emb,
                regression=regression,
            )
        )
    return frames


def write_predictions(frames: list[pd.DataFrame], path: Path) -> Path:
    df = pd.concat(frames, ignore_index=True)
    table = pa.Table.from_pandas(df, schema=PREDICTION_SCHEMA, preserve_index=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def write_history(path: Path, phases: dict[str, FitState], metric: str) -> None:
    """``history.json``: per phase the per-epoch records and the selected epoch."""
    doc: dict[str, Any] = {
        "metric": metric,
        "phases": {
            k: {
                "epochs": s.history,
                "best_epoch": s.best_epoch,
                "best_val": s.best_score,
                "resumed_from": list(getattr(s, "resumed_from", [])),
            }
            for k, s in phases.items()
        },
    }
    last = list(phases.values())[-1] if phases else None
    if last is not None:
        doc["epochs"] = last.history
        doc["best_epoch"] = last.best_epoch
    atomic_write_text(path, json.dumps(doc, indent=1, default=float))
