"""MLflow tracking and the model registry: the only module of pkdot that imports :mod:`mlflow`.

Layout in MLflow (one experiment, ``cfg.tracking.experiment``):

- one *parent* run per pipeline run directory, holding the flattened config as params and ``config.yaml``
  as an artifact; its id is stored in ``RUN/mlflow_parent.json`` so that every stage, every process and
  every Ray worker that opens a :class:`Tracker` on the same run directory finds the same parent;
- one *nested* run per stage call (tag ``mlflow.parentRunId`` = the parent), named
  ``<stage>[/fold-<k>][/seed-<s>]``, e.g. ``train-teacher/fold-0``;
- a nested ``register`` run per registered student, whose logged model becomes a new version of the
  registered model ``cfg.tracking.model_name`` (default ``pkdot-student-<dataset>``). The alias
  ``champion`` moves to the new version only when its metric beats the current champion's; otherwise the
  new version gets ``challenger``.

Where things are stored: :func:`resolve_tracking_uri` (config, then ``$MLFLOW_TRACKING_URI``, then SQLite
at ``RUN/mlflow.db``). With a SQLite store the experiment's artifacts go to ``RUN/mlartifacts/`` (an
MLflow server keeps its own artifact store).

Model serialization: students are logged in MLflow's ``pt2`` format (``torch.export``): a traced graph,
loaded back without unpickling arbitrary Python objects. The input example fixes every dimension but the
batch (a batch of at least 2 is required, and the export is checked to keep the batch dynamic). Outputs may
be tensors, dicts/tuples of tensors, or a dataclass: :class:`pkdot.models.heads.ModelOutput` is a registered
pytree node and comes back as itself (:func:`load_student` imports it); any other dataclass is exported
through a thin wrapper that returns its fields as a ``dict``. The register run also holds the run's
``config.yaml`` (:func:`model_config_path`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import torch.utils._pytree as pytree
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pkdot.config import RunConfig
from pkdot.errors import StageError

logger = logging.getLogger(__name__)

#: MLflow limits (mlflow.utils.validation): params/tags per ``log_batch`` call, param value length,
#: metrics per ``log_batch`` call.
PARAMS_PER_BATCH = 100
MAX_PARAM_VALUE_LENGTH = 6000
METRICS_PER_BATCH = 1000

PARENT_FILE = "mlflow_parent.json"
CHAMPION = "champion"
CHALLENGER = "challenger"


def resolve_tracking_uri(cfg: RunConfig) -> str:
    """The MLflow tracking URI of a run.

    ``cfg.tracking.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI`` if set, else a SQLite store in the
    run directory: ``sqlite:///<absolute run_dir>/mlflow.db``.
    """
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(cfg.run_dir).resolve()}/mlflow.db"


#: Environment variable with the MLflow UI address people open (set by docker-compose.yml).
PUBLIC_URI_ENV = "PKDOT_MLFLOW_PUBLIC_URI"


def resolve_public_uri(cfg: RunConfig, tracking_uri: str | None = None) -> str | None:
    """The MLflow UI address for links people open, or None when there is no server to link to.

    ``cfg.tracking.public_uri`` if set, else ``$PKDOT_MLFLOW_PUBLIC_URI`` if set, else the tracking URI
    (``tracking_uri``, default :func:`resolve_tracking_uri`) when it is an ``http(s)://`` server. A local store
    (SQLite) has no UI until someone runs ``mlflow ui`` on it: None. The tracking URI stays what the processes
    log to (in a compose stack ``http://mlflow:5000``, a name only the containers resolve).
    """
    if cfg.tracking.public_uri:
        return cfg.tracking.public_uri.rstrip("/")
    env = os.environ.get(PUBLIC_URI_ENV)
    if env:
        return env.rstrip("/")
    uri = tracking_uri or resolve_tracking_uri(cfg)
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def run_ui_url(public_uri: str, run_id: str, experiment_id: str | None = None) -> str:
    """The MLflow UI page of a run: ``<public_uri>/#/experiments/<experiment_id>/runs/<run_id>``
    (``<public_uri>/#/runs/<run_id>`` without an experiment id)."""
    base = public_uri.rstrip("/")
    if experiment_id is None:
        return f"{base}/#/runs/{run_id}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


#: MLflow loggers whose INFO lines are store set-up chatter ("Creating initial MLflow database tables...",
#: "Updating database tables", alembic's migration steps).
MLFLOW_NOISY_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store", "alembic")


def _mlflow_store_chatter_filter(record: logging.LogRecord) -> bool:
    """Let a record of :data:`MLFLOW_NOISY_LOGGERS` through when it is a warning or worse, when the process
    logs at INFO or below (``pkdot -v``: the root logger's level, read when the record is emitted), or when
    the user chose MLflow's level with ``$MLFLOW_LOGGING_LEVEL``."""
    return (
        record.levelno >= logging.WARNING
        or logging.getLogger().getEffectiveLevel() <= logging.INFO
        or bool(os.environ.get("MLFLOW_LOGGING_LEVEL"))
    )


for _name in MLFLOW_NOISY_LOGGERS:
    if _mlflow_store_chatter_filter not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_mlflow_store_chatter_filter)

# MLflow writes "🏃 View run <name> at: <tracking server>/#/..." to stdout for every run that ends on a server:
# two lines per nested run, with the address the processes log to (http://mlflow:5000 in the compose stack),
# not the one people open. pkdot links its runs with the public address (resolve_public_uri) instead; set the
# variable to "false" to get MLflow's lines back.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _use_tracking_uri(uri: str) -> None:
    """Point MLflow's fluent API (``mlflow.pytorch.log_model``, ``load_model``) at ``uri``.

    :func:`mlflow.set_tracking_uri` also exports ``$MLFLOW_TRACKING_URI``; that is undone here, so that the
    next :func:`resolve_tracking_uri` in this process (another run directory) still resolves its own store.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _param_value(key: str, value: Any) -> str:
    """Stringify a config value for MLflow (strings as is, the rest as JSON), within the length limit."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        logger.warning(
            "param %s is %d characters long; MLflow keeps %d, truncating",
            key,
            len(text),
            MAX_PARAM_VALUE_LENGTH,
        )
        text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
    return text


def _metric_value(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value.item())
        raise StageError(f"metric {key!r}: expected a number, got {type(value).__name__} ({value!r})")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Registration:
    """A registered student version: ``alias`` is ``"champion"`` or ``"challenger"``."""

    name: str
    version: int
    alias: str
    previous_champion_version: int | None
    run_id: str

    @property
    def model_uri(self) -> str:
        """``models:/<name>/<version>`` (load it with :func:`load_student`)."""
        return f"models:/{self.name}/{self.version}"


@dataclasses.dataclass(frozen=True)
class DatasetSplit:
    """Rows of the manifest a model was trained or tested on, for :func:`mlflow.log_input`.

    Attributes
    ----------
    name : str
        The dataset's name in MLflow, e.g. ``biovid-fold0-seed0-train``.
    context : str
        ``"train"``, ``"validation"`` or ``"test"`` (the input tag ``mlflow.data.context``).
    frame : pandas.DataFrame
        The manifest rows (one per sample).
    source : str
        Where the rows come from (the manifest file).
    digest : str
        The rows' identity (e.g. a hash of the manifest fingerprint and the sample ids): MLflow shows one
        dataset per (name, digest).
    """

    name: str
    context: str
    frame: Any
    source: str
    digest: str


class StageRun:
    """A nested MLflow run of one stage call; logs through :class:`mlflow.tracking.MlflowClient`."""

    def __init__(self, client: MlflowClient, run_id: str, name: str) -> None:
        self._client = client
        self.run_id = run_id
        self.name = name

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (``{"val_accuracy": 0.8}``) at ``step`` (0 when None)."""
        now = int(time.time() * 1000)
        entries = [Metric(k, _metric_value(k, v), now, int(step or 0)) for k, v in metrics.items()]
        for i in range(0, len(entries), METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=entries[i : i + METRICS_PER_BATCH])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values stringified, batches of 100 as MLflow allows)."""
        _log_params(self._client, self.run_id, params)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy one file into the run's artifacts (under ``artifact_path``)."""
        path = Path(path)
        if not path.is_file():
            raise StageError(f"artifact {path} does not exist or is not a file")
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Copy a directory's files into the run's artifacts (under ``artifact_path``)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise StageError(f"artifact directory {directory} does not exist")
        self._client.log_artifacts(self.run_id, str(directory), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""
        if tags:
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    entries = [Param(k, _param_value(k, v)) for k, v in params.items()]
    for i in range(0, len(entries), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=entries[i : i + PARAMS_PER_BATCH])


class _DataclassOutputAsDict(torch.nn.Module):
    """Wraps a module whose ``forward`` returns a dataclass so that it returns ``{field: value}``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        out = self.module(x)
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}


def _check_batch_is_dynamic(model: torch.nn.Module, example: torch.Tensor) -> None:
    """Export ``model`` with a dynamic batch dimension; raise if its code fixes the batch size.

    MLflow's pt2 export lets ``torch.export`` *specialize* a dimension silently (``Dim.AUTO``); a student
    whose code turns the batch size into a Python int would then be registered accepting only the example's
    batch size. Exporting once with a strict ``Dim`` finds that before anything is registered.
    """
    try:
        torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:  # torch raises UserError/ConstraintViolation/… depending on the cause
        raise StageError(
            f"register_student: the student cannot be exported with a dynamic batch size "
            f"(torch.export: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); the registered "
            "model would only accept batches of the input example's size. Make forward() keep the batch "
            "dimension symbolic (no int(x.shape[0]) / comparisons that fix it)."
        ) from exc


def _output_arrays(out: Any, where: str, prefix: str = "") -> dict[str, np.ndarray] | np.ndarray:
    """Model outputs -> numpy for the model signature: a tensor stays one array; dicts, tuples and lists
    (nested) become ``{"a.b": array}`` with dotted keys; ``None`` entries are left out."""
    if isinstance(out, torch.Tensor) and not prefix:
        return out.detach().cpu().numpy()
    flat: dict[str, np.ndarray] = {}

    def visit(value: Any, key: str) -> None:
        if value is None:
            return
        if isinstance(value, torch.Tensor):
            flat[key] = value.detach().cpu().numpy()
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, tuple | list):
            for i, v in enumerate(value):
                visit(v, f"{key}.{i}" if key else f"output_{i}")
        else:
            raise StageError(
                f"{where}: output {key or '<root>'} is a {type(value).__name__}; "
                "expected tensors in a tensor, dict, tuple or dataclass"
            )

    visit(out, prefix)
    if not flat:
        raise StageError(f"{where}: the student's forward returned no tensor")
    return flat


class Tracker:
    """MLflow logging for one pipeline run (one run directory).

    Parameters
    ----------
    cfg
        The run configuration. Its run directory is created if needed. The only global state set is
        MLflow's tracking URI (:func:`mlflow.set_tracking_uri`), needed by ``mlflow.pytorch.log_model``.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).resolve()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = resolve_tracking_uri(cfg)
        _use_tracking_uri(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._experiment_id: str | None = None
        self._parent_run_id: str | None = None

    # ---- experiment and parent run -------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        """Id of ``cfg.tracking.experiment`` (created on first use)."""
        if self._experiment_id is None:
            name = self.cfg.tracking.experiment
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                location = None
                if self.tracking_uri.startswith("sqlite:"):
                    location = (self.run_dir / "mlartifacts").as_uri()
                try:
                    self._experiment_id = self.client.create_experiment(name, artifact_location=location)
                except MlflowException as exc:  # created meanwhile by another process
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise StageError(f"MLflow experiment {name!r} at {self.tracking_uri}: {exc}") from exc
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def parent_run_id(self) -> str:
        """The pipeline's parent run id, created once per run directory (and store).

        The id lives in ``RUN/mlflow_parent.json`` (``{"run_id", "tracking_uri", "experiment_id"}``), written
        under a file lock so concurrent processes agree on one parent. A file that names another tracking
        URI is replaced (a new parent in the new store); one whose run is missing from its own store raises
        :class:`StageError`.
        """
        if self._parent_run_id is not None:
            return self._parent_run_id
        path = self.run_dir / PARENT_FILE
        lock_path = self.run_dir / f".{PARENT_FILE}.lock"
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                stored = self._read_parent_file(path)
                if stored is not None:
                    self._parent_run_id = stored
                    return stored
                run_id = self._create_parent_run()
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                tmp.write_text(
                    json.dumps(
                        {
                            "run_id": run_id,
                            "tracking_uri": self.tracking_uri,
                            "experiment_id": self.experiment_id,
                        },
                        indent=2,
                    )
                )
                tmp.replace(path)
                self._parent_run_id = run_id
                return run_id
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def finish_parent(self, status: str = "FINISHED") -> None:
        """Mark the parent run ended (FINISHED, FAILED or KILLED); call once, at the end of the pipeline."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise StageError(f"finish_parent: status must be FINISHED, FAILED or KILLED, got {status!r}")
        self.client.set_terminated(self.parent_run_id(), status)

    def _reopen_parent(self, run_id: str) -> None:
        """A stage starts under a parent that an earlier command ended (FINISHED/FAILED/KILLED): RUNNING again."""
        if self.client.get_run(run_id).info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")

    def _read_parent_file(self, path: Path) -> str | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            run_id = data["run_id"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StageError(
                f"{path}: expected JSON {{'run_id': ...}} naming the parent MLflow run ({exc})"
            ) from exc
        stored_uri = data.get("tracking_uri")
        if stored_uri is not None and stored_uri != self.tracking_uri:
            logger.warning(
                "%s names parent run %s in store %s; this run tracks to %s: starting a new parent",
                path,
                run_id,
                stored_uri,
                self.tracking_uri,
            )
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException as exc:
            raise StageError(
                f"{path}: parent run {run_id} is not in the MLflow store {self.tracking_uri} "
                f"(deleted? remove the file to start a new parent): {exc}"
            ) from exc
        return str(run_id)

    def _create_parent_run(self) -> str:
        cfg = self.cfg
        run = self.client.create_run(
            self.experiment_id,
            run_name=cfg.name,
            tags={
                "pkdot.run_dir": str(self.run_dir),
                "pkdot.preset": cfg.preset,
                "pkdot.dataset": cfg.data.dataset,
                "pkdot.task": cfg.data.task,
                "pkdot.config_hash": cfg.section_hash(),
            },
        )
        run_id = run.info.run_id
        _log_params(self.client, run_id, cfg.flat())
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp) / "config.yaml"
            cfg.to_yaml(config_path)
            self.client.log_artifact(run_id, str(config_path))
        logger.info(
            "MLflow parent run %s (experiment %r, %s)", run_id, cfg.tracking.experiment, self.tracking_uri
        )
        return run_id

    # ---- nested stage runs ---------------------------------------------------------------------------
    @contextmanager
    def stage_run(
        self, stage: str, fold: int | None = None, seed: int | None = None, **tags: Any
    ) -> Iterator[StageRun]:
        """A nested run under the parent, named ``stage[/fold-k][/seed-s]``.

        The run ends ``FINISHED``, or ``FAILED`` when the block raises (the exception propagates).
        """
        parent = self.parent_run_id()
        name = (
            stage
            + (f"/fold-{fold}" if fold is not None else "")
            + (f"/seed-{seed}" if seed is not None else "")
        )
        run_tags = {MLFLOW_PARENT_RUN_ID: parent, MLFLOW_RUN_NAME: name, "pkdot.stage": stage}
        if fold is not None:
            run_tags["pkdot.fold"] = str(fold)
        if seed is not None:
            run_tags["pkdot.seed"] = str(seed)
        run_tags.update({k: str(v) for k, v in tags.items()})
        run = self.client.create_run(self.experiment_id, run_name=name, tags=run_tags)
        self._reopen_parent(parent)
        stage_run = StageRun(self.client, run.info.run_id, name)
        try:
            yield stage_run
        except BaseException as exc:
            status = RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) else RunStatus.FAILED
            self.client.set_terminated(stage_run.run_id, RunStatus.to_string(status))
            raise
        # Resumed by mlflow.start_run inside the block (register_student), the run may be ended already.
        self.client.set_terminated(stage_run.run_id, RunStatus.to_string(RunStatus.FINISHED))

    def log_history(self, stage_run: StageRun, history: Mapping[str, Any]) -> None:
        """Log a ``history.json`` (docs/interfaces.md): every numeric field of each epoch, at step = epoch.

        Also logs ``best_epoch`` as a metric and the history's ``metric`` name as the tag
        ``pkdot.val_metric``.
        """
        epochs = history.get("epochs") if isinstance(history, Mapping) else None
        if not isinstance(epochs, list):
            raise StageError(
                f"history of {stage_run.name}: expected {{'epochs': [...], 'metric': ...}}, "
                f"got keys {sorted(history) if isinstance(history, Mapping) else type(history)}"
            )
        for i, entry in enumerate(epochs):
            if not isinstance(entry, Mapping) or "epoch" not in entry:
                raise StageError(f"history of {stage_run.name}: epochs[{i}] has no 'epoch' field")
            values = {k: v for k, v in entry.items() if k != "epoch" and v is not None}
            numeric = {
                k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            if numeric:
                stage_run.log_metrics(numeric, step=int(entry["epoch"]))
        if history.get("best_epoch") is not None:
            stage_run.log_metrics({"best_epoch": history["best_epoch"]})
        if history.get("metric"):
            stage_run.set_tags({"pkdot.val_metric": history["metric"]})

    # ---- registry ------------------------------------------------------------------------------------
    def model_name(self, dataset: str) -> str:
        """``cfg.tracking.model_name`` or ``pkdot-student-<dataset>``."""
        return self.cfg.tracking.model_name or f"pkdot-student-{dataset}"

    def _champion(self, name: str, metric_name: str) -> tuple[int, float] | None:
        """(version, metric) of the current champion, or None when there is none."""
        try:
            registered = self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        if CHAMPION not in registered.aliases:
            return None
        mv = self.client.get_model_version_by_alias(name, CHAMPION)
        if not mv.run_id:
            raise StageError(
                f"registered model {name!r}: champion version {mv.version} has no MLflow run to read "
                f"{metric_name!r} from (registered outside pkdot?)"
            )
        run = self.client.get_run(mv.run_id)
        if metric_name not in run.data.metrics:
            raise StageError(
                f"registered model {name!r}: champion version {mv.version} (run {mv.run_id}) has "
                f"no metric {metric_name!r} (it has {sorted(run.data.metrics)}); cannot compare"
            )
        return int(mv.version), float(run.data.metrics[metric_name])

    def register_student(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        *,
        metric_name: str,
        metric_value: float,
        higher_is_better: bool = True,
        extra_artifacts: Sequence[Path] = (),
        dataset: str,
        scores: Mapping[str, float] | None = None,
        datasets: Sequence[DatasetSplit] = (),
    ) -> Registration:
        """Log a student as a new registered-model version and move the ``champion`` alias if it wins.

        The version becomes ``champion`` when there is no champion yet or when ``metric_value`` is
        strictly better than the champion's ``metric_name`` (read from the champion version's run);
        otherwise it becomes ``challenger``.

        Parameters
        ----------
        model
            The student (evaluated in ``eval`` mode); its forward takes one tensor.
        input_example
            A batch of inputs, e.g. uint8 video ``(B, T, H, W, 3)`` with ``B >= 2``; it fixes the dtype and
            every dimension but the batch.
        metric_name, metric_value, higher_is_better
            The selection metric (e.g. mean test accuracy or CCC) logged on the register run.
        extra_artifacts
            Files logged next to the model (under ``extra/``), e.g. the report.
        dataset
            Names the registered model when ``cfg.tracking.model_name`` is None.
        scores
            This model's own scores (its fold and seed, e.g. ``{"val_accuracy": 0.8, "test_accuracy": 0.7}``),
            logged as metrics of the register run and as tags of the model version, next to the selection
            metric.
        datasets
            The manifest rows it was trained / validated / tested on, logged with :func:`mlflow.log_input`.
        """
        if not math.isfinite(float(metric_value)):
            raise StageError(
                f"register_student: metric {metric_name!r} is {metric_value}; expected a finite number"
            )
        example = np.asarray(input_example)
        if example.ndim < 1 or example.shape[0] < 2:
            raise StageError(
                f"register_student: input_example has shape {example.shape}; expected a batch of at "
                "least 2 samples on axis 0 (a batch of 1 fixes the exported batch size)"
            )
        for p in extra_artifacts:
            if not Path(p).is_file():
                raise StageError(f"register_student: extra artifact {p} does not exist")
        own_scores = {str(k): float(v) for k, v in (scores or {}).items()}
        for key, value in own_scores.items():
            if not math.isfinite(value):
                raise StageError(f"register_student: score {key!r} is {value}; expected a finite number")
        name = self.model_name(dataset)
        previous = self._champion(name, metric_name)

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.from_numpy(example))
            export_model: torch.nn.Module = model
            if dataclasses.is_dataclass(out) and not isinstance(out, type):
                if type(out) not in pytree.SUPPORTED_NODES:
                    # Not a registered pytree node (torch.export.register_dataclass): export as a dict.
                    export_model = _DataclassOutputAsDict(model).eval()
                out = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
            signature = infer_signature(example, _output_arrays(out, "register_student"))
            _check_batch_is_dynamic(export_model, torch.from_numpy(example))
            with self.stage_run("register", dataset=dataset, model_name=name) as sr:
                sr.log_metrics({metric_name: metric_value, **own_scores})
                sr.log_params(
                    {"metric_name": metric_name, "higher_is_better": higher_is_better, "dataset": dataset}
                )
                _use_tracking_uri(self.tracking_uri)  # another Tracker in this process may have moved it
                with mlflow.start_run(run_id=sr.run_id, nested=True):
                    for split in datasets:
                        with warnings.catch_warnings():  # MLflow's hints on a file source / int columns
                            warnings.filterwarnings("ignore", message=".*interpreted in multiple ways.*")
                            warnings.filterwarnings("ignore", message=".*Inferred schema contains integer.*")
                            data = mlflow.data.from_pandas(
                                split.frame, source=split.source, name=split.name, digest=split.digest
                            )
                            # the schema is inferred lazily, when the input is logged: filtered here too
                            mlflow.log_input(data, context=split.context)
                    info = mlflow.pytorch.log_model(
                        export_model,
                        name="student",
                        input_example=example,
                        signature=signature,
                        registered_model_name=name,
                        serialization_format="pt2",
                        # The pt2 archive needs torch only (no pkdot code, no pickle).
                        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                        # MLflow's pyfunc check serves single-tensor outputs only.
                        validate_serving_input=isinstance(out, torch.Tensor),
                    )
                with tempfile.TemporaryDirectory() as tmp:
                    config_path = Path(tmp) / "config.yaml"
                    self.cfg.to_yaml(config_path)
                    sr.log_artifact(config_path)  # read back by model_config_path()
                for p in extra_artifacts:
                    sr.log_artifact(p, "extra")
                run_id = sr.run_id
        finally:
            model.train(was_training)

        version = int(info.registered_model_version)
        if previous is None:
            better = True
        else:
            better = metric_value > previous[1] if higher_is_better else metric_value < previous[1]
        alias = CHAMPION if better else CHALLENGER
        self.client.set_registered_model_alias(name, alias, str(version))
        self.client.set_model_version_tag(name, str(version), metric_name, str(metric_value))
        for key, value in own_scores.items():
            self.client.set_model_version_tag(name, str(version), key, str(value))
        logger.info(
            "registered %s version %d (%s=%.4f) as %s (previous champion: %s)",
            name,
            version,
            metric_name,
            metric_value,
            alias,
            "none" if previous is None else f"v{previous[0]} with {previous[1]:.4f}",
        )
        return Registration(
            name=name,
            version=version,
            alias=alias,
            previous_champion_version=None if previous is None else previous[0],
            run_id=run_id,
        )


def end_parent_run(run_dir: str | Path, status: str) -> str | None:
    """Mark the parent MLflow run of a run directory ended with ``status`` (FINISHED, FAILED or KILLED).

    Called when a ``pkdot`` command or the flow ends (``pkdot extract`` alone, an error, Ctrl-C), so the parent
    never stays RUNNING. Does nothing (returns None) when the run directory has no parent run yet; returns the
    parent's run id otherwise. The tracking URI is the one recorded in ``RUN/mlflow_parent.json``.
    """
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise StageError(f"end_parent_run: status must be FINISHED, FAILED or KILLED, got {status!r}")
    path = Path(run_dir) / PARENT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        run_id, uri = str(data["run_id"]), str(data["tracking_uri"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise StageError(
            f"{path}: expected JSON {{'run_id', 'tracking_uri'}} naming the parent run ({exc})"
        ) from exc
    client = MlflowClient(tracking_uri=uri)
    if client.get_run(run_id).info.status != status:
        client.set_terminated(run_id, status)
    return run_id


def require_existing_store(uri: str) -> str:
    """Return ``uri`` when it names an MLflow server or a local store that exists; raise otherwise.

    Opening a local store that does not exist makes MLflow create an empty one (``sqlite:///mlflow.db`` in
    the working directory is MLflow's default): a command that only *reads* a registry (``pkdot predict``)
    checks first, so it fails with a clear message and leaves no stray ``mlflow.db`` or ``mlruns`` behind.
    """
    if uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql", "mssql")):
        return uri
    if uri.startswith("sqlite:"):
        # sqlite:///relative.db or sqlite:////absolute/path.db (SQLAlchemy's form)
        path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
        if not path.is_file():
            raise StageError(
                f"MLflow store {uri!r}: {path.resolve()} does not exist (expected the mlflow.db of a run, e.g. "
                "sqlite:///runs/biovid-demo/mlflow.db, or a server http://HOST:5000)"
            )
        return uri
    local = Path(uri.removeprefix("file://")) if uri.startswith("file:") else Path(uri)
    if not local.is_dir():
        raise StageError(f"MLflow store {uri!r}: the folder {local.resolve()} does not exist")
    return uri


def _split_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    if not model_uri.startswith("models:/"):
        raise StageError(
            f"model URI {model_uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
        )
    rest = model_uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, None, alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version, None
    raise StageError(f"model URI {model_uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")


def model_config_path(model_uri: str, tracking_uri: str | None = None) -> Path:
    """Download the ``config.yaml`` of the run that registered a student; returns its local path.

    ``model_uri`` is ``models:/<name>@<alias>`` or ``models:/<name>/<version>``; the file is the
    :class:`~pkdot.config.RunConfig` that :meth:`Tracker.register_student` logged next to the model (so a
    caller can rebuild the preprocessing, e.g. frame count and crop size, that the student expects).
    """
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name, version, alias = _split_model_uri(model_uri)
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, str(version))
        if not mv.run_id:
            raise StageError(
                f"{model_uri!r} (version {mv.version}) has no MLflow run holding its config.yaml"
            )
        dst = Path(tempfile.mkdtemp(prefix="pkdot-model-config-"))
        local = client.download_artifacts(mv.run_id, "config.yaml", str(dst))
    except MlflowException as exc:
        raise StageError(f"cannot read config.yaml of {model_uri!r} from {uri}: {exc}") from exc
    return Path(local)


def load_student(model_uri: str, tracking_uri: str | None = None) -> torch.nn.Module:
    """Load a registered student, e.g. ``load_student("models:/pkdot-student-biovid@champion")``.

    ``models:/`` URIs resolve against ``tracking_uri`` when given (it is then set as MLflow's tracking URI),
    else against MLflow's current tracking URI (set by :class:`Tracker`, or ``$MLFLOW_TRACKING_URI``).
    Returns the exported graph module (``pt2``): same inputs and outputs as the logged student (a student
    returning :class:`pkdot.models.heads.ModelOutput` returns it again; an unregistered dataclass comes back
    as a dict of its fields).
    """
    # Registers ModelOutput as a pytree node: a pt2 student returning it cannot be deserialized otherwise.
    import pkdot.models.heads  # noqa: F401

    if tracking_uri is not None:
        _use_tracking_uri(tracking_uri)
    try:
        return mlflow.pytorch.load_model(model_uri)
    except MlflowException as exc:
        raise StageError(
            f"cannot load student {model_uri!r} from {mlflow.get_tracking_uri()}: {exc}"
        ) from exc
