"""A student trained on a sum of losses (``kd+pkdot``): one job, each term logged, total = weighted sum."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pkdot.folds import save_folds, subject_folds
from pkdot.rundir import RunDir
from pkdot.train.cache import build_cache
from pkdot.train.data import load_samples, split_fold
from pkdot.train.jobs import WorkerContext, student_jobs, teacher_jobs
from pkdot.train.student import run_student_job
from pkdot.train.teacher import run_teacher_job
from tests.train.conftest import make_tiny_run


def test_a_composite_student_trains_and_logs_each_term(tmp_path) -> None:
    cfg = make_tiny_run(
        tmp_path / "run",
        overrides={
            "distill": {"losses": ["kd+pkdot"], "kd": {"weight": 0.5}},
            "train": {"epochs_student": 2},
        },
    )
    run_dir = Path(cfg.run_dir)
    samples = load_samples(cfg, run_dir)
    folds = subject_folds(sorted(set(samples.subject_ids.tolist())), 3, seed=0)[:1]
    save_folds(folds, RunDir(run_dir).splits)
    run_teacher_job(cfg, teacher_jobs(cfg, folds)[0], split_fold(samples, folds[0]), WorkerContext())
    build_cache(cfg, samples, 0, 0)
    (job,) = student_jobs(cfg, folds, cfg.distill.losses)
    assert Path(job.out_dir) == RunDir(run_dir).student("kd+pkdot", 0, 0) and "student/kd+pkdot/" in job.key
    data = split_fold(load_samples(cfg, run_dir, modalities=["video"]), folds[0])
    for part in (data.train, data.val, data.test):
        part.arrays = {}
    assert 0.0 <= run_student_job(cfg, job, data, WorkerContext())["test_accuracy"] <= 1.0
    epochs = json.loads((Path(job.out_dir) / "history.json").read_text())["phases"]["student-kd+pkdot"][
        "epochs"
    ]
    for record in epochs:
        assert {"loss_task", "loss_kd", "loss_pkdot"} <= set(record) and record["loss_pkdot"] > 0
        parts = record["loss_task"] + record["loss_kd"] + record["loss_pkdot"]
        assert record["train_loss"] == pytest.approx(parts, rel=1e-5)
    assert set(pd.read_parquet(Path(job.out_dir) / "predictions.parquet")["model"]) == {"student-kd+pkdot"}
