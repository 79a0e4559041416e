"""pkdot.evaluate.robustness: exact frame dropping, noise, blur, and a tiny trained run re-evaluated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pkdot.errors import StageError
from pkdot.evaluate.robustness import (
    add_noise,
    blur,
    drop_frames,
    frames_to_drop,
    perturb_clips,
    summarise_robustness,
)
from tests.train.conftest import make_tiny_run


def _numbered_clip(t: int, side: int = 6) -> np.ndarray:
    """Frame i is filled with the value 10 * i, so the frames of a clip can be told apart."""
    return np.stack([np.full((side, side, 3), 10 * i, dtype=np.uint8) for i in range(t)])


@pytest.mark.parametrize(
    ("t", "fraction", "expected"),
    [
        (10, 0.0, 0),
        (10, 0.3, 3),
        (10, 0.6, 6),
        (10, 0.9, 9),
        (4, 0.3, 1),
        (4, 0.6, 2),
        (4, 0.9, 3),
        (4, 1.0, 3),
    ],
)
def test_drop_frames_removes_exactly_that_many_frames(t, fraction, expected):
    clip = _numbered_clip(t)
    out, n = drop_frames(clip, fraction, np.random.default_rng(0))
    assert n == expected == frames_to_drop(t, fraction)
    assert out.shape == clip.shape and out.dtype == np.uint8
    sources = out[:, 0, 0, 0] // 10
    assert len(set(sources.tolist())) == t - expected  # every kept frame is used, no dropped one is
    assert np.all(np.diff(sources) >= 0)  # time order is kept
    assert sources[0] == sources.min() and sources[-1] == sources.max()


def test_drop_frames_is_seeded_and_rejects_bad_fractions():
    clip = _numbered_clip(10)
    a, _ = drop_frames(clip, 0.5, np.random.default_rng(1))
    b, _ = drop_frames(clip, 0.5, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(StageError, match=r"\[0, 1\]"):
        drop_frames(clip, 1.5, np.random.default_rng(0))
    with pytest.raises(StageError, match="uint8"):
        drop_frames(clip.astype(np.float32), 0.5, np.random.default_rng(0))


def test_noise_and_blur_change_pixels_by_the_amount_asked():
    rng = np.random.default_rng(0)
    clip = rng.integers(60, 190, size=(3, 24, 24, 3)).astype(np.uint8)
    np.testing.assert_array_equal(add_noise(clip, 0.0, rng), clip)
    noisy = add_noise(clip, 20.0, np.random.default_rng(1))
    diff = noisy.astype(float) - clip
    assert abs(diff.std() - 20.0) < 1.5 and abs(diff.mean()) < 1.0
    np.testing.assert_array_equal(blur(clip, 0.0), clip)
    blurred = blur(clip, 2.0)
    # blur smooths space (neighbouring pixels get closer) but never mixes frames or channels
    assert (
        np.abs(np.diff(blurred.astype(float), axis=2)).mean()
        < 0.3 * np.abs(np.diff(clip.astype(float), axis=2)).mean()
    )
    flat = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    flat[1] = 200
    np.testing.assert_array_equal(blur(flat, 3.0), flat)
    clips, dropped = perturb_clips(np.stack([clip, clip]), "frame_drop", 0.6, np.random.default_rng(0))
    assert dropped.tolist() == [2, 2] and clips.shape == (2, *clip.shape)
    with pytest.raises(StageError, match="unknown perturbation"):
        perturb_clips(np.stack([clip]), "rain", 1.0, rng)


def test_summarise_robustness_gives_corrected_intervals():
    runs = pd.DataFrame(
        {
            "model": ["student-none"] * 4,
            "perturbation": "frame_drop",
            "level": [0.0, 0.0, 0.9, 0.9],
            "fold": [0, 1, 0, 1],
            "seed": 0,
            "value": [0.8, 0.78, 0.5, 0.52],
        }
    )
    table = summarise_robustness(runs, metric="accuracy", test_train_ratio=0.5)
    assert table["mean"].tolist() == pytest.approx([0.79, 0.51])
    assert ((table["ci_high"] - table["ci_low"]) > (table["naive_ci_high"] - table["naive_ci_low"])).all()
    wide = summarise_robustness(
        runs.assign(value=[0.9, 0.6, 0.5, 0.6]), metric="accuracy", test_train_ratio=0.5
    )
    assert (wide["ci_high"] <= 1.0).all() and wide["ci_high"].iloc[0] == 1.0  # clipped to accuracy's range


def _train_tiny_run(run_dir: Path):
    """Teacher (with unimodal-video) and students 'none' and 'pkdot' of one fold, trained without Ray."""
    from pkdot.folds import save_folds, subject_folds
    from pkdot.train.cache import build_cache
    from pkdot.train.data import load_samples, split_fold
    from pkdot.train.jobs import WorkerContext, student_jobs, teacher_jobs
    from pkdot.train.student import run_student_job
    from pkdot.train.teacher import run_teacher_job

    one_epoch = {"epochs_unimodal": 1, "epochs_teacher": 1, "epochs_tnet": 1, "epochs_student": 2}
    cfg = make_tiny_run(run_dir, overrides={"train": one_epoch})
    samples = load_samples(cfg, run_dir)
    folds = subject_folds(sorted(set(samples.subject_ids.tolist())), 3, val_fraction=0.2, seed=0)[:1]
    save_folds(folds, run_dir / "splits.json")
    job = teacher_jobs(cfg, folds)[0]
    run_teacher_job(cfg, job, split_fold(samples, folds[0]), WorkerContext())
    build_cache(cfg, samples, job.fold, job.seed)
    for sjob in student_jobs(cfg, folds, ["none", "pkdot"]):
        sdata = split_fold(load_samples(cfg, run_dir, modalities=["video"]), folds[0])
        for part in (sdata.train, sdata.val, sdata.test):
            part.arrays = {}
        run_student_job(cfg, sjob, sdata, WorkerContext())
    return cfg


def test_robustness_on_a_trained_run_drops_frames_and_changes_predictions(tmp_path):
    from pkdot.evaluate.report import evaluate_run

    cfg = _train_tiny_run(tmp_path / "run")
    summary = evaluate_run(cfg, robustness=True)
    report_dir = summary.report_path.parent
    assert (report_dir / "robustness.png").is_file()
    text = summary.report_path.read_text()
    assert "## Robustness" in text and "frame_drop 0.9" in text and "](robustness.png)" in text
    assert set(summary.robustness["perturbation"]) == {"frame_drop", "noise", "blur"}

    runs = pd.read_csv(report_dir / "robustness.csv")
    assert set(runs["model"]) == {"student-none", "student-pkdot", "unimodal-video"}
    drop = runs[runs["perturbation"] == "frame_drop"]
    # the tiny clips have 4 frames: 0 / 1 / 2 / 3 dropped, exactly
    for level, expected in ((0.0, 0), (0.3, 1), (0.6, 2), (0.9, 3)):
        assert (drop.loc[drop["level"] == level, "frames_dropped"] == expected).all()
    clean = runs[runs["level"] == 0.0]
    assert (
        clean["agreement_with_stored"] == 1.0
    ).all()  # the clean re-run reproduces the stage's predictions
    assert (clean["output_change"] == 0.0).all()
    dropped90 = drop[drop["level"] == 0.9]
    assert (dropped90["output_change"] > 1e-4).all()  # frame dropping reaches every model's input
    for perturbation, level in (("noise", 50.0), ("blur", 4.0)):
        hit = runs[(runs["perturbation"] == perturbation) & (runs["level"] == level)]
        assert (hit["output_change"] > 1e-4).all(), perturbation
    assert runs["value"].between(0.0, 1.0).all()


def test_robustness_is_on_for_video_students_and_refused_without_video():
    from pkdot.config import load_config
    from pkdot.errors import ConfigError

    assert load_config(preset="demo").robustness_curves  # Biovid demo: the student watches video
    assert not load_config(preset="demo", overrides={"evaluate.robustness": False}).robustness_curves
    table = {
        "data.dataset": "table",
        "data.task": "binary",
        "data.student_modalities": ["mean"],
        "data.privileged_modalities": ["worst"],
    }
    assert not load_config(preset="demo", overrides=table).robustness_curves
    with pytest.raises(ConfigError, match="robustness"):
        load_config(preset="demo", overrides=table | {"evaluate.robustness": True})
