"""In-memory training data: feature arrays per modality (numpy until a batch is taken), targets, subjects,
and a fold's train / val / test parts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pkdot.config import RunConfig
from pkdot.data.manifest import read_manifest
from pkdot.errors import StageError
from pkdot.features.schema import DEFAULT_TENSOR, read_sample_ids, read_tensors
from pkdot.folds import Fold, FoldPlan, plan_run_folds, save_folds
from pkdot.rundir import RunDir


def tensor_column(cfg: RunConfig, modality: str) -> str:
    """Which tensor column of a modality's feature table the models read."""
    if cfg.data.dataset == "table":
        return "vector"
    if modality == "physio":
        return cfg.model.physio_input
    return DEFAULT_TENSOR[modality]


@dataclass
class SampleSet:
    """Samples (rows) with their modality arrays and targets."""

    sample_ids: list[str]
    subject_ids: np.ndarray
    targets: np.ndarray  # (N,) int64 class index or float32 regression target
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, mask: np.ndarray) -> SampleSet:
        idx = np.flatnonzero(mask)
        arrays = {m: a[idx] for m, a in self.arrays.items()}
        return SampleSet([self.sample_ids[i] for i in idx], self.subject_ids[idx], self.targets[idx], arrays)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: tuple(a.shape[1:]) for m, a in self.arrays.items()}


def targets_from_manifest(cfg: RunConfig, manifest: pd.DataFrame) -> np.ndarray:
    if cfg.data.is_regression:
        column = cfg.data.target_column
        values = manifest[column].to_numpy(dtype=np.float32)
        if np.isnan(values).any():
            raise StageError(f"manifest: column {column!r} has missing values for a regression task")
        return values
    labels = manifest["label"].to_numpy(dtype=np.int64)
    if (bad := labels[(labels < 0) | (labels >= cfg.data.num_outputs)]).size:
        raise StageError(
            f"manifest: label {bad[0]} outside 0..{cfg.data.num_outputs - 1} for task {cfg.data.task!r}"
        )
    return labels


def load_samples(
    cfg: RunConfig, run_dir: Path | None = None, modalities: Sequence[str] | None = None
) -> SampleSet:
    """All extracted samples of the run (those present in every modality table), in manifest order."""
    run = RunDir(run_dir or cfg.run_dir)
    mods = list(modalities) if modalities is not None else cfg.data.modalities
    manifest = read_manifest(run.manifest)
    for m in mods:
        manifest = manifest[manifest["sample_id"].isin(set(read_sample_ids(run.feature_table(m))))]
    manifest = manifest.reset_index(drop=True)
    if manifest.empty:
        raise StageError(f"{run.root}: no sample has features for all of {mods} (run `pkdot extract`)")
    ids = manifest["sample_id"].tolist()
    arrays = {m: read_tensors(run.feature_table(m), tensor_column(cfg, m), ids)[1] for m in mods}
    subjects = manifest["subject_id"].astype(str).to_numpy()
    return SampleSet(ids, subjects, targets_from_manifest(cfg, manifest), arrays)


@dataclass
class FoldData:
    """The train / val / test parts of one subject-independent fold."""

    fold: Fold
    train: SampleSet
    val: SampleSet
    test: SampleSet


def split_fold(samples: SampleSet, fold: Fold) -> FoldData:
    """The fold's parts, matched on the fold's unit (subject ids; sample ids under ``train.folds: clips``)."""
    ids = samples.subject_ids if fold.unit == "subject_id" else np.asarray(samples.sample_ids, dtype=object)
    parts = {}
    for name, subjects in (("train", fold.train), ("val", fold.val), ("test", fold.test)):
        mask = np.isin(ids, np.asarray(subjects, dtype=object))
        if not mask.any():
            raise StageError(f"fold {fold.index}: no samples for the {name} ids {list(subjects)[:10]}")
        parts[name] = samples.subset(mask)
    return FoldData(fold=fold, **parts)


def write_run_folds(cfg: RunConfig, run_dir: Path | None = None) -> FoldPlan:
    """The run's fold plan (:func:`pkdot.folds.plan_run_folds` over every sample with features for all
    modalities), written to ``RUN/splits.json``."""
    run = RunDir(run_dir or cfg.run_dir)
    samples = load_samples(cfg, run.root)
    manifest = read_manifest(run.manifest)
    plan = plan_run_folds(cfg, manifest[manifest["sample_id"].isin(samples.sample_ids)])
    save_folds(plan, run.splits)
    return plan
