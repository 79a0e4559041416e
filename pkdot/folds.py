"""Subject-wise fold planning: pure functions over subject ids, no data loading.

Folds are over subjects (k-fold, leave-one-subject-out or the official Aff-Wild2 partition), validation subjects
carved from each fold's training subjects; each training seed draws its own k-fold partition (:func:`fold_seed`).
The authors' protocol (``train.folds: clips``, ``select_on: test``, ``teacher_scope: all``) gives ``leaky`` folds.
``RUN/splits.json`` holds one :meth:`Fold.to_dict` entry per (seed, fold); entries without ``"seed"`` serve every seed.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pkdot.errors import ConfigError, DatasetError, StageError
from pkdot.rundir import atomic_write_json

if TYPE_CHECKING:
    import pandas as pd

    from pkdot.config import RunConfig, TrainConfig

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Fold:
    """One fold: disjoint tuples of subject ids for training, validation (model selection) and test.

    ``seed``: the training seed whose partition this is (None: every seed's). ``crossfit``: J >= 2 disjoint
    groups covering ``train`` (cross-fitted teacher targets only). ``unit``: the manifest column of the ids
    (``sample_id`` under ``train.folds: clips``). ``leaky``: the parts may overlap."""

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int | None = None
    crossfit: tuple[tuple[str, ...], ...] = ()
    unit: Literal["subject_id", "sample_id"] = "subject_id"
    leaky: bool = False
    refit: bool = False  # the refit on every subject: its "test" split is its validation split again

    def __post_init__(self) -> None:
        where = f"fold {self.index}" + (f" of seed {self.seed}" if self.seed is not None else "")
        for name in SPLIT_NAMES:
            subjects = getattr(self, name)
            if not subjects:
                raise StageError(f"{where}: the {name} split has no subjects")
            if len(set(subjects)) != len(subjects):
                raise StageError(f"{where}: the {name} split lists a subject twice")
        if self.refit and self.test != self.val:
            raise StageError(f"{where}: a refit fold's test split is its validation split")
        for a, b in () if self.leaky else itertools.combinations(SPLIT_NAMES, 2):
            both = set(getattr(self, a)) & set(getattr(self, b))
            if both and not (self.refit and (a, b) == ("val", "test")):
                raise StageError(f"{where}: subjects {sorted(both)[:5]} are in both {a} and {b}")
        if self.crossfit:
            grouped = [s for g in self.crossfit for s in g]
            if any(not g for g in self.crossfit) or len(self.crossfit) < 2:
                raise StageError(f"{where}: crossfit needs >= 2 non-empty groups, got {len(self.crossfit)}")
            if len(set(grouped)) != len(grouped) or set(grouped) != set(self.train):
                raise StageError(
                    f"{where}: the crossfit groups must partition the training subjects (each in exactly one)"
                )

    def to_dict(self) -> dict[str, object]:
        """The ``splits.json`` entry (``seed``, ``crossfit_groups``, ``unit``, ``leaky``, ``refit`` when set)."""
        out: dict[str, object] = {} if self.seed is None else {"seed": self.seed}
        out |= {"fold": self.index, "train": list(self.train), "val": list(self.val), "test": list(self.test)}
        if self.crossfit:
            out["crossfit_groups"] = [list(g) for g in self.crossfit]
        if self.unit != "subject_id":
            out["unit"] = self.unit
        return out | ({"leaky": True} if self.leaky else {}) | ({"refit": True} if self.refit else {})

    def with_test_in_training(self) -> Fold:
        """The fold of a teacher under ``train.teacher_scope: all``: its test part added to its training part."""
        return replace(self, train=(*self.train, *self.test), crossfit=(), leaky=True)

    def group_of(self, subject: str) -> int:
        """Index of the crossfit group holding a training subject."""
        for j, group in enumerate(self.crossfit):
            if subject in group:
                return j
        raise StageError(f"fold {self.index}: subject {subject!r} is in no crossfit group")

    def without_group(self, group: int) -> Fold:
        """The fold a cross-fitting teacher trains on: ``train`` minus crossfit group ``group`` (val/test kept)."""
        if not 0 <= group < len(self.crossfit):
            raise StageError(
                f"fold {self.index}: no crossfit group {group} (the fold has {len(self.crossfit)} groups)"
            )
        held_out = set(self.crossfit[group])
        return replace(self, train=tuple(s for s in self.train if s not in held_out), crossfit=())


def _unique_subjects(subject_ids: Sequence[str]) -> list[str]:
    ids = list(subject_ids)
    if bad := [s for s in ids if not isinstance(s, str) or not s]:
        raise StageError(f"subject ids must be non-empty strings, got e.g. {bad[0]!r}")
    return sorted(set(ids))


def _carve_validation(rest: list[str], val_fraction: float, *key: int) -> tuple[tuple[str, ...], ...]:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"train.val_fraction must be in (0, 1), got {val_fraction}")
    n_val = min(max(1, int(round(val_fraction * len(rest)))), len(rest) - 1)
    rng = np.random.default_rng(list(key))
    chosen = set(rng.choice(np.asarray(rest, dtype=object), size=n_val, replace=False).tolist())
    return tuple(s for s in rest if s not in chosen), tuple(sorted(chosen))


def subject_folds(
    subject_ids: Sequence[str], scheme: int | Literal["loso"], *, val_fraction: float = 0.2, seed: int = 0
) -> list[Fold]:
    """Subject-independent folds: every subject in exactly one fold's test set; train/val/test disjoint.

    ``scheme`` ``k >= 2``: the sorted subjects, shuffled with ``seed``, cut into ``k`` test groups (sizes differ
    by at most 1); ``"loso"``: one fold per subject. Fold ``i``'s validation subjects are ``val_fraction`` of the
    rest (at least 1, leaving at least 1 for training), drawn with ``default_rng([seed, i])``."""
    subjects = _unique_subjects(subject_ids)
    n = len(subjects)
    if scheme == "loso":
        groups = [[s] for s in subjects]
    elif isinstance(scheme, int) and not isinstance(scheme, bool) and scheme >= 2:
        if n < scheme:
            raise ConfigError(
                f"train.folds={scheme}: subject {scheme}-fold needs at least {scheme} subjects, got {n}"
            )
        order = np.random.default_rng(seed).permutation(n)
        groups = [[subjects[i] for i in part] for part in np.array_split(order, scheme)]
    else:
        raise ConfigError(f"train.folds: expected an integer >= 2 or 'loso', got {scheme!r}")
    largest = max(len(g) for g in groups)
    if n - largest < 2:
        raise ConfigError(
            f"train.folds={scheme!r}: {n} subjects leave {n - largest} outside a test fold, but each fold needs at "
            f"least 1 training and 1 validation subject (use fewer folds or more subjects)"
        )
    folds = []
    for i, group in enumerate(groups):
        rest = [s for s in subjects if s not in set(group)]
        folds.append(Fold(i, *_carve_validation(rest, val_fraction, seed, i), tuple(sorted(group))))
    log.info("%d subject folds (%s) over %d subjects", len(folds), scheme, n)
    return folds


def clip_folds(
    sample_ids: Sequence[str], labels: Sequence[object] | None, *, val_fraction: float = 0.2, seed: int = 0
) -> list[Fold]:
    """The authors' folds (optimistic by construction): stratified 5-fold over samples, ignoring subjects.

    ``StratifiedKFold(5, shuffle=True, random_state=seed)`` on ``labels`` (None, e.g. regression:
    ``KFold``); validation carved as in :func:`subject_folds`; the folds hold sample ids."""
    from sklearn.model_selection import KFold, StratifiedKFold

    n_splits = 5
    ids = np.asarray(_unique_subjects(sample_ids), dtype=object)
    if len(ids) != len(sample_ids):
        raise StageError("train.folds='clips': sample ids repeat")
    if len(ids) < 2 * n_splits:
        raise ConfigError(f"train.folds='clips' needs at least {2 * n_splits} samples, got {len(ids)}")
    order = np.argsort(np.asarray(list(sample_ids), dtype=object), kind="stable")
    splitter = (KFold if labels is None else StratifiedKFold)(n_splits, shuffle=True, random_state=seed)
    y = np.zeros(len(ids)) if labels is None else np.asarray(list(labels))[order]
    folds = []
    for i, (rest, test) in enumerate(splitter.split(ids, y)):
        train, val = _carve_validation(ids[rest].tolist(), val_fraction, seed, i)
        folds.append(Fold(i, train, val, tuple(ids[test].tolist()), unit="sample_id"))
    log.info("%d clip folds over %d samples (subjects ignored)", len(folds), len(ids))
    return folds


def official_folds(
    subject_partition: Mapping[str, str], *, val_fraction: float = 0.2, seed: int = 0
) -> list[Fold]:
    """The official Aff-Wild2 protocol as one fold from each subject's (video's) partition: train on
    ``Train_Set`` (validation carved from it), test on ``Validation_Set`` (the challenge withholds test labels)."""
    train_partition, test_partition = "Train_Set", "Validation_Set"
    unknown = sorted({p for p in subject_partition.values() if p not in (train_partition, test_partition)})
    if unknown:
        raise ConfigError(
            f"train.folds='official': subjects in partitions {unknown} (expected {train_partition!r} or "
            f"{test_partition!r}; use train.folds=<k> or 'loso' for data without the official partitions)"
        )
    train_subjects = sorted(s for s, p in subject_partition.items() if p == train_partition)
    test_subjects = sorted(s for s, p in subject_partition.items() if p == test_partition)
    if len(train_subjects) < 2 or not test_subjects:
        raise ConfigError(
            f"train.folds='official' needs >= 2 {train_partition} subjects (training + validation) and >= 1 "
            f"{test_partition} subject, found {len(train_subjects)} and {len(test_subjects)} "
            "(use train.folds=<k> or 'loso')"
        )
    train, val = _carve_validation(train_subjects, val_fraction, seed, 0)
    log.info("official folds: %d train, %d val, %d test subjects", len(train), len(val), len(test_subjects))
    return [Fold(0, train, val, tuple(test_subjects))]


def refit_fold(subject_ids: Sequence[str], val_fraction: float, seed: int) -> Fold:
    """The one fold of a refit on every subject: ``val_fraction`` of them carved for epoch selection, the rest
    for training; its test split is the validation split again (nothing reports it)."""
    subjects = _unique_subjects(subject_ids)
    if len(subjects) < 2:
        raise ConfigError(
            f"train.refit: a refit needs at least 2 subjects (1 to train, 1 to validate), got {subjects}"
        )
    train, val = _carve_validation(subjects, val_fraction, seed, 0x7E717)
    return Fold(0, train, val, val, refit=True)


def fold_seed(scheme: int | str | None, run_seed: int, repeat_seed: int) -> int:
    """The seed of training seed ``repeat_seed``'s partition: ``SeedSequence([run_seed, repeat_seed])`` for
    k-fold and ``"clips"``, the run seed for ``"loso"`` and ``"official"`` (the same folds for every seed)."""
    if scheme in ("loso", "official"):
        return int(run_seed)
    if run_seed < 0 or repeat_seed < 0:
        raise ConfigError(
            f"seeds must be >= 0 for repeated k-fold, got run seed {run_seed}, seed {repeat_seed}"
        )
    return int(np.random.SeedSequence([int(run_seed), int(repeat_seed)]).generate_state(1)[0])


def assign_crossfit_groups(fold: Fold, groups: int, seed: int) -> Fold:
    """Cut a fold's training subjects into ``groups`` disjoint groups (sizes differ by at most one)."""
    train = sorted(fold.train)
    if len(train) < groups:
        raise ConfigError(
            f"distill.crossfit_groups={groups}: fold {fold.index} has only {len(train)} training subjects "
            f"(need at least one per group; use fewer groups or more subjects)"
        )
    order = np.random.default_rng([int(seed), fold.index, groups]).permutation(len(train))
    cut = tuple(tuple(sorted(train[i] for i in part)) for part in np.array_split(order, groups))
    return replace(fold, crossfit=cut)


def crossfit_groups_of(cfg: RunConfig) -> int | None:
    """J when the run cross-fits its teacher targets (``distill.teacher_targets = "crossfit"``), else None."""
    return cfg.distill.crossfit_groups if cfg.distill.teacher_targets == "crossfit" else None


@dataclass(frozen=True)
class FoldPlan:
    """The folds of every training seed: ``by_seed[s]`` lists seed ``s``'s folds; ``shared`` serves every seed."""

    by_seed: Mapping[int, tuple[Fold, ...]]
    shared: tuple[Fold, ...] | None = None

    @property
    def seeds(self) -> list[int]:
        return sorted(self.by_seed)

    def folds(self, seed: int | None = None) -> list[Fold]:
        """The folds of ``seed`` (``None``: when the plan has one partition for every seed)."""
        if self.shared is not None:
            return list(self.shared)
        if seed is None:
            if len(self.by_seed) == 1:
                return list(next(iter(self.by_seed.values())))
            raise StageError(f"the fold plan has folds for seeds {self.seeds}: say which seed's folds")
        if seed not in self.by_seed:
            raise StageError(
                f"the fold plan has no folds for seed {seed} (seeds {self.seeds}); rerun train-teacher"
            )
        return list(self.by_seed[seed])

    def fold(self, seed: int, index: int) -> Fold:
        for f in self.folds(seed):
            if f.index == index:
                return f
        raise StageError(f"the fold plan has no fold {index} for seed {seed}")

    def pairs(self, seeds: Sequence[int]) -> list[tuple[int, Fold]]:
        """Every (seed, fold) of ``seeds``, seed-major."""
        return [(s, f) for s in seeds for f in self.folds(s)]


def as_plan(folds: FoldPlan | Mapping[int, Sequence[Fold]] | Sequence[Fold]) -> FoldPlan:
    """A :class:`FoldPlan` from a plan, a ``{seed: folds}`` mapping, or one list of folds for every seed."""
    if isinstance(folds, FoldPlan):
        return folds
    if isinstance(folds, Mapping):
        return FoldPlan(
            by_seed={int(s): tuple(replace(f, seed=int(s)) for f in fs) for s, fs in folds.items()}
        )
    return FoldPlan(by_seed={}, shared=tuple(folds))


def subject_partitions(frame: pd.DataFrame) -> dict[str, str]:
    """Each subject's manifest ``partition`` (each subject in one)."""
    pairs = frame[["subject_id", "partition"]].astype(str).drop_duplicates()
    counts = pairs.groupby("subject_id")["partition"].nunique()
    if both := sorted(counts[counts > 1].index):
        raise DatasetError(
            f"manifest: subjects {both[:10]} ({len(both)} in all) have samples in more than one partition "
            "(expected each video/subject in exactly one of Train_Set and Validation_Set)"
        )
    return dict(zip(pairs["subject_id"], pairs["partition"], strict=True))


def fold_plan(
    frame: pd.DataFrame, train: TrainConfig, seed: int, stratify: str | None = "label"
) -> list[Fold]:
    """The folds of a manifest's samples by ``train.folds`` (``clips``: stratified on the ``stratify`` column
    when the frame has it); ``select_on: test`` makes each fold's validation part its test part (no max_folds)."""
    if train.folds == "clips":
        labels = frame[stratify].tolist() if stratify in frame.columns else None
        sample_ids = frame["sample_id"].astype(str).tolist()
        folds = clip_folds(sample_ids, labels, val_fraction=train.val_fraction, seed=seed)
    elif train.folds == "official":
        folds = official_folds(subject_partitions(frame), val_fraction=train.val_fraction, seed=seed)
    else:
        subjects = sorted(set(frame["subject_id"].astype(str)))
        try:
            folds = subject_folds(subjects, train.folds or 5, val_fraction=train.val_fraction, seed=seed)
        except ConfigError as exc:
            raise ConfigError(
                f"{exc} [the manifest has {len(frame)} samples from {len(subjects)} subject(s): "
                f"{subjects[:10]}{' ...' if len(subjects) > 10 else ''}]"
            ) from None
    return [replace(f, val=f.test, leaky=True) for f in folds] if train.select_on == "test" else folds


def plan_run_folds(cfg: RunConfig, frame: pd.DataFrame) -> FoldPlan:
    """The fold plan of a run over the manifest rows ``frame``: for each of ``train.seeds``, :func:`fold_plan`
    seeded by :func:`fold_seed`, its first ``train.max_folds`` folds, with crossfit groups when the run
    cross-fits its teacher targets (seeded like the folds)."""
    crossfit = crossfit_groups_of(cfg)
    by_seed: dict[int, tuple[Fold, ...]] = {}
    stratify = None if cfg.data.is_regression else "label"
    for s in cfg.train.seeds:
        partition_seed = fold_seed(cfg.train.folds, cfg.seed, s)
        folds = fold_plan(frame, cfg.train, partition_seed, stratify)[: cfg.train.max_folds]
        folds = [replace(f, seed=s) for f in folds]
        if crossfit is not None:
            folds = [assign_crossfit_groups(f, crossfit, partition_seed) for f in folds]
        by_seed[s] = tuple(folds)
    return FoldPlan(by_seed=by_seed)


def save_folds(folds: FoldPlan | Mapping[int, Sequence[Fold]] | Sequence[Fold], path: str | Path) -> None:
    """Write ``splits.json`` atomically: a plan, a ``{seed: folds}`` mapping, or a list written as it is."""
    plan = as_plan(folds)
    entries = [f.to_dict() for f in plan.shared or ()] + [f.to_dict() for _, f in plan.pairs(plan.seeds)]
    atomic_write_json(path, entries)


_OPTIONAL_KEYS = {"seed", "crossfit_groups", "unit", "leaky", "refit"}


def _is_id_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def _fold_entry(path: Path, k: int, entry: object) -> Fold:
    required = {"fold", *SPLIT_NAMES}
    if not isinstance(entry, dict) or not required <= set(entry) <= required | _OPTIONAL_KEYS:
        raise StageError(
            f"splits file {path}: entry {k} must have the keys fold, train, val, test "
            f"(and optionally seed, crossfit_groups, unit, leaky, refit)"
        )
    index, seed = entry["fold"], entry.get("seed")
    for name, value in (("fold", index), ("seed", seed)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise StageError(f"splits file {path}: entry {k}: {name!r} must be an integer, got {value!r}")
    where = f"splits file {path}: fold {index}"
    if bad := [name for name in SPLIT_NAMES if not _is_id_list(entry[name])]:
        raise StageError(f"{where}: {bad[0]!r} must be a list of subject ids (strings)")
    groups = entry.get("crossfit_groups", [])
    if not isinstance(groups, list) or not all(map(_is_id_list, groups)):
        raise StageError(f"{where}: 'crossfit_groups' must be lists of subject ids")
    unit, leaky = entry.get("unit", "subject_id"), entry.get("leaky", False)
    if unit not in ("subject_id", "sample_id") or not isinstance(leaky, bool):
        raise StageError(f"{where}: bad 'unit' {unit!r} or 'leaky' {leaky!r}")
    splits = (tuple(entry[name]) for name in SPLIT_NAMES)
    try:
        return Fold(index, *splits, seed, tuple(map(tuple, groups)), unit, leaky, entry.get("refit") is True)
    except StageError as exc:
        raise StageError(f"splits file {path}: {exc}") from exc


def load_fold_plan(path: str | Path) -> FoldPlan:
    """Read ``splits.json`` into a :class:`FoldPlan` (:class:`StageError` naming the file and entry)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"splits file {path} does not exist (the pipeline writes it before training)")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"splits file {path} is not valid JSON: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise StageError(f"splits file {path}: expected a non-empty list of folds")
    folds = [_fold_entry(path, k, e) for k, e in enumerate(entries)]
    seeded = {f.seed is not None for f in folds}
    if len(seeded) > 1:
        raise StageError(f"splits file {path}: some entries have a 'seed' and others do not")
    keys = [(f.seed, f.index) for f in folds]
    if len(set(keys)) != len(keys):
        raise StageError(f"splits file {path}: (seed, fold) entries repeat: {keys}")
    if seeded == {False}:
        return FoldPlan(by_seed={}, shared=tuple(folds))
    seeds = dict.fromkeys(int(f.seed) for f in folds)  # type: ignore[arg-type]
    return FoldPlan(by_seed={s: tuple(f for f in folds if f.seed == s) for s in seeds})


def load_folds(path: str | Path, seed: int | None = None) -> list[Fold]:
    """The folds of ``seed`` in ``splits.json`` (``None``: the file must hold one partition for every seed)."""
    return load_fold_plan(path).folds(seed)


def describe_protocol(scheme: int | str | None, splits_path: str | Path) -> str:
    """One sentence naming the evaluation protocol recorded in ``splits.json`` (for the report)."""
    plan = load_fold_plan(splits_path)
    folds = plan.folds(None if plan.shared is not None else plan.seeds[0])
    if scheme == "official":
        f = folds[0]
        return (
            f"official Aff-Wild2 partitions: trained on `Train_Set` ({len(f.train)} videos, {len(f.val)} "
            f"more held out for validation/model selection), tested on `Validation_Set` ({len(f.test)} videos)"
        )
    on_test = all(set(f.val) == set(f.test) for f in folds)
    if scheme == "clips":
        selection = "; epochs selected on the test clips" if on_test else ""
        return (
            f"stratified {len(folds)}-fold cross-validation over clips, ignoring subjects (the same subjects are "
            f"in training and test{selection})"
        )
    name = "leave-one-subject-out" if scheme == "loso" else f"subject {scheme}-fold"
    many = len(plan.seeds) > 1 and scheme != "loso"
    repeats = f", drawn anew for each of {len(plan.seeds)} seeds" if many else ""
    selection = "each model's epoch selected on the test subjects themselves"
    if not on_test:
        selection = "validation subjects carved from each fold's training subjects"
    return (
        f"{name} cross-validation ({len(folds)} folds evaluated{repeats}; test subjects never seen in "
        f"training, {selection})"
    )
