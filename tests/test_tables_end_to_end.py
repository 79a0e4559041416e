"""Bring-your-own tables end to end (manifest -> extract -> teacher -> cache -> distill -> evaluate), tiny.

A 10-class table and a regression table, each with three views of different lengths (one for the student, two
privileged): the number of classes comes from the labels (no cap at 5), the regression target from a float
``target`` column, and the report shows the task's metrics. Training jobs run in this process
(:func:`tests.train.conftest.jobs_in_process`: the job functions Ray Train calls), so no Ray Train run starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pkdot import pipeline
from pkdot.config import load_config
from tests.train.conftest import jobs_in_process

TINY = [
    "model.embed_dim=16",
    "model.mlp_hidden=16",
    "model.fusion_heads=2",
    "model.tnet_hidden=[8]",
    "train.folds=3",
    "train.max_folds=1",
    "train.batch_size=32",
    "train.teacher_batch_size=32",
    "train.epochs_unimodal=1",
    "train.epochs_teacher=1",
    "train.epochs_tnet=1",
    "train.epochs_student=2",
    "train.num_workers=1",
    "train.checkpoint_every_s=0",
    "distill.losses=[none, pkdot]",
    "distill.pkdot.k=4",
    "tracking.register_model=false",
    "train.refit=false",
    "tracking.log_checkpoints=false",
    "features.workers=1",
]


def _table(
    path: Path, *, classes: int | None, subjects: int = 6, per_subject: int = 30, seed: int = 0
) -> Path:
    """Views ``a`` (8-d), ``b`` (5-d), ``c`` (3-d); each carries the class (or target) plus noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(subjects):
        for i in range(per_subject):
            if classes is None:
                y = float(rng.uniform(-1, 1))
                signal = y
            else:
                y = (s * per_subject + i) % classes
                signal = y / classes
            rows.append(
                {
                    "sample_id": f"p{s}-{i}",
                    "subject_id": f"p{s}",
                    ("target" if classes is None else "label"): y,
                    "a": (signal + 0.3 * rng.normal(size=8)).tolist(),
                    "b": (signal + 0.3 * rng.normal(size=5)).tolist(),
                    "c": (2 * signal + 0.1 * rng.normal(size=3)).tolist(),
                }
            )
    pd.DataFrame(rows).to_parquet(path)
    return path


def _run(tmp_path: Path, table: Path, task: str, student: list[str], privileged: list[str]):
    overrides = [
        *TINY,
        "data.dataset=table",
        f"data.root={table}",
        f"data.task={task}",
        f"data.student_modalities=[{', '.join(student)}]",
        f"data.privileged_modalities=[{', '.join(privileged)}]",
        f"run_dir={tmp_path / 'run'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    cfg = load_config(preset="demo", overrides=overrides)
    return pipeline.run_all(cfg)


def test_ten_class_table_with_three_views(tmp_path: Path) -> None:
    table = _table(tmp_path / "ten.parquet", classes=10)
    results = _run(tmp_path, table, "multiclass", ["a"], ["b", "c"])
    run = Path(results["manifest"].path).parent
    cfg = load_config(run / "config.yaml")
    assert cfg.data.num_classes == 10 and cfg.data.num_outputs == 10  # inferred from the labels
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["metric"] == "accuracy" and not summary["regression"]
    report = (run / "report" / "report.md").read_text()
    assert "10 classes" in report and "macro-F1" in report
    pred = pd.read_parquet(next((run / "student" / "pkdot").glob("fold-*/seed-*/predictions.parquet")))
    assert set(pred["y_true"].astype(int)) <= set(range(10)) and pred["y_true"].nunique() > 5
    assert {"student-none", "student-pkdot", "teacher"} <= {r["model"] for r in summary["table"]}


def test_regression_table_with_three_views(tmp_path: Path) -> None:
    table = _table(tmp_path / "reg.parquet", classes=None)
    results = _run(tmp_path, table, "regression", ["b"], ["c", "a"])
    run = Path(results["manifest"].path).parent
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["regression"] and summary["metric"] == "ccc"
    report = (run / "report" / "report.md").read_text()
    assert "regression" in report and "CCC" in report and "RMSE" in report
    pred = pd.read_parquet(next((run / "student" / "pkdot").glob("fold-*/seed-*/predictions.parquet")))
    y = pred["y_true"].to_numpy()
    assert np.isfinite(y).all() and len(np.unique(y)) > 10  # real-valued targets, not classes
    # the unbounded head: the predictions are not squashed into tanh's range by construction
    assert np.isfinite(pred["y_pred"].to_numpy()).all()


@pytest.fixture(autouse=True)
def _jobs_in_process(monkeypatch):
    ran = jobs_in_process(monkeypatch)
    yield
    assert ran == ["teacher", "student"]  # in this process (no Ray Train run)
