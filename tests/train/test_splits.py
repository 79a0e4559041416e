"""Subject-wise folds: disjoint splits, every subject tested once, determinism, files and masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pkdot.errors import ConfigError, StageError
from pkdot.train.splits import Fold, fold_masks, load_folds, save_folds, subject_folds

SUBJECTS = [f"s{i:02d}" for i in range(11)]


def _check_folds(folds: list[Fold], subjects: list[str]) -> None:
    tested = []
    for fold in folds:
        train, val, test = set(fold.train), set(fold.val), set(fold.test)
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == set(subjects)
        assert train and val and test
        tested += list(fold.test)
    assert sorted(tested) == sorted(subjects)  # every subject is tested exactly once


@pytest.mark.parametrize("scheme", [2, 3, 5, "loso"])
@pytest.mark.parametrize("seed", [0, 7])
def test_folds_are_subject_disjoint_and_cover_every_subject(scheme, seed):
    samples = [s for s in SUBJECTS for _ in range(3)]  # one id per sample
    folds = subject_folds(samples, scheme, val_fraction=0.2, seed=seed)
    assert len(folds) == (len(SUBJECTS) if scheme == "loso" else scheme)
    assert [f.index for f in folds] == list(range(len(folds)))
    _check_folds(folds, SUBJECTS)
    sizes = [len(f.test) for f in folds]
    assert max(sizes) - min(sizes) <= 1


def test_validation_fraction():
    folds = subject_folds(SUBJECTS, 5, val_fraction=0.25, seed=0)
    for fold in folds:
        rest = len(fold.train) + len(fold.val)
        assert len(fold.val) == max(1, round(0.25 * rest))
    tiny = subject_folds(SUBJECTS[:3], "loso", val_fraction=0.9)
    assert all(len(f.train) == 1 and len(f.val) == 1 for f in tiny)  # at least one of each


def test_deterministic_per_seed_and_order_free():
    a = subject_folds(SUBJECTS, 4, seed=3)
    assert a == subject_folds(list(reversed(SUBJECTS)), 4, seed=3)
    others = [subject_folds(SUBJECTS, 4, seed=s) for s in range(4, 8)]
    assert any(o != a for o in others)


def test_too_few_subjects_and_bad_arguments():
    with pytest.raises(ConfigError, match="at least 5 subjects"):
        subject_folds(SUBJECTS[:4], 5)
    with pytest.raises(ConfigError, match="training and 1 validation"):
        subject_folds(SUBJECTS[:2], "loso")
    with pytest.raises(ConfigError, match="training and 1 validation"):
        subject_folds(SUBJECTS[:3], 2)
    with pytest.raises(ConfigError, match="'loso'"):
        subject_folds(SUBJECTS, 1)
    with pytest.raises(ConfigError, match="val_fraction"):
        subject_folds(SUBJECTS, 3, val_fraction=1.0)
    with pytest.raises(StageError, match="non-empty strings"):
        subject_folds(["a", 3], 2)


def test_save_and_load_round_trip(tmp_path):
    folds = subject_folds(SUBJECTS, 3, seed=1)
    path = tmp_path / "run" / "splits.json"
    save_folds(folds, path)
    assert load_folds(path) == folds
    entries = json.loads(path.read_text())
    assert set(entries[0]) == {"fold", "train", "val", "test"}
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temp file left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "non-empty list"),
        ('[{"fold": 0, "train": ["a"], "val": ["b"]}]', "exactly the keys"),
        ('[{"fold": "x", "train": ["a"], "val": ["b"], "test": ["c"]}]', "'fold' must be an integer"),
        ('[{"fold": 0, "train": ["a"], "val": [1], "test": ["c"]}]', "'val' must be a list"),
        ('[{"fold": 0, "train": ["a", "c"], "val": ["b"], "test": ["c"]}]', "both train and test"),
        (
            '[{"fold": 0, "train": ["a"], "val": ["b"], "test": ["c"]},'
            ' {"fold": 0, "train": ["c"], "val": ["b"], "test": ["a"]}]',
            "repeat",
        ),
    ],
)
def test_load_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "splits.json"
    path.write_text(content)
    with pytest.raises(StageError, match=message):
        load_folds(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(StageError, match="does not exist"):
        load_folds(tmp_path / "splits.json")


def test_fold_masks():
    fold = Fold(index=0, train=("a", "b"), val=("c",), test=("d",))
    samples = ["a", "d", "c", "b", "a", "d"]
    masks = fold_masks(samples, fold)
    np.testing.assert_array_equal(masks["train"], [True, False, False, True, True, False])
    np.testing.assert_array_equal(masks["val"], [False, False, True, False, False, False])
    np.testing.assert_array_equal(masks["test"], [False, True, False, False, False, True])
    total = masks["train"].astype(int) + masks["val"] + masks["test"]
    assert (total == 1).all()
    with pytest.raises(StageError, match="no split"):
        fold_masks(["a", "zz"], fold)
