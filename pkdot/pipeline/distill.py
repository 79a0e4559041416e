"""Stage ``distill``: one student per loss x fold x seed, from the cache, as Ray Train jobs (``RUN/student/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pkdot.config import RunConfig, loss_names_problem
from pkdot.errors import ConfigError
from pkdot.folds import load_fold_plan
from pkdot.pipeline.base import Stage, StageOutput
from pkdot.rundir import RunDir
from pkdot.tracking.runs import log_jobs
from pkdot.train import ray_runner
from pkdot.train.jobs import student_jobs


def _losses(cfg: RunConfig, options: dict[str, Any]) -> list[str]:
    if not options.get("losses"):
        return list(cfg.distill.losses)
    if problem := loss_names_problem(list(options["losses"])):
        raise ConfigError(f"--loss: {problem}")
    return list(options["losses"])


def key_extra(cfg: RunConfig, options: dict[str, Any]) -> dict[str, Any]:
    return {"losses": _losses(cfg, options)}


def run(cfg: RunConfig, *, losses: list[str] | None = None, callbacks: Any = ()) -> StageOutput:
    rd = RunDir(cfg.run_dir)
    losses = _losses(cfg, {"losses": losses})
    jobs = student_jobs(cfg, load_fold_plan(rd.splits), losses)
    ray_runner.run_jobs_on_ray(cfg, "student", jobs, callbacks=callbacks)
    log_jobs(cfg, "distill", jobs)
    return StageOutput([Path(j.out_dir) / "student.pt" for j in jobs], {"jobs": len(jobs), "losses": losses})


STAGE = Stage(
    name="distill",
    sections=("seed", "data", "model", "train", "distill"),
    code=("distill", "models", "train", "scheduler.py", "ray_utils.py"),
    output=lambda rd: rd.students,
    body=run,
    key_extra=key_extra,
    stale=lambda cfg, options: [RunDir(cfg.run_dir).students / loss for loss in _losses(cfg, options)],
    help="Students, one per loss, fold and seed, on Ray Train",
)
