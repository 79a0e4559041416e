"""Subject-wise folds: every subject is tested exactly once and never shares a fold's splits with itself.

The authors' public code split Biovid by *samples* (the same person in train and test) and selected the best
epoch on the test fold. Here folds are over subjects (subject k-fold or leave-one-subject-out), and each fold's
validation subjects, used for model selection, are carved from its training subjects.

``RUN/splits.json`` holds ``[{"fold": k, "train": [subject, ..], "val": [..], "test": [..]}, ...]``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pkdot.errors import ConfigError, StageError

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Fold:
    """One fold: disjoint tuples of subject ids for training, validation (model selection) and test."""

    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in SPLIT_NAMES:
            subjects = getattr(self, name)
            if not subjects:
                raise StageError(f"fold {self.index}: the {name} split has no subjects")
            if len(set(subjects)) != len(subjects):
                raise StageError(f"fold {self.index}: the {name} split lists a subject twice")
        for i, a in enumerate(SPLIT_NAMES):
            for b in SPLIT_NAMES[i + 1 :]:
                both = set(getattr(self, a)) & set(getattr(self, b))
                if both:
                    raise StageError(
                        f"fold {self.index}: subjects {sorted(both)[:5]} are in both {a} and {b}"
                    )

    def to_dict(self) -> dict[str, object]:
        """The ``splits.json`` entry ``{"fold", "train", "val", "test"}``."""
        return {"fold": self.index, "train": list(self.train), "val": list(self.val), "test": list(self.test)}


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


def save_folds(folds: list[Fold], path: Path) -> None:
    """Write ``splits.json`` atomically (a temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps([f.to_dict() for f in folds], indent=1))
    tmp.replace(path)


def load_folds(path: Path) -> list[Fold]:
    """Read ``splits.json``; raises :class:`StageError` naming the file and the entry that is malformed."""
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
        if not isinstance(entry, dict) or set(entry) != {"fold", *SPLIT_NAMES}:
            raise StageError(
                f"splits file {path}: entry {k} must have exactly the keys fold, train, val, test"
            )
        index = entry["fold"]
        if not isinstance(index, int) or isinstance(index, bool):
            raise StageError(f"splits file {path}: entry {k}: 'fold' must be an integer, got {index!r}")
        parts = {}
        for name in SPLIT_NAMES:
            value = entry[name]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise StageError(
                    f"splits file {path}: fold {index}: {name!r} must be a list of subject ids (strings)"
                )
            parts[name] = tuple(value)
        try:
            folds.append(Fold(index=index, **parts))
        except StageError as exc:
            raise StageError(f"splits file {path}: {exc}") from exc
    indices = [f.index for f in folds]
    if len(set(indices)) != len(indices):
        raise StageError(f"splits file {path}: fold indices repeat: {indices}")
    return folds


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
