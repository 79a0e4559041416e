"""The Prefect flow ``pkdot``: one task per stage of :data:`pkdot.pipeline.STAGES`, in that order.

Each task only calls :func:`pkdot.pipeline.run_stage`, which skips the stage when its outputs are up to date (the
library's one "up to date" decision): Prefect caches nothing, so a re-run of the flow on a finished run directory
shows every stage as a completed task whose result says ``skipped``. The flow holds the run directory's lock
(:func:`pkdot.pipeline.run_dir_lock`) for its whole run.

Every stage task is retried on *infrastructure* failures only (a Ray worker or node died, an object store full,
a connection reset: :func:`pkdot.ray_utils.is_infrastructure_error`); bad data or config (any other
:class:`PkdotError`) and exhausted resources (disk full, out of memory) fail at once. The flow marks the MLflow
parent run FAILED when it fails and KILLED when interrupted.

What the Prefect UI shows of a run: pkdot's own log lines in the flow run's logs
(:func:`send_library_logs_to_prefect`); a progress artifact per long stage (``pkdot-progress-<stage>``, fed by
:func:`pkdot.progress.report`); at the end the evaluation summary (markdown), the results table (one row per
model) and a link to the pipeline's MLflow run on the MLflow UI (``tracking.public_uri``).

``pkdot run`` calls :func:`pipeline` in-process (Prefect's ephemeral API); ``flows/serve.py`` and
``prefect.yaml`` expose it as the deployment ``pkdot/full-pipeline``.
"""

from __future__ import annotations

import logging
import typing
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from pkdot import pipeline as stages
from pkdot.config import RunConfig, load_config
from pkdot.errors import ConfigError, StageError
from pkdot.pipeline import STAGES
from pkdot.pipeline.base import Stage, StageResult
from pkdot.progress import Progress, listening
from pkdot.ray_utils import is_infrastructure_error
from pkdot.rundir import RunDir

# Under "pkdot" (not __name__: a worker loads this file by path, as a module with a generated name), so that
# the flow's own lines go where the library's go (see send_library_logs_to_prefect).
logger = logging.getLogger("pkdot.flows.pipeline")

#: The loggers whose records also go to the flow run's logs in Prefect (the UI's "Logs" tab).
RUN_LOGGERS: tuple[str, ...] = ("pkdot",)


class RunLogForwarder(logging.Handler):
    """Forwards pkdot's records emitted inside a Prefect flow or task run to Prefect's own handlers (the API
    handler that stores them as the run's logs); records emitted outside any run are left to the other
    handlers (the console), without Prefect's "attempted to send logs to the API without a flow run id"
    warning."""

    def __init__(self, targets: list[logging.Handler]) -> None:
        super().__init__()
        self.targets = targets

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.context import FlowRunContext, TaskRunContext

        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        for target in self.targets:
            if record.levelno >= target.level:
                target.handle(record)


def send_library_logs_to_prefect(names: tuple[str, ...] = RUN_LOGGERS) -> list[str]:
    """Send pkdot's log records to the logs of the flow run they are emitted in (the Prefect UI's "Logs").

    This is what ``PREFECT_LOGGING_EXTRA_LOGGERS=pkdot`` does, but that setting is read once, when Prefect
    configures logging on import; the process that runs a flow (the spawned child of ``flow.serve``, or
    ``python -m prefect.engine`` under a worker) has imported Prefect before it loads this file, so setting it
    here would be too late and setting it everywhere else is easy to forget. Each logger gets one
    :class:`RunLogForwarder` to the handlers Prefect configured for its ``prefect.extra`` logger (the API
    handler, which respects ``PREFECT_LOGGING_TO_API_ENABLED``); calling again points it at the current ones
    (Prefect may configure logging again). Levels stay the loggers' own (``pkdot -v``).

    Returns
    -------
    list of str
        The loggers that got a forwarder now (none when called again).
    """
    extra = logging.getLogger("prefect.extra")
    # Prefect's own handlers only (a test harness may add its capture handlers to every logger).
    targets = [h for h in extra.handlers if type(h).__module__.startswith("prefect.")]
    attached = []
    for name in names:
        library_logger = logging.getLogger(name)
        forwarders = [h for h in library_logger.handlers if isinstance(h, RunLogForwarder)]
        if forwarders:
            forwarders[0].targets = targets
            continue
        library_logger.addHandler(RunLogForwarder(targets))
        attached.append(name)
    return attached


send_library_logs_to_prefect()


def _deployment_log_level() -> None:
    """In a deployment run (served, or on a worker) with no level set for pkdot, use Prefect's level
    (``PREFECT_LOGGING_LEVEL``, INFO by default) so the flow run's logs show pkdot's INFO lines (stages run or
    skipped, jobs started); ``pkdot run`` keeps the CLI's level (WARNING, INFO with ``-v``)."""
    from prefect.runtime import deployment
    from prefect.settings import PREFECT_LOGGING_LEVEL

    library_logger = logging.getLogger(RUN_LOGGERS[0])
    if deployment.id is None or library_logger.level != logging.NOTSET:
        return
    level = logging.getLevelName(str(PREFECT_LOGGING_LEVEL.value()).upper())
    if isinstance(level, int):
        library_logger.setLevel(level)


#: Prefect retries of a stage after an infrastructure failure (see :func:`retry_on_infrastructure_error`).
IO_RETRIES = 2
IO_RETRY_DELAY_S = 10.0

#: Prefect artifact keys (lowercase letters, digits and dashes).
SUMMARY_ARTIFACT_KEY = "pkdot-summary"
MLFLOW_ARTIFACT_KEY = "pkdot-mlflow-run"
RESULTS_ARTIFACT_KEY = "pkdot-results"
PROGRESS_ARTIFACT_PREFIX = "pkdot-progress-"

#: The columns of the results table artifact (those of ``report/summary.json``'s table that exist).
RESULTS_COLUMNS: tuple[str, ...] = (
    "model",
    "metric",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "n",
    "macro_f1_mean",
    "mae_mean",
    "rmse_mean",
)

#: The address ``mlflow ui`` serves on by default (for links to runs kept in a local SQLite store).
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"


# ---- retries ------------------------------------------------------------------------------------------------
def _state_exception(state: State) -> BaseException | None:
    """The exception a failed task state holds (Prefect keeps it as the state's result)."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return exc
    data = getattr(state, "data", None)
    return data if isinstance(data, BaseException) else None


def retry_on_infrastructure_error(task: Any, task_run: TaskRun, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry infrastructure failures (a Ray worker/node died, out of memory,
    object store full, ``OSError``), never bad input (:class:`PkdotError`) nor programming errors."""
    exc = _state_exception(state)
    retry = is_infrastructure_error(exc)
    if exc is not None:
        logger.warning(
            "task %s failed (%s: %s); %s",
            task_run.name,
            type(exc).__name__,
            exc,
            "retrying" if retry else "not retried",
        )
    return retry


# ---- progress artifacts -------------------------------------------------------------------------------------
class StageProgressArtifact:
    """A Prefect progress artifact ``pkdot-progress-<stage>`` that follows the library's progress reports.

    Install it with :func:`pkdot.progress.listening` around a stage call (in a task run): the first report of
    ``stage`` creates the artifact (percent of jobs / shards done, "3 of 4 jobs done" as its description), the
    next ones update it. Reports of other stages are ignored.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.key = f"{PROGRESS_ARTIFACT_PREFIX}{stage}"
        self.artifact_id: Any = None
        self._last: tuple[int, int] | None = None

    def __call__(self, progress: Progress) -> None:
        if progress.stage != self.stage or self._last == (progress.done, progress.total):
            return
        description = f"{progress.stage}: {progress.done} of {progress.total} {progress.unit} done"
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                progress=progress.percent, key=self.key, description=description
            )
        else:
            update_progress_artifact(self.artifact_id, progress.percent, description=description)
        self._last = (progress.done, progress.total)


# ---- tasks: each only calls the library ------------------------------------------------------------------
@task(
    name="prepare-run",
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAY_S,
    retry_condition_fn=retry_on_infrastructure_error,
    cache_policy=NO_CACHE,
)
def prepare_run_task(cfg: RunConfig) -> RunConfig:
    """Create the run directory, write ``config.yaml`` and (when no data root is given) the synthetic set."""
    return stages.prepare_run(cfg)


def _stage_task(stage: Stage) -> Any:
    """The Prefect task of one stage: it calls :func:`pkdot.pipeline.run_stage` and nothing else."""

    def run(cfg: RunConfig, upstream: str = "") -> StageResult:
        with listening(StageProgressArtifact(stage.name)):
            return stages.run_stage(stage.name, cfg, upstream)

    run.__name__ = run.__qualname__ = f"{stage.name.replace('-', '_')}_task"
    run.__doc__ = stage.help
    return task(
        run,
        name=stage.name,
        retries=IO_RETRIES,
        retry_delay_seconds=IO_RETRY_DELAY_S,
        retry_condition_fn=retry_on_infrastructure_error,
        cache_policy=NO_CACHE,
    )


STAGE_TASKS = {s.name: _stage_task(s) for s in STAGES}


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
    task: str | None = None,
) -> RunConfig:
    """The flow's parameters -> a validated :class:`RunConfig` (via :func:`pkdot.config.load_config`).

    The named parameters are shorthands for dotted overrides: ``dataset`` -> ``data.dataset``, ``task`` ->
    ``data.task``, ``root`` -> ``data.root``, ``losses`` -> ``distill.losses``, ``folds`` ->
    ``train.max_folds`` (run only the first N folds), ``seed`` -> ``seed``, ``run_dir`` -> ``run_dir`` (made
    absolute). Giving the same key both ways with different values raises :class:`ConfigError` rather than
    silently preferring one.
    """
    merged: dict[str, Any] = dict(overrides or {})
    named = {
        "data.dataset": dataset,
        "data.task": task,
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


def _mlflow_run_link(
    tracking_uri: str, run_id: str, public_uri: str | None = None, experiment_id: str | None = None
) -> tuple[str, str]:
    """(link, description) of an MLflow run for people: its page on ``public_uri`` (the UI address,
    :func:`pkdot.tracking.resolve_public_uri`), else on the tracking server, else ``mlflow ui`` on a local
    store (:data:`LOCAL_MLFLOW_UI`)."""
    from pkdot.tracking.runs import run_ui_url

    if public_uri:
        where = f"{public_uri}" + (
            "" if public_uri == tracking_uri.rstrip("/") else f" (logged to {tracking_uri})"
        )
        return run_ui_url(public_uri, run_id, experiment_id), f"MLflow run {run_id} on {where}"
    if tracking_uri.startswith(("http://", "https://")):
        return run_ui_url(tracking_uri, run_id, experiment_id), f"MLflow run {run_id} on {tracking_uri}"
    return (
        run_ui_url(LOCAL_MLFLOW_UI, run_id, experiment_id),
        f"MLflow run {run_id} in the local store {tracking_uri}; open it with "
        f"`mlflow ui --backend-store-uri {tracking_uri}` first.",
    )


def results_table(summary_path: Path) -> list[dict[str, Any]]:
    """The rows of the results table artifact: one per model, :data:`RESULTS_COLUMNS` of the evaluate
    stage's ``report/summary.json`` (numbers rounded to 4 decimals)."""
    import json

    try:
        table = json.loads(Path(summary_path).read_text())["table"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(
            f"stage evaluate: cannot read the results table from {summary_path} (expected the JSON object "
            f"that pkdot.evaluate.report writes, with a 'table' list): {exc}"
        ) from exc
    rows = []
    for record in table:
        row = {c: record[c] for c in RESULTS_COLUMNS if c in record}
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    return rows


@flow(name="pkdot")
def pipeline(
    config_path: str | None = None,
    dataset: Literal["biovid", "affwild2", "table"] | None = None,
    task: Literal["binary", "multiclass", "valence", "arousal", "regression"] | None = None,
    root: str | None = None,
    preset: Literal["demo", "paper"] | None = None,
    losses: list[str] | None = None,
    folds: int | None = None,
    seed: int | None = None,
    run_dir: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the whole PKDOT pipeline: manifest, extract, train-teacher, cache, distill, evaluate.

    (Google style, unlike the rest of pkdot: Prefect reads the "Args" section into the parameter descriptions
    of the deployment's "Custom run" form.)

    Args:
        config_path: Path of a run config YAML (see pkdot.config); every field has a default, so none is
            needed. The other parameters override the file.
        dataset: Dataset adapter (data.dataset): biovid, affwild2, or table (bring-your-own feature table).
            Empty = the config file's, else biovid.
        task: Prediction target (data.task): binary (BL1 vs PA4) or multiclass pain for Biovid, valence or
            arousal for Aff-Wild2, regression for a table. Empty = the config file's, else binary.
        root: Dataset root folder (data.root). Empty = a synthetic set generated inside the run directory.
        preset: Model and training sizes: demo (tiny models, minutes on a CPU) or paper (the paper's sizes).
            Empty = the config file's preset key, else demo (a saved config is never silently re-based).
        losses: Distillation losses to train one student each with (distill.losses), e.g. ["none", "pkdot",
            "kd"]. Empty = the config's list.
        folds: Run only the first N subject folds (train.max_folds). Empty = every fold.
        seed: Global seed (same seed and data give the same metrics on CPU). Empty = the config's, else 0.
        run_dir: Run directory for every artifact and the default MLflow store.
            Relative paths are resolved in the process that runs the flow. Empty = the config's run_dir.
        overrides: Dotted config overrides, e.g. {"synth.subjects": 4, "train.epochs_student": 2}.

    Returns:
        {"run_dir", "config_hash", "stages": {stage: {"path", "fingerprint", "skipped"}}, "evaluate":
        {"report", "mlflow_run_id", "tracking_uri", "model_name", "model_version", "alias", ...}} (the
        evaluate stage's details without the report's markdown). "skipped" is True when the library found the
        stage's outputs up to date.
    """
    _deployment_log_level()
    cfg = build_config(config_path, dataset, root, preset, losses, folds, seed, run_dir, overrides, task=task)
    try:
        with stages.run_dir_lock(cfg.run_dir, command=f"prefect flow pkdot ({cfg.run_dir})"):
            return _pipeline_stages(cfg)
    except BaseException as exc:
        _end_parent_run(cfg, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise


# This module uses `from __future__ import annotations`, so the flow's annotations are strings. A served flow is
# pickled by value into the process that runs it, where names used only in annotations (Literal, Any) are not
# part of the function's globals: Prefect's parameter validation would fail to resolve them. Resolve them now.
pipeline.fn.__annotations__ = typing.get_type_hints(pipeline.fn)


def _end_parent_run(cfg: RunConfig, status: str) -> None:
    """Mark the run's MLflow parent run ended (a failed or interrupted flow must not leave it RUNNING)."""
    try:
        from pkdot.tracking.runs import end_parent_run

        end_parent_run(cfg.run_dir, status)
    except Exception as exc:  # noqa: BLE001 - never hide the flow's own error behind a tracking one
        logger.warning("could not mark the MLflow parent run of %s %s: %s", cfg.run_dir, status, exc)


def _pipeline_stages(cfg: RunConfig) -> dict[str, Any]:
    """The body of :func:`pipeline` once its config is built."""
    cfg = prepare_run_task(cfg)
    summary: dict[str, dict[str, Any]] = {}
    upstream = ""
    results: dict[str, StageResult] = {}
    for s in STAGES:
        result = results[s.name] = STAGE_TASKS[s.name](cfg, upstream)
        logger.info(
            "stage %s: %s (fingerprint %s)",
            s.name,
            "skipped" if result.skipped else "ran",
            result.fingerprint,
        )
        summary[s.name] = {
            "path": str(result.path),
            "fingerprint": result.fingerprint,
            "skipped": bool(result.skipped),
        }
        upstream = result.fingerprint

    # the evaluation (report, MLflow run) and the registered model (refit's, or evaluate's without refit)
    details = dict(results["evaluate"].details) | {
        k: v for k, v in results["refit"].details.items() if k.startswith(("model_", "registered_", "alias"))
    }
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
    create_table_artifact(
        table=results_table(RunDir(cfg.run_dir).summary),
        key=RESULTS_ARTIFACT_KEY,
        description=f"Test metric per model (mean, std and corrected 95% CI over runs) of {cfg.run_dir}",
    )
    from pkdot.tracking.runs import resolve_public_uri

    link, description = _mlflow_run_link(
        details["tracking_uri"],
        details["mlflow_run_id"],
        public_uri=resolve_public_uri(cfg, details["tracking_uri"]),
        experiment_id=details.get("experiment_id"),
    )
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
