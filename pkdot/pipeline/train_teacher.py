"""Stage ``train-teacher``: per fold x seed, the unimodal backbones, the fusion teacher and the T-Nets, as Ray
Train jobs (``RUN/teacher/``), and with ``train.refit`` the refit's teacher (``RUN/refit/teacher/``: it does not
depend on the student chosen later, so it shares this stage's Ray Train slots). Jobs that completed for the same
key are kept and resumed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pkdot.config import RunConfig
from pkdot.pipeline import refit
from pkdot.pipeline.base import Stage, StageOutput
from pkdot.rundir import METRICS, RunDir
from pkdot.tracking.runs import log_jobs
from pkdot.train import ray_runner
from pkdot.train.data import write_run_folds
from pkdot.train.jobs import teacher_cost, teacher_jobs
from pkdot.train.teacher import checkpoint_files


def key_extra(cfg: RunConfig, options: dict[str, Any]) -> dict[str, Any]:
    # cross-fitted targets add teacher jobs (fit keys stay as they were)
    if cfg.distill.teacher_targets == "crossfit":
        return {"teacher_targets": ["crossfit", cfg.distill.crossfit_groups]}
    return {}


def run(cfg: RunConfig, *, callbacks: Any = ()) -> StageOutput:
    rd = RunDir(cfg.run_dir)
    jobs = teacher_jobs(cfg, write_run_folds(cfg, rd.root))
    more = []
    if cfg.train.refit:
        rcfg, plan = refit.prepare_refit(cfg)
        more.append((rcfg, teacher_jobs(rcfg, plan)))
    ray_runner.run_jobs_on_ray(cfg, "teacher", jobs, callbacks=callbacks, more=more)
    refit_jobs = [j for _, js in more for j in js]
    metrics = {}
    for job in jobs:
        group = "" if job.group is None else f"_without{job.group}"  # cross-fitting teachers
        for k, v in json.loads((Path(job.out_dir) / METRICS).read_text()).items():
            metrics[f"fold{job.fold}_seed{job.seed}{group}/{k}"] = v
    checkpoints = [p for j in [*jobs, *refit_jobs] for p in checkpoint_files(j)]
    details = dict(jobs=len(jobs), refit_jobs=len(refit_jobs), cost=teacher_cost(jobs), metrics=metrics)
    log_jobs(cfg, "train-teacher", jobs)
    splits = [rd.splits, rd.refit.splits] if refit_jobs else [rd.splits]
    return StageOutput([*checkpoints, *splits], details)


STAGE = Stage(
    name="train-teacher",
    sections=("seed", "data", "features", "model", "train"),
    code=("models", "train", "folds.py", "scheduler.py", "ray_utils.py", "pipeline/refit.py"),
    output=lambda rd: rd.teachers,
    body=run,
    key_extra=key_extra,
    stale=lambda cfg, options: [(rd := RunDir(cfg.run_dir)).teachers, rd.refit.teachers],  # its jobs
    help="Teachers + T-Nets per fold and seed, on Ray Train",
)
