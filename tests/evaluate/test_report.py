"""pkdot.evaluate.report.evaluate_run on small fake run directories written here."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pkdot.config import load_config
from pkdot.errors import StageError
from pkdot.evaluate.report import evaluate_run
from pkdot.train.jobs import PREDICTION_SCHEMA as SCHEMA  # the trainer's own schema

N_TEST, DIM = 24, 6
#: correct test predictions (of N_TEST) per model and run (fold, seed)
CORRECT = {
    "teacher": {(0, 0): 22, (0, 1): 21, (1, 0): 23, (1, 1): 22},
    "unimodal-video": {(0, 0): 16, (0, 1): 15, (1, 0): 17, (1, 1): 18},
    "student-none": {(0, 0): 15, (0, 1): 14, (1, 0): 16, (1, 1): 15},
    "student-pkdot": {(0, 0): 18, (0, 1): 17, (1, 0): 18, (1, 1): 19},
}
#: correct validation predictions (of N_TEST): the best validation mean (student-none) is not the best test mean
VAL_CORRECT = {"teacher": 23, "unimodal-video": 20, "student-none": 21, "student-pkdot": 19}


def _frame(model, fold, seed, split, y, y_pred, emb):
    n = len(y)
    scores = np.eye(2, dtype=np.float32)[y_pred.astype(int)]
    return pd.DataFrame(
        {
            "sample_id": [f"f{fold}-s{i:02d}" for i in range(n)],
            "subject_id": [f"p{fold}{i % 4}" for i in range(n)],
            "y_true": y.astype(float),
            "y_pred": y_pred.astype(float),
            "scores": list(scores),
            "embedding": list(emb.astype(np.float32)),
            "model": model,
            "fold": fold,
            "seed": seed,
            "split": split,
        }
    )


def _write(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), path)


def _history(model_curve_offset: float, epochs: int = 4) -> list[dict]:
    return [
        {
            "epoch": e,
            "train_loss": 1.0 / e + model_curve_offset,
            "val_metric": 0.5 + 0.05 * e,
            "loss_task": 0.4,
        }
        for e in range(1, epochs + 1)
    ]


def write_fake_run(run_dir: Path, *, regression: bool = False) -> None:
    """Teacher (+ unimodal-video) and two students over 2 folds x 2 seeds, with known test accuracies."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2, DIM)) * 3
    for fold in (0, 1):
        y = np.tile([0, 1], N_TEST // 2)
        teacher_emb = centers[y] + rng.normal(size=(N_TEST, DIM))
        for seed in (0, 1):
            frames = {}
            for model, correct in CORRECT.items():
                if regression:
                    target = np.linspace(-0.9, 0.9, N_TEST)
                    noise = (N_TEST - correct[(fold, seed)]) / N_TEST
                    pred = target + np.random.default_rng(fold * 10 + seed).normal(0, noise, N_TEST)
                    labels = target
                else:
                    pred = y.copy()
                    wrong = np.arange(N_TEST - correct[(fold, seed)])
                    pred[wrong] = 1 - pred[wrong]
                    labels = y
                emb = teacher_emb if model == "teacher" else teacher_emb @ rng.normal(size=(DIM, DIM)) * 0.5
                test = _frame(model, fold, seed, "test", labels, pred, emb)
                val_pred = labels.copy()
                if not regression:  # in the test table, val rows must not count
                    val_pred[: N_TEST - VAL_CORRECT[model] - fold] = (
                        1 - val_pred[: N_TEST - VAL_CORRECT[model] - fold]
                    )
                val = _frame(model, fold, seed, "val", labels, val_pred, emb)
                frames[model] = pd.concat([test, val], ignore_index=True)
            tdir = run_dir / "teacher" / f"fold-{fold}" / f"seed-{seed}"
            _write(
                pd.concat([frames["teacher"], frames["unimodal-video"]], ignore_index=True),
                tdir / "predictions.parquet",
            )
            (tdir / "history.json").write_text(
                json.dumps(
                    {
                        "metric": "accuracy",
                        "phases": {
                            "unimodal-video": {"epochs": _history(0.2), "best_epoch": 4},
                            "teacher": {"epochs": _history(0.0), "best_epoch": 4},
                            "tnet": {"epochs": _history(5.0), "best_epoch": 2},
                        },
                        "epochs": _history(5.0),
                        "best_epoch": 2,
                    }
                )
            )
            for loss in ("none", "pkdot"):
                sdir = run_dir / "student" / loss / f"fold-{fold}" / f"seed-{seed}"
                _write(frames[f"student-{loss}"], sdir / "predictions.parquet")
                # one student in the plain interface format, one with phases (as the trainer writes it)
                doc = (
                    {"epochs": _history(0.1), "metric": "accuracy", "best_epoch": 3}
                    if loss == "none"
                    else {"metric": "accuracy", "phases": {"student-pkdot": {"epochs": _history(0.3)}}}
                )
                (sdir / "history.json").write_text(json.dumps(doc))


def _assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5000, f"{path} is only {len(data)} bytes"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 200
    assert zlib.crc32(data[12 : 16 + length]) == struct.unpack(">I", data[16 + length : 20 + length])[0]
    assert data[-8:-4] == b"IEND"


@pytest.fixture()
def classification_run(tmp_path):
    run_dir = tmp_path / "run"
    write_fake_run(run_dir)
    cfg = load_config(overrides={"run_dir": str(run_dir), "train.seeds": [0, 1], "train.batch_size": 16})
    return cfg, run_dir


def test_evaluate_run_writes_report_summary_and_plots(classification_run):
    cfg, run_dir = classification_run
    summary = evaluate_run(cfg, run_dir)
    report_dir = run_dir / "report"

    table = summary.table.set_index("model")
    assert list(summary.table["model"]) == ["teacher", "unimodal-video", "student-none", "student-pkdot"]
    for model, runs in CORRECT.items():
        assert table.loc[model, "mean"] == pytest.approx(np.mean(list(runs.values())) / N_TEST)
        assert table.loc[model, "n"] == 4
        assert table.loc[model, "ci_low"] < table.loc[model, "mean"] < table.loc[model, "ci_high"]
    # issue 22: the student to ship is chosen on validation (student-none), not on test (student-pkdot)
    assert table.loc["student-pkdot", "mean"] > table.loc["student-none", "mean"]
    assert table.loc["student-none", "val_mean"] > table.loc["student-pkdot", "val_mean"]
    assert summary.best_student == "student-none" and summary.selection.loss == "none"
    assert (summary.selection.fold, summary.selection.seed) == (1, 0)  # fold 1 has the better val scores
    gain = (
        np.mean([CORRECT["student-pkdot"][r] - CORRECT["student-none"][r] for r in CORRECT["student-none"]])
        / N_TEST
    )
    pk = summary.paired.set_index("model").loc["student-pkdot"]
    assert pk["mean_diff"] == pytest.approx(gain) and pk["n"] == 4 and pk["ci_low"] > 0

    text = summary.report_path.read_text()
    assert summary.report_path == report_dir / "report.md"
    for model in CORRECT:
        assert f"| `{model}` |" in text
    assert f"{table.loc['student-pkdot', 'mean']:.3f} ± {table.loc['student-pkdot', 'std']:.3f}" in text
    assert f"{gain:+.4f}" in text and "the interval excludes 0: a gain for PKDOT" in text
    assert "`teacher` − `unimodal-video`" in text
    assert cfg.section_hash() in text and "biovid" in text and "binary" in text and "demo" in text
    assert "Highest mean test" not in text and "highest mean validation accuracy" in text
    assert f"| `student-none` | {table.loc['student-none', 'val_mean']:.3f} |" in text
    assert "clipped to [0, 1]" in text

    names = {p.name for p in summary.plots}
    assert names == {
        "metric_bars.png",
        "confusion_matrices.png",
        "learning_curves.png",
        "structure.png",
        "embeddings.png",
    }
    for p in summary.plots:
        assert p.parent == report_dir
        _assert_valid_png(p)
        assert f"]({p.name})" in text
    assert not [p for p in report_dir.iterdir() if p.name.startswith(".")]  # staging folder removed

    doc = json.loads((report_dir / "summary.json").read_text())
    assert doc["best_student"] == "student-none" and doc["metric"] == "accuracy"
    assert doc["selection"]["loss"] == "none" and "validation" in doc["selection_rule"]
    assert pd.DataFrame(doc["table"]).equals(summary.table)
    round_trip = pd.DataFrame(doc["paired"])
    assert round_trip["mean_diff"].tolist() == pytest.approx(summary.paired["mean_diff"].tolist())
    per_fold = pd.read_csv(report_dir / "per_fold.csv")
    assert len(per_fold) == 16 and set(per_fold.columns) >= {"model", "fold", "seed", "accuracy", "macro_f1"}


def test_evaluate_run_is_deterministic_and_replaces_stale_files(classification_run):
    cfg, run_dir = classification_run
    first = evaluate_run(cfg, run_dir)
    stale = run_dir / "report" / "old-figure.png"
    stale.write_bytes(b"old")
    second = evaluate_run(cfg, run_dir)
    assert not stale.exists()
    pd.testing.assert_frame_equal(first.table, second.table)
    assert first.report_path.read_text() == second.report_path.read_text()


def test_evaluate_run_regression_uses_ccc_and_skips_confusion(tmp_path):
    run_dir = tmp_path / "run"
    write_fake_run(run_dir, regression=True)
    cfg = load_config(
        overrides={
            "run_dir": str(run_dir),
            "data.dataset": "affwild2",
            "data.task": "valence",
            "data.privileged_modalities": ["audio"],
            "train.batch_size": 16,
        }
    )
    summary = evaluate_run(cfg)
    assert (summary.table["metric"] == "ccc").all()
    teacher = summary.table.set_index("model").loc["teacher"]
    assert teacher["mean"] > summary.table.set_index("model").loc["student-none", "mean"]
    names = {p.name for p in summary.plots}
    assert "confusion_matrices.png" not in names and {"structure.png", "embeddings.png"} <= names
    text = summary.report_path.read_text()
    assert "CCC" in text and "Δ ccc" in text


def test_evaluate_run_without_predictions_raises(tmp_path):
    cfg = load_config(overrides={"run_dir": str(tmp_path / "empty")})
    with pytest.raises(StageError, match="no predictions"):
        evaluate_run(cfg)


def test_report_stays_short_with_87_loso_folds(tmp_path):
    """Biovid part A with LOSO: 87 folds. Per-run numbers go to per_fold.csv; report.md is a summary."""
    from pkdot.data.manifest import manifest_frame, write_manifest

    run_dir = tmp_path / "run"
    n_subjects, per_subject = 87, 4
    rng = np.random.default_rng(0)
    rows = [
        {
            "sample_id": f"p{s:02d}-{i}",
            "subject_id": f"p{s:02d}",
            "label": i % 2,
            "class_name": ["BL1", "PA4"][i % 2],
            "video_path": f"/nonexistent/p{s:02d}-{i}.mp4",
            "physio_path": f"/nonexistent/p{s:02d}-{i}.csv",
            "partition": "",
            "dataset": "biovid",
        }
        for s in range(n_subjects)
        for i in range(per_subject)
    ]
    run_dir.mkdir(parents=True)
    write_manifest(manifest_frame(rows), run_dir / "manifest.parquet")
    y = np.array([0, 1, 0, 1])
    for fold in range(n_subjects):
        frames = {}
        for model, p_correct in (
            ("teacher", 0.9),
            ("unimodal-video", 0.6),
            ("student-none", 0.6),
            ("student-pkdot", 0.65),
        ):
            parts = []
            for split, subject in (("test", fold), ("val", (fold + 1) % n_subjects)):
                pred = np.where(rng.random(4) < p_correct, y, 1 - y)
                df = _frame(model, fold, 0, split, y, pred, rng.normal(size=(4, DIM)))
                df["sample_id"] = [f"p{subject:02d}-{i}" for i in range(4)]
                df["subject_id"] = f"p{subject:02d}"
                parts.append(df)
            frames[model] = pd.concat(parts, ignore_index=True)
        tdir = run_dir / "teacher" / f"fold-{fold}" / "seed-0"
        _write(
            pd.concat([frames["teacher"], frames["unimodal-video"]], ignore_index=True),
            tdir / "predictions.parquet",
        )
        for loss in ("none", "pkdot"):
            _write(
                frames[f"student-{loss}"],
                run_dir / "student" / loss / f"fold-{fold}" / "seed-0" / "predictions.parquet",
            )
    cfg = load_config(overrides={"run_dir": str(run_dir), "train.folds": "loso", "train.batch_size": 16})
    summary = evaluate_run(cfg)
    text = summary.report_path.read_text()
    assert len(text.splitlines()) < 150
    assert "](per_fold.csv)" in text and "Nadeau-Bengio" in text and "sqrt(1/J + n_test/n_train)" in text
    per_fold = pd.read_csv(summary.report_path.parent / "per_fold.csv")
    assert len(per_fold) == 4 * n_subjects
    # LOSO: each run trains on the 85 subjects that are neither test nor validation subjects
    assert (per_fold["n_train"] == (n_subjects - 2) * per_subject).all()
    assert summary.test_train_ratio == pytest.approx(1 / (n_subjects - 2))
    assert (summary.table["n"] == n_subjects).all()
    corrected = summary.paired.iloc[0]
    assert corrected["ci_high"] - corrected["ci_low"] > corrected["naive_ci_high"] - corrected["naive_ci_low"]


def test_selection_ties_go_to_the_simpler_model():
    from pkdot.evaluate.aggregate import select_student

    per_fold = pd.DataFrame(
        {
            "model": ["student-pkdot", "student-kd", "student-pkdot", "student-kd", "teacher"],
            "fold": [0, 0, 1, 1, 0],
            "seed": 0,
            "val_accuracy": [0.8, 0.7, 0.6, 0.7, 0.99],
        }
    )
    assert select_student(per_fold, "accuracy", ["none", "kd", "pkdot"]).model == "student-kd"
    assert select_student(per_fold, "accuracy", ["pkdot", "kd"]).model == "student-pkdot"
    assert select_student(per_fold[per_fold["model"] == "teacher"], "accuracy") is None
    with pytest.raises(StageError, match="validation"):
        select_student(per_fold.assign(val_accuracy=np.nan), "accuracy")


def test_intervals_stay_in_the_metric_range(classification_run):
    """Two runs far apart: the t interval of the mean leaves [0, 1]; the report clips it and says so."""
    from pkdot.evaluate.aggregate import summary_table

    per_fold = pd.DataFrame(
        {"model": "student-none", "fold": [0, 1], "seed": 0, "accuracy": [0.5, 1.0], "macro_f1": [0.5, 1.0]}
    )
    row = summary_table(per_fold, regression=False, test_train_ratio=0.25).iloc[0]
    assert row["ci_low"] == 0.0 and row["ci_high"] == 1.0 and row["naive_ci_high"] == 1.0
    ccc = pd.DataFrame(
        {"model": "teacher", "fold": [0, 1], "seed": 0, "ccc": [-0.9, 0.9], "mae": 0.1, "rmse": 0.1}
    )
    row = summary_table(ccc, regression=True).iloc[0]
    assert (row["ci_low"], row["ci_high"]) == (-1.0, 1.0)
    cfg, run_dir = classification_run
    summary = evaluate_run(cfg, run_dir)
    assert (summary.table["ci_low"] >= 0).all() and (summary.table["ci_high"] <= 1).all()
    assert (
        "Intervals of accuracy and F1 are clipped to [0, 1], those of CCC to [-1, 1]"
        in summary.report_path.read_text()
    )


def test_a_report_made_with_an_authors_protocol_switch_starts_with_the_banner(classification_run):
    import shutil

    from pkdot.evaluate.report import render_report

    cfg, run_dir = classification_run
    shutil.copytree(run_dir / "student" / "pkdot", run_dir / "student" / "kd+pkdot")  # a composite's folder
    for path in (run_dir / "student" / "kd+pkdot").glob("*/*/predictions.parquet"):
        _write(pd.read_parquet(path).assign(model="student-kd+pkdot"), path)
    cfg = cfg.model_copy(
        update={"distill": cfg.distill.model_copy(update={"losses": ["none", "pkdot", "kd+pkdot"]})}
    )
    summary = evaluate_run(cfg)
    assert "student-kd+pkdot" in set(summary.table["model"])
    assert not summary.report_path.read_text().startswith(">")
    for switch in ({"folds": "clips"}, {"select_on": "test"}, {"teacher_scope": "all"}):
        leaky = cfg.model_copy(update={"train": cfg.train.model_copy(update=switch)})
        text = render_report(leaky, summary, [], 4)
        ((key, value),) = switch.items()
        assert text.startswith(
            "> **Optimistic by construction; for comparison with published numbers only.**"
        )
        assert f"`train.{key}={value}`" in text.splitlines()[0]
