"""The pipeline: :data:`STAGES`, the one ordered list of stages, and the functions that run them. Each stage's
module reads top to bottom (its body, then its ``Stage``); ``flows/`` and ``pkdot.cli`` build a task / a subcommand
per stage."""

from __future__ import annotations

import logging
import time
from typing import Any

from pkdot.config import RunConfig
from pkdot.errors import StageError
from pkdot.pipeline import cache, distill, evaluate, extract, manifest, refit, train_teacher
from pkdot.pipeline.base import Stage, StageResult, execute
from pkdot.pipeline.lock import run_dir_lock
from pkdot.pipeline.prepare import prepare_run

__all__ = ["STAGES", "prepare_run", "run_all", "run_dir_lock", "run_stage", "stage"]

status = logging.getLogger("pkdot.status")

#: The stages, in execution order.
STAGES: tuple[Stage, ...] = tuple(
    m.STAGE for m in (manifest, extract, train_teacher, cache, distill, evaluate, refit)
)
_INDEX = {s.name: i for i, s in enumerate(STAGES)}


def stage(name: str) -> Stage:
    """The stage called ``name``."""
    if name not in _INDEX:
        raise StageError(f"unknown stage {name!r} (expected one of {list(_INDEX)})")
    return STAGES[_INDEX[name]]


def run_stage(name: str, cfg: RunConfig, upstream: str = "", **options: Any) -> StageResult:
    """Run stage ``name`` on ``cfg.run_dir`` unless it is up to date; ``upstream`` is the previous stage's output
    fingerprint when the caller has it (checked against that stage's marker)."""
    return execute(cfg, STAGES, STAGES.index(stage(name)), upstream, **options)


def run_all(cfg: RunConfig) -> dict[str, StageResult]:
    """Every stage in order, in this process (what ``pkdot run --no-prefect`` does), holding the run lock."""
    with run_dir_lock(cfg.run_dir, command="pkdot run --no-prefect"):
        cfg = prepare_run(cfg)
        results: dict[str, StageResult] = {}
        upstream = ""
        for s in STAGES:
            t0 = time.time()
            results[s.name] = res = run_stage(s.name, cfg, upstream)
            state = "skipped (up to date)" if res.skipped else "done"
            status.info("stage %s %s in %.1fs", s.name, state, time.time() - t0)
            upstream = res.fingerprint
        return results
