"""Stage ``evaluate``: metrics, corrected intervals, paired comparisons, ``RUN/report/``; logs the evaluation
to MLflow; with ``train.refit: false`` registers the student chosen on validation
(:func:`pkdot.evaluate.aggregate.select_student`), else the ``refit`` stage registers that configuration refit on
every subject."""

from __future__ import annotations

from typing import Any

from pkdot.config import RunConfig
from pkdot.data.manifest import read_manifest
from pkdot.errors import ConfigError
from pkdot.evaluate.report import EvaluationSummary, evaluate_run
from pkdot.folds import load_fold_plan
from pkdot.pipeline.base import Stage, StageOutput, read_marker
from pkdot.pipeline.manifest import STAGE as MANIFEST
from pkdot.rundir import RunDir
from pkdot.tracking import registry, runs
from pkdot.train.student import load_trained_student


def _robustness(cfg: RunConfig, options: dict[str, Any]) -> bool:
    robustness = options.get("robustness")
    if robustness is None:
        return cfg.robustness_curves
    if robustness and "video" not in cfg.data.student_modalities:
        raise ConfigError(
            f"evaluate --robustness: the student reads {cfg.data.student_modalities}; the robustness curves "
            "degrade test video"
        )
    return bool(robustness)


def key_extra(cfg: RunConfig, options: dict[str, Any]) -> dict[str, Any]:
    # the MLflow store it registers to; a report with robustness curves is a different output
    extra: dict[str, Any] = {"tracking_uri": runs.resolve_tracking_uri(cfg)}
    if _robustness(cfg, options):
        extra["robustness"] = True
    return extra


def register(
    cfg: RunConfig, summary: EvaluationSummary, rcfg: RunConfig, loss: str, fold: int, seed: int, **extra: Any
) -> dict[str, Any]:
    """Register the student (loss, fold, seed) of the run ``rcfg`` (this run, or its refit) in MLflow."""
    student, shapes = load_trained_student(rcfg, loss, fold, seed)
    input_shape = shapes[cfg.data.student_modalities[0]]
    manifest = read_manifest(RunDir(cfg.run_dir).manifest)
    fingerprint = (read_marker(cfg, MANIFEST) or {}).get("fingerprint", "")
    return registry.register_best(
        cfg, summary, student, input_shape, manifest=manifest, manifest_fingerprint=fingerprint, **extra
    )


def run(cfg: RunConfig, *, robustness: bool | None = None) -> StageOutput:
    summary = evaluate_run(cfg, robustness=_robustness(cfg, {"robustness": robustness}))
    details: dict[str, Any] = {
        "report": str(summary.report_path),
        "best_student": summary.best_student,
        "summary_markdown": summary.report_path.read_text(),
        **runs.log_evaluation(cfg, summary),
    }
    if cfg.tracking.register_model and (sel := summary.selection) is not None and not cfg.train.refit:
        # the student chosen on validation: its (fold, seed) run with the best validation score
        f = load_fold_plan(RunDir(cfg.run_dir).splits).fold(sel.seed, sel.fold)
        subjects = {"train": f.train, "val": f.val, "test": f.test}
        details |= register(cfg, summary, cfg, sel.loss, sel.fold, sel.seed, subjects=subjects, unit=f.unit)
    runs.end_parent_run(cfg.run_dir, "FINISHED")
    return StageOutput([summary.report_path], details)


STAGE = Stage(
    name="evaluate",
    sections=("seed", "data", "train", "distill", "tracking", "evaluate"),
    code=("evaluate", "tracking", "models", "train", "metrics.py"),
    output=lambda rd: rd.report,
    body=run,
    key_extra=key_extra,
    help="Report, plots, MLflow registry",
)
