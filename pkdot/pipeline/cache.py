"""Stage ``cache``: each frozen teacher run once over its fold's samples -> ``RUN/embeddings/``.

Only caches that are not fresh for their teacher (:func:`pkdot.train.cache.cache_is_fresh`) are rebuilt."""

from __future__ import annotations

from typing import Any

from pkdot.config import RunConfig
from pkdot.folds import load_fold_plan
from pkdot.pipeline import train_teacher
from pkdot.pipeline.base import Stage, StageOutput
from pkdot.rundir import RunDir
from pkdot.train.cache import build_stale_caches, cache_is_fresh, crossfit_cost, crossfit_groups_of


def key_extra(cfg: RunConfig, options: dict[str, Any]) -> dict[str, Any]:
    extra = train_teacher.key_extra(cfg, options)  # cross-fitted targets
    if cfg.distill.teacher_source != "fusion":  # another model's targets (fusion keys stay as they were)
        extra["teacher_source"] = cfg.distill.teacher_source
    return extra


def _pairs(cfg: RunConfig) -> list:
    return load_fold_plan(RunDir(cfg.run_dir).splits).pairs(cfg.train.seeds)  # each seed's own folds


def is_current(cfg: RunConfig, options: dict[str, Any]) -> bool:
    cf = crossfit_groups_of(cfg)
    return all(
        cache_is_fresh(cfg.run_dir, f.index, s, cf, cfg.distill.teacher_source) for s, f in _pairs(cfg)
    )


def run(cfg: RunConfig) -> StageOutput:
    paths, built = build_stale_caches(cfg, _pairs(cfg))
    return StageOutput(paths, {"files": len(paths), "built": built, **crossfit_cost(paths)})


STAGE = Stage(
    name="cache",
    sections=("seed", "data", "model", "train"),
    code=("models", "train"),
    output=lambda rd: rd.embeddings,
    body=run,
    key_extra=key_extra,
    is_current=is_current,
    help="Frozen-teacher embedding cache",
)
