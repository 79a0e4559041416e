"""The Prefect flow ``pkdot``: manifest -> extract -> train-teacher -> cache -> distill -> evaluate.

Each stage is a Prefect task that only calls the matching function of :mod:`pkdot.stages` and returns its
:class:`pkdot.stages.StageResult`. Two lines of defence make a re-run after a failure cheap:

1. **Prefect task caching.** A stage's cache key (every stage but the manifest, which re-scans the dataset) is built from its inputs only::

       key = "<stage>-<pkdot version>-<cfg.section_hash(*STAGE_INPUTS[stage])>-<upstream fingerprint>"

   where the upstream fingerprint is the hash of the previous stage's outputs, so a change anywhere upstream
   changes every key below it. Results are persisted with the run, under ``<run_dir>/.prefect/results/``:
   deleting a run directory deletes its cache, and two run directories never share one. A cached result whose
   artifact path has disappeared is recomputed (``refresh_cache``), never trusted.
2. **The library's own idempotence.** Every ``stage_*`` function skips itself when its outputs are complete
   for the same inputs (``StageResult.skipped``), e.g. after the Prefect cache was lost.

The I/O stages (manifest, extract) are retried. At the end the flow publishes two Prefect artifacts: the
evaluation summary (markdown) and a link to the pipeline's MLflow run.

``pkdot run`` calls :func:`pipeline` in-process (Prefect's ephemeral API); ``flows/serve.py`` and
``prefect.yaml`` expose it as the deployment ``pkdot/full-pipeline``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.states import State

import pkdot
from pkdot import stages
from pkdot.config import RunConfig, load_config
from pkdot.errors import ConfigError, PkdotError, StageError
from pkdot.stages import StageResult

logger = logging.getLogger(__name__)

#: Stages in execution order.
STAGE_ORDER: tuple[str, ...] = ("manifest", "extract", "train-teacher", "cache", "distill", "evaluate")

#: The config sections (top-level RunConfig fields) each cached stage reads; with the upstream fingerprint they
#: make the stage's cache key. ``seed`` is part of every key. Over-inclusion only costs a call into the library,
#: which then skips itself; under-inclusion would return stale results, so when in doubt a section is listed.
#: The manifest stage is not cached (see :func:`manifest_task`).
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "extract": ("seed", "data", "features"),
    "train-teacher": ("seed", "data", "features", "model", "train"),
    "cache": ("seed", "data", "model", "train"),
    "distill": ("seed", "data", "model", "train", "distill"),
    "evaluate": ("seed", "data", "train", "distill", "tracking"),
}

#: Prefect retries of the I/O stages (reading recordings, writing Parquet).
IO_RETRIES = 2
IO_RETRY_DELAY_S = 10.0

#: Where a run directory keeps its persisted Prefect task results (and so its task cache).
RESULTS_DIR = Path(".prefect") / "results"

#: Prefect artifact keys (lowercase letters, digits and dashes).
SUMMARY_ARTIFACT_KEY = "pkdot-summary"
MLFLOW_ARTIFACT_KEY = "pkdot-mlflow-run"

#: The address ``mlflow ui`` serves on by default (for links to runs kept in a local SQLite store).
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"


# ---- cache keys -----------------------------------------------------------------------------------------------
def stage_cache_key(stage: str, cfg: RunConfig, upstream: str) -> str:
    """The Prefect cache key of ``stage`` for a config and an upstream fingerprint.

    Parameters
    ----------
    stage : str
        One of :data:`STAGE_ORDER`.
    cfg : RunConfig
        The run's configuration (after :func:`pkdot.stages.prepare_run`).
    upstream : str
        The fingerprint of the previous stage's outputs (``""`` for the first stage).

    Returns
    -------
    str
        ``"<stage>-<version>-<section hash>-<upstream>"``; evaluate also hashes the resolved MLflow tracking
        URI, so pointing a run at another MLflow server registers the model there instead of reusing a result
        that was registered elsewhere.
    """
    if stage not in STAGE_INPUTS:
        raise StageError(f"unknown stage {stage!r} (expected one of {list(STAGE_ORDER)})")
    section_hash = cfg.section_hash(*STAGE_INPUTS[stage])
    parts = [stage, pkdot.__version__.replace(".", "_"), section_hash, upstream or "none"]
    if stage == "evaluate":
        from pkdot.tracking import resolve_tracking_uri  # imports mlflow: only when needed

        parts.append(hashlib.sha256(resolve_tracking_uri(cfg).encode()).hexdigest()[:12])
    return "-".join(parts)


def _cache_key_fn(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        return stage_cache_key(stage, parameters["cfg"], parameters["upstream"])

    key.__name__ = f"cache_key_{stage.replace('-', '_')}"
    return key


def retry_unless_pkdot_error(task: Any, task_run: TaskRun, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O failures, not :class:`PkdotError` (bad input stays bad)."""
    return not isinstance(state.data, PkdotError)


# ---- tasks: each only calls the library ------------------------------------------------------------------
@task(
    name="prepare-run",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_pkdot_error,
)
def prepare_run_task(cfg: RunConfig) -> RunConfig:
    """Create the run directory, write ``config.yaml`` and (when no data root is given) the synthetic set."""
    return stages.prepare_run(cfg)


@task(
    name="manifest",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_pkdot_error,
    cache_policy=NO_CACHE,
)
def manifest_task(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Stage 0: the dataset adapter's manifest (``RUN/manifest.parquet``).

    Never cached: it re-scans the dataset root every run (cheap), so files added to a dataset are seen; its
    fingerprint (a hash of the manifest's rows) keys everything downstream.
    """
    return stages.stage_manifest(cfg, upstream)


@task(
    name="extract",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAY_S,
    retry_condition_fn=retry_unless_pkdot_error,
    cache_key_fn=_cache_key_fn("extract"),
    persist_result=True,
)
def extract_task(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Stage 1: face crops, physiological and audio features (``RUN/features/``)."""
    return stages.stage_extract(cfg, upstream)


@task(name="train-teacher", cache_key_fn=_cache_key_fn("train-teacher"), persist_result=True)
def train_teacher_task(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Stage 2: unimodal backbones, the fused teacher and the T-Net per fold (``RUN/teacher/``)."""
    return stages.stage_train_teacher(cfg, upstream)


@task(name="cache", cache_key_fn=_cache_key_fn("cache"), persist_result=True)
def cache_task(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Stage 3: frozen teacher embeddings and student features (``RUN/embeddings/``)."""
    return stages.stage_cache(cfg, upstream)


@task(name="distill", cache_key_fn=_cache_key_fn("distill"), persist_result=True)
def distill_task(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Stage 4: one student per distillation loss, fold and seed (``RUN/student/``)."""
    return stages.stage_distill(cfg, upstream)


@task(name="evaluate", cache_key_fn=_cache_key_fn("evaluate"), persist_result=True)
def evaluate_task(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Stage 5: metrics, report, and registration of the student in MLflow (``RUN/report/``)."""
    return stages.stage_evaluate(cfg, upstream)


STAGE_TASKS = {
    "manifest": manifest_task,
    "extract": extract_task,
    "train-teacher": train_teacher_task,
    "cache": cache_task,
    "distill": distill_task,
    "evaluate": evaluate_task,
}


# ---- flow helpers (orchestration only) ---------------------------------------------------------------------
def build_config(
    config_path: str | None = None,
    dataset: str | None = None,
    root: str | None = None,
    preset: str | None = None,
    losses: list[str] | None = None,
    folds: int | None = None,
    seed: int | None = None,
    run_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunConfig:
    """The flow's parameters -> a validated :class:`RunConfig` (via :func:`pkdot.config.load_config`).

    The named parameters are shorthands for dotted overrides: ``dataset`` -> ``data.dataset``, ``root`` ->
    ``data.root``, ``losses`` -> ``distill.losses``, ``folds`` -> ``train.max_folds`` (run only the first N
    folds), ``seed`` -> ``seed``, ``run_dir`` -> ``run_dir`` (made absolute). Giving the same key both ways
    with different values raises :class:`ConfigError` rather than silently preferring one.
    """
    merged: dict[str, Any] = dict(overrides or {})
    named = {
        "data.dataset": dataset,
        "data.root": root,
        "distill.losses": losses,
        "train.max_folds": folds,
        "seed": seed,
        "run_dir": run_dir,
    }
    for key, value in named.items():
        if value is None:
            continue
        if key in merged and merged[key] is not None and merged[key] != value:
            raise ConfigError(
                f"parameter {key!r} is given twice with different values: {merged[key]!r} in overrides "
                f"and {value!r} as a flow parameter"
            )
        merged[key] = value
    cfg = load_config(config_path, preset=preset, overrides=merged)
    # Absolute, so that every process of the run (Ray workers on other nodes too) sees the same directory.
    return cfg.model_copy(update={"run_dir": Path(cfg.run_dir).resolve()})


def _mlflow_run_link(tracking_uri: str, run_id: str) -> tuple[str, str]:
    """(link, description) of an MLflow run: the server's UI, or ``mlflow ui`` for a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/runs/{run_id}", f"MLflow run {run_id} on {tracking_uri}"
    return (
        f"{LOCAL_MLFLOW_UI}/#/runs/{run_id}",
        f"MLflow run {run_id} in the local store {tracking_uri}; open it with "
        f"`mlflow ui --backend-store-uri {tracking_uri}` first.",
    )


def _run_stage(name: str, cfg: RunConfig, upstream: str, results_dir: Path) -> tuple[StageResult, bool]:
    """Run one stage task; returns its result and whether Prefect served it from the cache."""
    stage_task = STAGE_TASKS[name].with_options(result_storage=results_dir)
    state: State = stage_task(cfg, upstream, return_state=True)
    result: StageResult = state.result()
    cached = state.name == "Cached"
    if cached and not Path(result.path).exists():
        logger.warning("stage %s: cached result points at missing %s; recomputing", name, result.path)
        state = stage_task.with_options(refresh_cache=True)(cfg, upstream, return_state=True)
        result = state.result()
        cached = False
    logger.info(
        "stage %s: %s (fingerprint %s)",
        name,
        "cached" if cached else ("skipped by the library" if result.skipped else "ran"),
        result.fingerprint,
    )
    return result, cached


@flow(name="pkdot")
def pipeline(
    config_path: str | None = None,
    dataset: str | None = None,
    root: str | None = None,
    preset: str | None = None,
    losses: list[str] | None = None,
    folds: int | None = None,
    seed: int | None = None,
    run_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the whole PKDOT pipeline: manifest -> extract -> train-teacher -> cache -> distill -> evaluate.

    Parameters
    ----------
    config_path : str, optional
        A run config YAML (see :mod:`pkdot.config`); every field has a default.
    dataset : str, optional
        ``biovid``, ``affwild2`` or ``table`` (``data.dataset``).
    root : str, optional
        Dataset root (``data.root``); None = the run's synthetic set.
    preset : str, optional
        ``demo`` (tiny models, minutes on a CPU) or ``paper`` (the paper's sizes). None = the config file's
        ``preset`` key, else ``demo`` (so a saved config is not silently re-based on another preset).
    losses : list of str, optional
        Distillation losses to train students with (``distill.losses``).
    folds : int, optional
        Run only the first N subject folds (``train.max_folds``).
    seed : int, optional
        Global seed.
    run_dir : str, optional
        Run directory (artifacts, persisted task results, default MLflow store).
    overrides : dict, optional
        Dotted config overrides, e.g. ``{"synth.subjects": 4, "train.epochs_student": 2}``.

    Returns
    -------
    dict
        ``{"run_dir", "config_hash", "stages": {stage: {"path", "fingerprint", "skipped", "cached"}},
        "evaluate": {"report", "mlflow_run_id", "tracking_uri", "model_name", "model_version", "alias", ...}}``
        (the evaluate stage's details without the report's markdown).
        ``cached`` is True when Prefect reused the stage's persisted result; ``skipped`` when the library found
        the stage's outputs complete.
    """
    cfg = build_config(config_path, dataset, root, preset, losses, folds, seed, run_dir, overrides)
    cfg = prepare_run_task(cfg)
    results_dir = Path(cfg.run_dir).resolve() / RESULTS_DIR
    results_dir.mkdir(parents=True, exist_ok=True)

    summary: dict[str, dict[str, Any]] = {}
    upstream = ""
    result: StageResult | None = None
    for name in STAGE_ORDER:
        result, cached = _run_stage(name, cfg, upstream, results_dir)
        summary[name] = {
            "path": str(result.path),
            "fingerprint": result.fingerprint,
            "skipped": bool(result.skipped),
            "cached": cached,
        }
        upstream = result.fingerprint

    if result is None or result.stage != "evaluate":
        raise StageError(f"the flow ended on {result and result.stage!r}, expected the evaluate stage")
    details = dict(result.details)
    missing = [k for k in ("summary_markdown", "mlflow_run_id", "tracking_uri") if k not in details]
    if missing:
        raise StageError(
            f"stage evaluate: StageResult.details lacks {missing} (expected by the flow's artifacts)"
        )
    create_markdown_artifact(
        markdown=details["summary_markdown"],
        key=SUMMARY_ARTIFACT_KEY,
        description=f"PKDOT evaluation summary of {cfg.run_dir}",
    )
    link, description = _mlflow_run_link(details["tracking_uri"], details["mlflow_run_id"])
    create_link_artifact(
        link=link,
        link_text=f"MLflow run {details['mlflow_run_id']}",
        key=MLFLOW_ARTIFACT_KEY,
        description=description,
    )
    evaluation = {k: v for k, v in details.items() if k != "summary_markdown"}
    return {
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "config_hash": cfg.section_hash(),
        "stages": summary,
        "evaluate": evaluation,
    }
