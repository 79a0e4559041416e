"""Subject-wise folds: disjoint splits, every subject tested once, determinism, files and masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pkdot.errors import ConfigError, StageError
from pkdot.folds import Fold, load_folds, save_folds, subject_folds

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
        ('[{"fold": 0, "train": ["a"], "val": ["b"]}]', "must have the keys fold, train, val, test"),
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


def test_each_seed_draws_its_own_k_fold_partition_and_loso_is_fixed():
    from pkdot.folds import fold_seed

    a = subject_folds(SUBJECTS, 4, seed=fold_seed(4, 0, 0))
    b = subject_folds(SUBJECTS, 4, seed=fold_seed(4, 0, 1))
    _check_folds(a, SUBJECTS)
    _check_folds(b, SUBJECTS)
    assert [f.test for f in a] != [f.test for f in b]
    assert fold_seed(4, 0, 1) == fold_seed(4, 0, 1) != fold_seed(4, 1, 1)  # (run seed, seed) decide
    assert fold_seed("loso", 3, 0) == fold_seed("loso", 3, 9) == fold_seed("official", 3, 9) == 3


def _tiny(tmp_path, **overrides):
    from tests.train.conftest import make_tiny_run

    return make_tiny_run(tmp_path / "run", subjects=7, per_class=1, overrides=overrides)


def test_run_fold_plan_is_per_seed_and_round_trips(tmp_path):
    from pkdot.folds import load_fold_plan
    from pkdot.train.data import write_run_folds
    from pkdot.train.jobs import fold_for_job, teacher_jobs

    cfg = _tiny(tmp_path, train={"folds": 3, "max_folds": None, "seeds": [0, 1, 2]})
    plan = write_run_folds(cfg)
    subjects = [f"s{i}" for i in range(7)]
    assert plan.seeds == [0, 1, 2]
    for s in plan.seeds:
        folds = plan.folds(s)
        assert all(f.seed == s for f in folds)
        _check_folds(folds, subjects)  # no subject in two of train/val/test, every subject tested once
    assert len({tuple(f.test for f in plan.folds(s)) for s in plan.seeds}) > 1
    path = tmp_path / "run" / "splits.json"
    assert all("seed" in e for e in json.loads(path.read_text()))
    assert load_fold_plan(path) == plan
    with pytest.raises(StageError, match="say which seed"):
        load_folds(path)
    assert load_folds(path, seed=1) == plan.folds(1)
    for job in teacher_jobs(cfg, plan):  # every job trains on its own seed's fold
        assert fold_for_job(plan, job) == plan.fold(job.seed, job.fold)

    loso = write_run_folds(_tiny(tmp_path / "loso", train={"folds": "loso", "seeds": [0, 1]}))
    assert [(f.train, f.val, f.test) for f in loso.folds(0)] == [
        (f.train, f.val, f.test) for f in loso.folds(1)
    ]


def test_splits_without_seeds_serve_every_seed(tmp_path):
    from pkdot.folds import load_fold_plan

    folds = subject_folds(SUBJECTS, 3, seed=1)
    save_folds(folds, tmp_path / "splits.json")
    plan = load_fold_plan(tmp_path / "splits.json")
    assert plan.folds(0) == plan.folds(5) == folds == load_folds(tmp_path / "splits.json")


def test_crossfit_groups_partition_the_training_subjects():
    from pkdot.folds import assign_crossfit_groups

    fold = subject_folds(SUBJECTS, 3, seed=0)[0]
    cut = assign_crossfit_groups(fold, 3, seed=4)
    assert sorted(s for g in cut.crossfit for s in g) == sorted(fold.train)
    assert max(map(len, cut.crossfit)) - min(map(len, cut.crossfit)) <= 1
    for j, group in enumerate(cut.crossfit):
        rest = cut.without_group(j)
        assert (
            set(rest.train) == set(fold.train) - set(group)
            and rest.val == fold.val
            and rest.test == fold.test
        )
        assert all(cut.group_of(s) == j for s in group)
    assert Fold(**{**fold.__dict__, "crossfit": cut.crossfit}) == cut
    with pytest.raises(StageError, match="partition"):
        Fold(fold.index, fold.train, fold.val, fold.test, crossfit=(cut.crossfit[0], cut.crossfit[1]))
    with pytest.raises(ConfigError, match="crossfit_groups"):
        assign_crossfit_groups(fold, len(fold.train) + 1, seed=0)


def test_refit_fold_covers_every_subject_with_a_validation_carve_out(tmp_path):
    from dataclasses import replace

    from pkdot.folds import FoldPlan, load_fold_plan, refit_fold, save_folds

    subjects = [f"s{i}" for i in range(10)]
    fold = refit_fold(subjects * 2, 0.2, seed=3)
    assert set(fold.train) | set(fold.val) == set(subjects) and not set(fold.train) & set(fold.val)
    assert len(fold.val) == 2 and fold.test == fold.val and fold.refit
    assert refit_fold(list(reversed(subjects)), 0.2, seed=3) == fold  # deterministic, order-free
    save_folds(FoldPlan(by_seed={7: (replace(fold, seed=7),)}), tmp_path / "splits.json")
    assert load_fold_plan(tmp_path / "splits.json").fold(7, 0) == replace(fold, seed=7)
    with pytest.raises(StageError, match="in both val and test"):
        replace(fold, refit=False)  # only a refit fold may reuse its validation subjects


# ---- the authors' protocol switches (optimistic by construction) ------------------------------------------
def _manifest(subjects: int = 6, per_subject: int = 10):
    import pandas as pd

    return pd.DataFrame(
        [
            {"sample_id": f"s{s}-{i}", "subject_id": f"s{s}", "label": i % 2}
            for s in range(subjects)
            for i in range(per_subject)
        ]
    )


def test_clip_folds_are_stratified_over_samples_and_ignore_subjects(tmp_path):
    from sklearn.model_selection import StratifiedKFold

    from pkdot.config import TrainConfig
    from pkdot.folds import fold_plan

    frame = _manifest()
    folds = fold_plan(frame, TrainConfig(folds="clips"), seed=3)
    assert len(folds) == 5 and all(f.unit == "sample_id" and not f.leaky for f in folds)
    _check_folds(folds, frame["sample_id"].tolist())  # every clip tested once, parts disjoint over clips
    ids = np.array(sorted(frame["sample_id"]), dtype=object)
    labels = frame.set_index("sample_id").loc[ids, "label"].to_numpy()
    expected = StratifiedKFold(n_splits=5, shuffle=True, random_state=3).split(ids, labels)
    assert [sorted(f.test) for f in folds] == [sorted(ids[t]) for _, t in expected]
    subject = dict(zip(frame["sample_id"], frame["subject_id"], strict=True))
    assert {subject[s] for s in folds[0].train} & {subject[s] for s in folds[0].test}  # subjects shared
    assert frame["sample_id"].isin(folds[0].test).sum() == len(folds[0].test) == 12
    save_folds(folds, tmp_path / "splits.json")
    assert load_folds(tmp_path / "splits.json") == folds


def test_selection_on_test_makes_the_validation_part_the_test_part(tmp_path):
    from pkdot.config import TrainConfig
    from pkdot.folds import fold_plan

    frame = _manifest()
    sound = fold_plan(frame, TrainConfig(folds=3), seed=0)
    leaky = fold_plan(frame, TrainConfig(folds=3, select_on="test"), seed=0)
    for a, b in zip(sound, leaky, strict=True):
        assert b.leaky and b.val == b.test == a.test and b.train == a.train
    save_folds(leaky, tmp_path / "splits.json")
    assert load_folds(tmp_path / "splits.json") == leaky
    # the report's protocol sentence says where epochs were selected
    from pkdot.folds import describe_protocol

    assert "selected on the test subjects themselves" in describe_protocol(3, tmp_path / "splits.json")
    save_folds(sound, tmp_path / "sound.json")
    assert "validation subjects carved" in describe_protocol(3, tmp_path / "sound.json")
    with pytest.raises(StageError, match="in both"):  # a sound fold still refuses overlapping parts
        Fold(0, ("a",), ("b",), ("b",))
