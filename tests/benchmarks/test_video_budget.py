"""The video-budget check (benchmarks/video_budget.py): reading the validation curves and choosing per budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.bench_loader import load_benchmark

budget = load_benchmark("video_budget")


def _history(run: Path, job: str, vals: list[float], phase: str = "unimodal-video") -> None:
    path = run / "teacher" / job / "history.json"
    path.parent.mkdir(parents=True)
    epochs = [{"epoch": i + 1, "train_loss": 0.1, "val_metric": v} for i, v in enumerate(vals)]
    other = [{"epoch": 1, "train_loss": 0.1, "val_metric": 0.99}]
    path.write_text(json.dumps({"phases": {phase: {"epochs": epochs}, "teacher": {"epochs": other}}}))


def test_each_budget_keeps_each_jobs_best_epoch_within_it(tmp_path):
    _history(tmp_path, "fold-0/seed-0", [0.0, 0.1, 0.05, 0.4])
    _history(tmp_path, "fold-1/seed-0", [0.2, 0.0, 0.3, 0.1])
    curves = budget.read_curves(tmp_path)
    assert sorted(curves["job"].unique()) == ["fold-0/seed-0", "fold-1/seed-0"]
    assert len(curves) == 8  # the teacher phase is not read
    table = budget.summarise(curves, [2, 4, 8]).set_index("budget")
    assert list(table.index) == [2, 4]  # 8 is longer than any curve
    assert table.loc[2, "val_mean"] == pytest.approx((0.1 + 0.2) / 2)
    assert table.loc[2, "best_epoch_mean"] == pytest.approx((2 + 1) / 2)
    assert table.loc[4, "val_mean"] == pytest.approx((0.4 + 0.3) / 2)
    assert table.loc[4, "best_epoch_mean"] == pytest.approx((4 + 3) / 2)


def test_missing_histories_and_phases_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no history.json"):
        budget.read_curves(tmp_path)
    _history(tmp_path, "fold-0/seed-0", [0.1], phase="unimodal-audio")
    with pytest.raises(KeyError, match="fold-0/seed-0/history.json: no phase 'unimodal-video'"):
        budget.read_curves(tmp_path)


def test_the_benchmarks_data_seed_is_refused(capsys):
    with pytest.raises(SystemExit):
        budget.parse_args(["--data-seed", "0"])
    assert "quality benchmark's data" in capsys.readouterr().err
    assert budget.parse_args([]).data_seed != 0


def _crops_run(run, seed, signal: bool) -> None:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    n, shape = 120, (2, 16, 16, 3)
    y = rng.uniform(-1, 1, n)
    frames = rng.integers(0, 60, (n, *shape)).astype(np.uint8)
    if signal:  # the lower half's brightness follows the label, the upper half is noise
        frames[:, :, 8:, :, :] += (100 + 60 * y).astype(np.uint8)[:, None, None, None, None]
    ids = [f"s{i}" for i in range(n)]
    run.mkdir(parents=True, exist_ok=True)
    (run / "features").mkdir(exist_ok=True)
    pd.DataFrame(
        {"sample_id": ids, "frames": [f.tobytes() for f in frames], "frames_shape": [list(shape)] * n}
    ).to_parquet(run / "features" / "faces.parquet")
    pd.DataFrame({"sample_id": ids, "subject_id": [f"p{i % 10}" for i in range(n)], "valence": y}).to_parquet(
        run / "manifest.parquet"
    )


def test_the_ridge_reference_finds_a_linear_signal_in_the_crops_and_none_without(tmp_path):
    _crops_run(tmp_path / "with", 0, signal=True)
    _crops_run(tmp_path / "without", 0, signal=False)
    assert budget.ridge_reference(tmp_path / "with", 5, "valence") > 0.8
    assert abs(budget.ridge_reference(tmp_path / "without", 5, "valence")) < 0.3
