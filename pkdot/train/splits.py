"""Subject-wise folds: every subject is tested exactly once and never shares a fold's splits with itself.

The authors' public code split Biovid by *samples* (the same person in train and test) and selected the best
epoch on the test fold. Here folds are over subjects (subject k-fold or leave-one-subject-out), and each fold's
validation subjects, used for model selection, are carved from its training subjects.

Repeated cross-validation: each training seed draws its own subject k-fold partition (:func:`fold_seed`), so the
runs of different seeds are different resamplings rather than re-runs of one split. Leave-one-subject-out and the
official Aff-Wild2 partition have a single possible test assignment: their folds (validation carve-out
included) are the same for every seed.

``RUN/splits.json`` holds ``[{"seed": s, "fold": k, "train": [subject, ..], "val": [..], "test": [..]}, ...]``:
one entry per (seed, fold); with cross-fitted teacher targets each entry also has ``"crossfit_groups"`` (the
training subjects cut into J groups, see :func:`assign_crossfit_groups`). A file of entries without ``"seed"``
(written before folds were per seed) gives the same folds to every seed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from pkdot.errors import ConfigError, StageError

if TYPE_CHECKING:
    from pkdot.config import RunConfig
    from pkdot.train.jobs import Job

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Fold:
    """One fold: disjoint tuples of subject ids for training, validation (model selection) and test.

    ``seed`` is the training seed whose partition this fold belongs to (None: shared by every seed).
    ``crossfit`` (empty unless teacher targets are cross-fitted) cuts the training subjects into J disjoint
    groups that together cover ``train``.
    """

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int | None = None
    crossfit: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        where = f"fold {self.index}" + (f" of seed {self.seed}" if self.seed is not None else "")
        for name in SPLIT_NAMES:
            subjects = getattr(self, name)
            if not subjects:
                raise StageError(f"{where}: the {name} split has no subjects")
            if len(set(subjects)) != len(subjects):
                raise StageError(f"{where}: the {name} split lists a subject twice")
        for i, a in enumerate(SPLIT_NAMES):
            for b in SPLIT_NAMES[i + 1 :]:
                both = set(getattr(self, a)) & set(getattr(self, b))
                if both:
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
        """The ``splits.json`` entry ``{["seed"], "fold", "train", "val", "test", ["crossfit_groups"]}``."""
        out: dict[str, object] = {} if self.seed is None else {"seed": self.seed}
        out |= {"fold": self.index, "train": list(self.train), "val": list(self.val), "test": list(self.test)}
        if self.crossfit:
            out["crossfit_groups"] = [list(g) for g in self.crossfit]
        return out

    def group_of(self, subject: str) -> int:
        """Index of the crossfit group holding a training subject (StageError if none does)."""
        for j, group in enumerate(self.crossfit):
            if subject in group:
                return j
        raise StageError(f"fold {self.index}: subject {subject!r} is in no crossfit group")

    def without_group(self, group: int) -> Fold:
        """The fold a cross-fitting teacher trains on: ``train`` minus crossfit group ``group``.

        Validation and test subjects are unchanged (the held-out group is in no split of the result).
        """
        if not 0 <= group < len(self.crossfit):
            raise StageError(
                f"fold {self.index}: no crossfit group {group} (the fold has {len(self.crossfit)} groups)"
            )
        held_out = set(self.crossfit[group])
        return Fold(
            index=self.index,
            train=tuple(s for s in self.train if s not in held_out),
            val=self.val,
            test=self.test,
            seed=self.seed,
        )


def _unique_subjects(subject_ids: Sequence[str]) -> list[str]:
    ids = list(subject_ids)
    bad = [s for s in ids if not isinstance(s, str) or not s]
    if bad:
        raise StageError(f"subject ids must be non-empty strings, got e.g. {bad[0]!r}")
    return sorted(set(ids))


def _carve_validation(
    rest: list[str], val_fraction: float, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    n_val = min(max(1, int(round(val_fraction * len(rest)))), len(rest) - 1)
    chosen = set(rng.choice(np.asarray(rest, dtype=object), size=n_val, replace=False).tolist())
    return [s for s in rest if s not in chosen], sorted(chosen)


def subject_folds(
    subject_ids: Sequence[str],
    scheme: int | Literal["loso"],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> list[Fold]:
    """Subject-independent folds.

    Parameters
    ----------
    subject_ids : sequence of str
        Subject ids (one per sample, or unique; duplicates are merged).
    scheme : int or "loso"
        ``k >= 2``: subject k-fold. The sorted subjects are shuffled with ``seed`` and cut into ``k`` groups of
        sizes differing by at most 1; group ``i`` is fold ``i``'s test set. ``"loso"``: one fold per subject,
        in sorted order.
    val_fraction : float
        Fraction of each fold's remaining subjects held out for validation, rounded, at least 1, and leaving
        at least 1 training subject.
    seed : int
        Seed of the shuffle and of the validation draw (fold ``i`` draws with ``default_rng([seed, i])``).

    Returns
    -------
    list of Fold
        Every subject appears in exactly one fold's test set; in each fold train, val and test are disjoint
        and cover all subjects.

    Raises
    ------
    ConfigError
        Unknown scheme, ``val_fraction`` outside (0, 1), or too few subjects for the scheme (each fold needs
        at least one test, one validation and one training subject).
    """
    subjects = _unique_subjects(subject_ids)
    n = len(subjects)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"train.val_fraction must be in (0, 1), got {val_fraction}")
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
        test = set(group)
        rest = [s for s in subjects if s not in test]
        train, val = _carve_validation(rest, val_fraction, np.random.default_rng([seed, i]))
        folds.append(Fold(index=i, train=tuple(train), val=tuple(val), test=tuple(sorted(test))))
    log.info("%d subject folds (%s) over %d subjects", len(folds), scheme, n)
    return folds


def fold_seed(scheme: int | str | None, run_seed: int, repeat_seed: int) -> int:
    """The seed of the subject partition used by training seed ``repeat_seed`` of a run seeded ``run_seed``.

    Subject k-fold (``scheme`` an int, or None = 5): a different partition per (run seed, training seed), drawn
    from ``SeedSequence([run_seed, repeat_seed])`` (repeated subject k-fold). ``"loso"`` and ``"official"``:
    the run seed, for every training seed — their test assignment is fixed, and so is their validation
    carve-out, which keeps them deterministic and identical across seeds.
    """
    if scheme in ("loso", "official"):
        return int(run_seed)
    if run_seed < 0 or repeat_seed < 0:
        raise ConfigError(
            f"seeds must be >= 0 for repeated k-fold, got run seed {run_seed}, seed {repeat_seed}"
        )
    return int(np.random.SeedSequence([int(run_seed), int(repeat_seed)]).generate_state(1)[0])


def assign_crossfit_groups(fold: Fold, groups: int, seed: int) -> Fold:
    """Cut a fold's training subjects into ``groups`` disjoint groups (sizes differ by at most one).

    The sorted training subjects are permuted with ``default_rng([seed, fold.index, groups])`` and split
    with ``numpy.array_split``; each group is sorted. Raises :class:`ConfigError` with fewer training subjects
    than groups (``distill.crossfit_groups``).
    """
    train = sorted(fold.train)
    if groups < 2:
        raise ConfigError(f"distill.crossfit_groups must be >= 2, got {groups}")
    if len(train) < groups:
        raise ConfigError(
            f"distill.crossfit_groups={groups}: fold {fold.index} has only {len(train)} training subjects "
            f"(need at least one per group; use fewer groups or more subjects)"
        )
    order = np.random.default_rng([int(seed), fold.index, groups]).permutation(len(train))
    cut = tuple(tuple(sorted(train[i] for i in part)) for part in np.array_split(order, groups))
    return Fold(fold.index, fold.train, fold.val, fold.test, seed=fold.seed, crossfit=cut)


@dataclass(frozen=True)
class FoldPlan:
    """The folds of every training seed: ``by_seed[s]`` lists seed ``s``'s folds.

    ``shared`` (from a ``splits.json`` without seeds, or a plain list of folds) serves every seed.
    """

    by_seed: Mapping[int, tuple[Fold, ...]]
    shared: tuple[Fold, ...] | None = None

    @property
    def seeds(self) -> list[int]:
        return sorted(self.by_seed)

    def folds(self, seed: int | None = None) -> list[Fold]:
        """The folds of ``seed`` (``None``: allowed when the plan has one partition for every seed)."""
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
        """Fold ``index`` of ``seed``'s partition."""
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
        by_seed = {}
        for s, fs in folds.items():
            by_seed[int(s)] = tuple(f if f.seed == s else replace(f, seed=int(s)) for f in fs)
        return FoldPlan(by_seed=by_seed)
    return FoldPlan(by_seed={}, shared=tuple(folds))


def fold_for_job(plan: FoldPlan | Sequence[Fold], job: Job) -> Fold:
    """The fold a training job trains on: its (seed, fold), minus its crossfit group when it has one."""
    fold = as_plan(plan).fold(job.seed, job.fold)
    group = getattr(job, "group", None)
    return fold if group is None else fold.without_group(group)


def save_folds(folds: FoldPlan | Mapping[int, Sequence[Fold]] | Sequence[Fold], path: Path) -> None:
    """Write ``splits.json`` atomically (a temp file in the same folder, then rename).

    ``folds``: a :class:`FoldPlan`, a ``{seed: [Fold, ...]}`` mapping (entries get ``"seed"``), or a list of
    folds (written as they are: with ``"seed"`` only where a fold has one).
    """
    if isinstance(folds, FoldPlan | Mapping):
        plan = as_plan(folds)
        entries = [f.to_dict() for f in plan.shared] if plan.shared is not None else []
        entries += [f.to_dict() for s in plan.seeds for f in plan.by_seed[s]]
    else:
        entries = [f.to_dict() for f in folds]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(path)


_OPTIONAL_KEYS = {"seed", "crossfit_groups"}


def load_fold_plan(path: Path) -> FoldPlan:
    """Read ``splits.json`` into a :class:`FoldPlan`; raises :class:`StageError` naming the file and entry."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"splits file {path} does not exist (the pipeline writes it before training)")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"splits file {path} is not valid JSON: {exc}") from exc
    if not isinstance(entries, list) or not entries:
        raise StageError(f"splits file {path}: expected a non-empty list of folds")
    folds: list[Fold] = []
    for k, entry in enumerate(entries):
        required = {"fold", *SPLIT_NAMES}
        if not isinstance(entry, dict) or not required <= set(entry) <= required | _OPTIONAL_KEYS:
            raise StageError(
                f"splits file {path}: entry {k} must have the keys fold, train, val, test "
                f"(and optionally seed, crossfit_groups)"
            )
        index, seed = entry["fold"], entry.get("seed")
        for name, value in (("fold", index), ("seed", seed)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise StageError(f"splits file {path}: entry {k}: {name!r} must be an integer, got {value!r}")
        parts = {}
        for name in SPLIT_NAMES:
            value = entry[name]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise StageError(
                    f"splits file {path}: fold {index}: {name!r} must be a list of subject ids (strings)"
                )
            parts[name] = tuple(value)
        groups = entry.get("crossfit_groups", [])
        if not isinstance(groups, list) or not all(
            isinstance(g, list) and all(isinstance(s, str) for s in g) for g in groups
        ):
            raise StageError(
                f"splits file {path}: fold {index}: 'crossfit_groups' must be lists of subject ids"
            )
        try:
            folds.append(Fold(index=index, **parts, seed=seed, crossfit=tuple(tuple(g) for g in groups)))
        except StageError as exc:
            raise StageError(f"splits file {path}: {exc}") from exc
    seeded = {f.seed is not None for f in folds}
    if len(seeded) > 1:
        raise StageError(f"splits file {path}: some entries have a 'seed' and others do not")
    keys = [(f.seed, f.index) for f in folds]
    if len(set(keys)) != len(keys):
        raise StageError(f"splits file {path}: (seed, fold) entries repeat: {keys}")
    if seeded == {False}:
        return FoldPlan(by_seed={}, shared=tuple(folds))
    by_seed: dict[int, list[Fold]] = {}
    for f in folds:
        assert f.seed is not None
        by_seed.setdefault(f.seed, []).append(f)
    return FoldPlan(by_seed={s: tuple(fs) for s, fs in by_seed.items()})


def load_folds(path: Path, seed: int | None = None) -> list[Fold]:
    """The folds of ``seed`` in ``splits.json`` (``None``: the file must hold one partition for every seed).

    Raises :class:`StageError` naming the file and the entry that is malformed.
    """
    return load_fold_plan(path).folds(seed)


def fold_masks(subject_of_sample: Sequence[str], fold: Fold) -> dict[str, np.ndarray]:
    """Boolean sample masks ``{"train", "val", "test"}`` (each ``(N,)``) from each sample's subject id.

    Raises :class:`StageError` if a sample's subject is in none of the fold's splits (the splits do not belong
    to these samples).
    """
    subjects = np.asarray(list(subject_of_sample), dtype=object)
    masks = {name: np.isin(subjects, np.asarray(getattr(fold, name), dtype=object)) for name in SPLIT_NAMES}
    unassigned = ~(masks["train"] | masks["val"] | masks["test"])
    if unassigned.any():
        unknown = sorted(set(subjects[unassigned].tolist()))
        raise StageError(
            f"fold {fold.index}: {int(unassigned.sum())} samples belong to subjects in no split, e.g. {unknown[:5]} "
            f"(splits.json was made for other subjects)"
        )
    return masks


def official_folds(
    subject_partition: Mapping[str, str],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    train_partition: str = "Train_Set",
    test_partition: str = "Validation_Set",
) -> list[Fold]:
    """The official Aff-Wild2 protocol as one fold: train on ``Train_Set``, test on ``Validation_Set``.

    The challenge's test labels are withheld, so everyone reports on ``Validation_Set``; model selection then
    needs its own held-out subjects, carved from ``Train_Set``.

    Parameters
    ----------
    subject_partition : mapping of str to str
        Each subject's partition (``Train_Set`` or ``Validation_Set``); a subject is a video, with the
        ``_left``/``_right`` tracks of a two-person video merged.
    val_fraction : float
        Fraction of the ``Train_Set`` subjects held out for validation (rounded, at least 1, leaving at least 1
        for training), drawn with ``default_rng([seed, 0])``.
    seed : int
        Seed of the validation draw.

    Returns
    -------
    list of Fold
        One fold (index 0): ``train`` and ``val`` from ``Train_Set``, ``test`` = every ``Validation_Set`` subject.

    Raises
    ------
    ConfigError
        A partition other than the two, fewer than 2 ``Train_Set`` subjects, or no ``Validation_Set`` subject.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"train.val_fraction must be in (0, 1), got {val_fraction}")
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
    train, val = _carve_validation(train_subjects, val_fraction, np.random.default_rng([seed, 0]))
    fold = Fold(index=0, train=tuple(train), val=tuple(val), test=tuple(test_subjects))
    log.info(
        "official folds: %d train, %d val (%s), %d test (%s) subjects",
        len(train),
        len(val),
        train_partition,
        len(test_subjects),
        test_partition,
    )
    return [fold]


def plan_run_folds(cfg: RunConfig, run_dir: Path | None = None) -> FoldPlan:
    """The fold plan of a run: for each training seed its own subject partition, then crossfit groups.

    Every sample with features for all modalities takes part. Seed ``s`` of ``train.seeds`` draws its folds
    with :func:`pkdot.data.manifest.fold_plan` seeded by :func:`fold_seed` (repeated subject k-fold; LOSO and
    the official Aff-Wild2 partition are the same for every seed); ``train.max_folds`` keeps the first folds of
    each seed; with ``distill.teacher_targets = "crossfit"`` each fold's training subjects are cut into
    ``distill.crossfit_groups`` groups (:func:`assign_crossfit_groups`, seeded like the folds).
    """
    from pkdot.data.manifest import fold_plan, read_manifest
    from pkdot.train.data import load_samples

    run_dir = Path(run_dir or cfg.run_dir)
    samples = load_samples(cfg, run_dir)
    manifest = read_manifest(run_dir / "manifest.parquet")
    frame = manifest[manifest["sample_id"].isin(samples.sample_ids)]
    crossfit = cfg.distill.crossfit_groups if cfg.distill.teacher_targets == "crossfit" else None
    by_seed: dict[int, tuple[Fold, ...]] = {}
    for s in cfg.train.seeds:
        partition_seed = fold_seed(cfg.train.folds, cfg.seed, s)
        folds = fold_plan(frame, cfg.train, partition_seed)
        if cfg.train.max_folds is not None:
            folds = folds[: cfg.train.max_folds]
        folds = [replace(f, seed=s) for f in folds]
        if crossfit is not None:
            folds = [assign_crossfit_groups(f, crossfit, partition_seed) for f in folds]
        by_seed[s] = tuple(folds)
    return FoldPlan(by_seed=by_seed)


def write_run_folds(cfg: RunConfig, run_dir: Path | None = None) -> FoldPlan:
    """:func:`plan_run_folds` written to ``RUN/splits.json``."""
    plan = plan_run_folds(cfg, run_dir)
    save_folds(plan, Path(run_dir or cfg.run_dir) / "splits.json")
    return plan
