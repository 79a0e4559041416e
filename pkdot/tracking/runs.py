"""MLflow run lifecycle: one experiment (``cfg.tracking.experiment``), one *parent* run per run directory (the
config as params and artifact; its id in ``RUN/mlflow_parent.json``, shared by every process) and one *nested*
run per stage call, named ``<stage>[/fold-<k>][/seed-<s>]``."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pkdot.config import RunConfig
from pkdot.errors import StageError
from pkdot.rundir import HISTORY, METRICS, RunDir, atomic_write_json

logger = logging.getLogger(__name__)

#: MLflow's limits (mlflow.utils.validation): params per ``log_batch``, param length, metrics per ``log_batch``.
PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE_LENGTH = 6000
METRICS_PER_BATCH = 1000
PARENT_FILE = "mlflow_parent.json"
#: MLflow 3 opens an experiment on its GenAI overview unless it is tagged as model development.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: Environment variable with the MLflow UI address people open (set by docker-compose.yml).
PUBLIC_URI_ENV = "PKDOT_MLFLOW_PUBLIC_URI"
#: MLflow loggers whose INFO lines are store set-up chatter ("Creating initial MLflow database tables...").
MLFLOW_NOISY_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic")


def resolve_tracking_uri(cfg: RunConfig) -> str:
    """``cfg.tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run_dir>/mlflow.db``."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.run_dir).resolve()}/mlflow.db"


def resolve_public_uri(cfg: RunConfig, tracking_uri: str | None = None) -> str | None:
    """The MLflow UI address for links people open: ``cfg.tracking.public_uri``, else ``$PKDOT_MLFLOW_PUBLIC_URI``,
    else the tracking URI when it is an ``http(s)://`` server; None for a local store (no UI to link to)."""
    if cfg.tracking.public_uri:
        return cfg.tracking.public_uri.rstrip("/")
    if os.environ.get(PUBLIC_URI_ENV):
        return os.environ[PUBLIC_URI_ENV].rstrip("/")
    uri = tracking_uri or resolve_tracking_uri(cfg)
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def run_ui_url(public_uri: str, run_id: str, experiment_id: str | None = None) -> str:
    """The MLflow UI page of a run (``<ui>/#/experiments/<id>/runs/<run>``, or ``<ui>/#/runs/<run>``)."""
    experiment = "" if experiment_id is None else f"/experiments/{experiment_id}"
    return f"{public_uri.rstrip('/')}/#{experiment}/runs/{run_id}"


def _mlflow_store_chatter_filter(record: logging.LogRecord) -> bool:
    """Store set-up chatter only as a warning, at INFO (``pkdot -v``) or with ``$MLFLOW_LOGGING_LEVEL``."""
    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    return record.levelno >= logging.WARNING or verbose or bool(os.environ.get("MLFLOW_LOGGING_LEVEL"))


for _name in MLFLOW_NOISY_LOGGERS:
    logging.getLogger(_name).addFilter(_mlflow_store_chatter_filter)  # once: addFilter skips a filter it has
# MLflow prints "View run <name> at: <tracking server>/#/..." per ended run, with the address the processes log
# to, not the one people open (pkdot links with resolve_public_uri). "false" brings MLflow's lines back.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def use_tracking_uri(uri: str) -> None:
    """Point MLflow's fluent API at ``uri`` without leaving it in ``$MLFLOW_TRACKING_URI``."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _param_value(key: str, value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        logger.warning(
            "param %s is %d characters long; MLflow keeps %d", key, len(text), MAX_PARAM_VALUE_LENGTH
        )
        text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
    return text


def _metric_value(key: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise StageError(f"metric {key!r}: expected a number, got {type(value).__name__} ({value!r})")
    return float(value)


class StageRun:
    """A nested MLflow run of one stage call (or the parent run); logs through :class:`MlflowClient`."""

    def __init__(self, client: MlflowClient, run_id: str, name: str) -> None:
        self._client, self.run_id, self.name = client, run_id, name

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at ``step`` (0 when None); MLflow refuses '+' in names: a composite loss's
        ``kd+pkdot`` is logged as ``kd_plus_pkdot``."""
        now = int(time.time() * 1000)
        entries = [
            Metric(k.replace("+", "_plus_"), _metric_value(k, v), now, int(step or 0))
            for k, v in metrics.items()
        ]
        for i in range(0, len(entries), METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=entries[i : i + METRICS_PER_BATCH])

    def log_params(self, params: Mapping[str, Any]) -> None:
        entries = [Param(k, _param_value(k, v)) for k, v in params.items()]
        for i in range(0, len(entries), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=entries[i : i + PARAMS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not Path(path).is_file():
            raise StageError(f"artifact {path} does not exist or is not a file")
        self._client.log_artifact(self.run_id, str(path), artifact_path)


def _read_parent_file(path: Path) -> tuple[str, str] | None:
    """The parent run's id and tracking URI recorded in ``path`` (``RUN/mlflow_parent.json``); None if absent."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return str(data["run_id"]), str(data["tracking_uri"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise StageError(
            f"{path}: expected JSON {{'run_id', 'tracking_uri'}} naming the parent MLflow run ({exc})"
        ) from exc


class Tracker:
    """MLflow logging for one run directory (sets only MLflow's tracking URI, :func:`use_tracking_uri`)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = resolve_tracking_uri(cfg)
        use_tracking_uri(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None

    @property
    def experiment_id(self) -> str:
        """Id of ``cfg.tracking.experiment`` (created on first use, tagged :data:`EXPERIMENT_KIND`)."""
        if self._experiment_id is None:
            name = self.cfg.tracking.experiment
            if (exp := self.client.get_experiment_by_name(name)) is None:
                sqlite = self.tracking_uri.startswith("sqlite:")
                location = (self.run_dir / "mlartifacts").as_uri() if sqlite else None
                try:
                    self.client.create_experiment(name, artifact_location=location)
                except MlflowException as exc:  # created meanwhile by another process
                    logger.debug("experiment %r: %s", name, exc)
                if (exp := self.client.get_experiment_by_name(name)) is None:
                    raise StageError(
                        f"MLflow experiment {name!r} could not be created at {self.tracking_uri}"
                    )
            if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                self.client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
            self._experiment_id = exp.experiment_id
        return self._experiment_id

    def parent_run_id(self) -> str:
        """The parent run of this run directory, created once (``RUN/mlflow_parent.json``, under a file lock); a
        file naming another store gets a new parent, one whose run is missing raises :class:`StageError`."""
        if self._parent_run_id is not None:
            return self._parent_run_id
        path = RunDir(self.run_dir).mlflow_parent
        with open(self.run_dir / f".{PARENT_FILE}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                run_id = self._existing_parent(path) or self._create_parent_run(path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._parent_run_id = run_id
        return run_id

    def _existing_parent(self, path: Path) -> str | None:
        if (parent := _read_parent_file(path)) is None:
            return None
        run_id, stored_uri = parent
        if stored_uri != self.tracking_uri:
            logger.warning(
                "%s names parent run %s in store %s; this run tracks to %s: starting a new parent",
                path, run_id, stored_uri, self.tracking_uri,
            )  # fmt: skip
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException as exc:
            raise StageError(
                f"{path}: parent run {run_id} is not in the MLflow store {self.tracking_uri} "
                f"(deleted? remove the file to start a new parent): {exc}"
            ) from exc
        return run_id

    def _create_parent_run(self, path: Path) -> str:
        cfg = self.cfg
        tags = dict(
            run_dir=str(self.run_dir), preset=cfg.preset, dataset=cfg.data.dataset, task=cfg.data.task
        )
        tags = {f"pkdot.{k}": v for k, v in tags.items()} | {"pkdot.config_hash": cfg.section_hash()}
        run_id = self.client.create_run(self.experiment_id, run_name=cfg.name, tags=tags).info.run_id
        StageRun(self.client, run_id, cfg.name).log_params(cfg.flat())
        self.client.log_text(run_id, cfg.yaml_text(), "config.yaml")
        doc = {"run_id": run_id, "tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id}
        atomic_write_json(path, doc, indent=2)
        logger.info(
            "MLflow parent run %s (experiment %r, %s)", run_id, cfg.tracking.experiment, self.tracking_uri
        )
        return run_id

    @contextmanager
    def stage_run(
        self, stage: str, fold: int | None = None, seed: int | None = None, **tags: Any
    ) -> Iterator[StageRun]:
        """A nested run named ``stage[/fold-k][/seed-s]``; FAILED (KILLED on Ctrl-C) when the block raises."""
        parent = self.parent_run_id()
        parts = {k: v for k, v in (("fold", fold), ("seed", seed)) if v is not None}
        name = stage + "".join(f"/{k}-{v}" for k, v in parts.items())
        run_tags = {MLFLOW_PARENT_RUN_ID: parent, MLFLOW_RUN_NAME: name, "pkdot.stage": stage}
        run_tags |= {f"pkdot.{k}": str(v) for k, v in parts.items()} | {k: str(v) for k, v in tags.items()}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags)
        if self.client.get_run(parent).info.status != "RUNNING":  # an earlier command ended the parent
            self.client.update_run(parent, status="RUNNING")
        stage_run = StageRun(self.client, run.info.run_id, name)
        try:
            yield stage_run
        except BaseException as exc:
            status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
            self.client.set_terminated(stage_run.run_id, RunStatus.to_string(status))
            raise
        self.client.set_terminated(stage_run.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def model_name(self, dataset: str) -> str:
        """``cfg.tracking.model_name`` or ``pkdot-student-<dataset>``."""
        return self.cfg.tracking.model_name or f"pkdot-student-{dataset}"


def end_parent_run(run_dir: str | Path, status: str) -> str | None:
    """Mark the parent run of a run directory ended with ``status`` (FINISHED, FAILED or KILLED); returns its id,
    or None when the run directory has none yet."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise StageError(f"end_parent_run: status must be FINISHED, FAILED or KILLED, got {status!r}")
    if (parent := _read_parent_file(RunDir(run_dir).mlflow_parent)) is None:
        return None
    run_id, uri = parent
    client = MlflowClient(tracking_uri=uri)
    if client.get_run(run_id).info.status != status:
        client.set_terminated(run_id, status)
    return run_id


# ---- what the stages log ----------------------------------------------------------------------------------
def log_stage(
    cfg: RunConfig, stage: str, *, metrics: Mapping[str, float], artifacts: Sequence[Path] = ()
) -> None:
    """One nested run of ``stage`` with ``metrics`` (``/``, ``:`` -> ``_``) and the ``artifacts`` that exist."""
    with Tracker(cfg).stage_run(stage) as run:
        run.log_metrics({k.replace("/", "_").replace(":", "_"): v for k, v in metrics.items()})
        for path in artifacts:
            if Path(path).exists():
                run.log_artifact(path)


def log_jobs(cfg: RunConfig, stage: str, jobs: Sequence[Any]) -> None:
    """A nested run per training job (``out_dir``, ``fold``, ``seed``, ``loss``): its per-epoch history (as
    ``<phase>/<field>``), ``metrics.json``, ``history.json`` (and checkpoints with ``tracking.log_checkpoints``)."""
    tracker = Tracker(cfg)
    for job in jobs:
        jdir = Path(job.out_dir)
        tags = {"loss": job.loss} if job.loss else {}
        name = f"{stage}/{job.loss}" if job.loss else stage
        with tracker.stage_run(name, fold=job.fold, seed=job.seed, **tags) as run:
            for phase, doc in json.loads((jdir / HISTORY).read_text()).get("phases", {}).items():
                for r in doc["epochs"]:  # the numbers of each epoch at step = epoch (a bool is no number)
                    numeric = {f"{phase}/{k}": v for k, v in r.items() if type(v) in (int, float)}
                    numeric.pop(f"{phase}/epoch", None)
                    if numeric:
                        run.log_metrics(numeric, step=int(r["epoch"]))
            metrics = json.loads((jdir / METRICS).read_text())
            run.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items()})
            run.log_artifact(jdir / HISTORY)
            if cfg.tracking.log_checkpoints:
                for ckpt in sorted(jdir.glob("*.pt")):
                    run.log_artifact(ckpt, artifact_path="checkpoints")


def log_evaluation(cfg: RunConfig, summary: Any) -> dict[str, Any]:
    """The ``evaluate`` run of an ``EvaluationSummary`` (means, robustness means, ``RUN/report/``); its ids."""
    tracker = Tracker(cfg)
    with tracker.stage_run("evaluate") as run:
        run.log_metrics({f"{r['model']}_mean": float(r["mean"]) for _, r in summary.table.iterrows()})
        if (rob := summary.robustness) is not None:  # e.g. robustness/student-pkdot/frame_drop_0.3
            cols = (rob[c] for c in ("model", "perturbation", "level", "mean"))
            run.log_metrics({f"robustness/{m}/{p}_{lv:g}": v for m, p, lv, v in zip(*cols, strict=True)})
        tracker.client.log_artifacts(run.run_id, str(Path(summary.report_path).parent), "report")
    return {
        "mlflow_run_id": tracker.parent_run_id(),
        "evaluate_run_id": run.run_id,
        "tracking_uri": tracker.tracking_uri,
        "experiment_id": tracker.experiment_id,
        "mlflow_ui": resolve_public_uri(cfg),
    }
