"""The model registry: a student version (MLflow ``pt2`` format, dynamic batch) with its model card
(:class:`ModelCard`, description and tags), the champion rule (:data:`CHAMPION_RULE`), loading it back."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import math
import subprocess
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import torch.utils._pytree as pytree
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from pkdot.config import RunConfig
from pkdot.errors import StageError
from pkdot.rundir import RunDir
from pkdot.tracking.runs import Tracker, use_tracking_uri

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
CHAMPION_RULE = (
    "A new version becomes `champion` only when its cross-validated estimate (same metric, data set and task) "
    "beats the current champion's; otherwise it is the `challenger`."
)


@dataclasses.dataclass(frozen=True)
class Registration:
    """A registered student version: ``alias`` is ``"champion"`` or ``"challenger"``."""

    name: str
    version: int
    alias: str
    previous_champion_version: int | None
    run_id: str


@dataclasses.dataclass(frozen=True)
class DatasetSplit:
    """Manifest rows (``frame``) a model was trained, validated or tested on, for :func:`mlflow.log_input`."""

    name: str
    context: str
    frame: Any
    source: str
    digest: str


def dataset_splits(
    cfg: RunConfig,
    manifest: Any,
    subjects: Mapping[str, Sequence[str]],
    label: str,
    manifest_fingerprint: str,
    unit: str = "subject_id",
) -> list[DatasetSplit]:
    """The manifest rows of each split's ``subjects`` (ids of the ``unit`` column: sample ids under
    ``train.folds: clips``), named ``<dataset>-<label>-<split>``, digest = hash of the manifest's fingerprint and
    the split's sample ids."""
    out = []
    for split, ids in subjects.items():
        rows = manifest[manifest[unit].astype(str).isin({str(s) for s in ids})].reset_index(drop=True)
        samples = ",".join(sorted(rows["sample_id"].astype(str)))
        digest = hashlib.sha256(f"{manifest_fingerprint}|{samples}".encode()).hexdigest()[:16]
        context = {"val": "validation"}.get(split, split)
        source = str(RunDir(cfg.run_dir).manifest)
        out.append(DatasetSplit(f"{cfg.data.dataset}-{label}-{split}", context, rows, source, digest))
    return out


# ---- the model card --------------------------------------------------------------------------------------
def _code_version() -> tuple[str, str | None]:
    """pkdot's installed version and the git commit of its source tree (None outside a git checkout)."""
    try:
        version = importlib.metadata.version("pkdot")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        git = ["git", "rev-parse", "HEAD"]
        done = subprocess.run(git, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return version, None
    return version, (done.stdout.strip() or None) if done.returncode == 0 else None


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """What a registered student is and how it was chosen: the version's description and tags."""

    dataset: str
    task: str
    loss: str
    student_modalities: list[str]
    privileged_modalities: list[str]
    protocol: str  # folds, seeds and how the test subjects were held out
    selection_rule: str
    metric: str
    cv_mean: float  # the cross-validated test estimate of the shipped configuration
    cv_ci: tuple[float, float]  # its corrected 95 % interval
    cv_runs: int
    trained_on: str  # "fold 1, seed 0 ..." or "all subjects (refit)"
    training_subjects: int
    config_hash: str
    pkdot_version: str
    git_commit: str | None
    input: str
    output: str

    def summary(self) -> str:
        """One line: what it predicts, from what, and how well (``pkdot predict --describe``)."""
        low, high = self.cv_ci
        return (
            f"{self.dataset} {self.task} student (loss {self.loss}, input {'+'.join(self.student_modalities)}): "
            f"cross-validated {self.metric} {self.cv_mean:.3f} [{low:.3f}, {high:.3f}] over {self.cv_runs} runs; "
            f"trained on {self.training_subjects} subjects ({self.trained_on})"
        )

    def tags(self) -> dict[str, str]:
        """``pkdot.<field>`` of every field (lists comma-joined; ``cv_mean`` and ``cv_ci`` as ``cv_estimate``)."""
        low, high = self.cv_ci
        renamed = {"metric": "cv_metric", "pkdot_version": "version"}
        tags = {
            f"pkdot.{renamed.get(k, k)}": ",".join(v) if isinstance(v, list) else str(v)
            for k, v in vars(self).items()
            if k not in ("cv_mean", "cv_ci")
        }
        estimate = f"{self.cv_mean:.4f} [{low:.4f}, {high:.4f}]"
        return tags | {"pkdot.cv_estimate": estimate, "pkdot.git_commit": self.git_commit or "unknown"}

    def markdown(self, alias_note: str = "") -> str:
        low, high = self.cv_ci
        modalities = (
            f"student {self.student_modalities}; privileged (teacher only) {self.privileged_modalities}"
        )
        rows = [
            ("Data set / task", f"{self.dataset} / {self.task}"),
            ("Distillation loss", f"`{self.loss}`"),
            ("Modalities", modalities),
            ("Protocol", self.protocol),
            ("Selection", self.selection_rule),
            (
                f"Cross-validated test {self.metric}",
                f"{self.cv_mean:.4f}, corrected 95% CI [{low:.4f}, {high:.4f}] over {self.cv_runs} (fold, seed) runs",
            ),
            ("Trained on", f"{self.training_subjects} subjects: {self.trained_on}"),
            ("Input", self.input),
            ("Output", self.output),
            ("Config hash", f"`{self.config_hash}`"),
            ("Code", f"pkdot {self.pkdot_version}, commit {self.git_commit or 'unknown'}"),
        ]
        lines = [f"# {self.summary()}", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
        lines += [CHAMPION_RULE, *([f"**This version:** {alias_note}"] if alias_note else [])]
        return "\n".join(lines) + "\n"


def model_card(
    cfg: RunConfig, summary: Any, *, input_example: np.ndarray, training_subjects: int, trained_on: str
) -> ModelCard:
    """The card of ``summary.selection`` (an ``EvaluationSummary``)."""
    sel = summary.selection
    row = summary.table[summary.table["model"] == sel.model].iloc[0]
    version, commit = _code_version()
    f = cfg.features
    what = f"uint8 face clips ({f.n_frames} frames of {f.crop_size}x{f.crop_size} RGB crops)"
    what = what if "video" in cfg.data.student_modalities else "features"
    shape = ", ".join(str(d) for d in input_example.shape[1:])
    if cfg.data.is_regression:
        output = f"logits[:, 0] = the predicted {cfg.data.task}; embedding"
    else:
        output = f"logits over {cfg.data.num_outputs} classes (argmax = the predicted class); embedding"
    folds = f"folds {cfg.train.folds} x seeds {cfg.train.seeds}"
    return ModelCard(
        dataset=cfg.data.dataset,
        task=cfg.data.task,
        loss=sel.loss,
        student_modalities=list(cfg.data.student_modalities),
        privileged_modalities=list(cfg.data.privileged_modalities),
        protocol=f"{folds}; {summary.protocol}" if summary.protocol else folds,
        selection_rule=sel.rule,
        metric=sel.metric,
        cv_mean=float(row["mean"]),
        cv_ci=(float(row["ci_low"]), float(row["ci_high"])),
        cv_runs=int(row["n"]),
        trained_on=trained_on,
        training_subjects=int(training_subjects),
        config_hash=cfg.section_hash(),
        pkdot_version=version,
        git_commit=commit,
        input=f"{input_example.dtype} array (batch, {shape}): {what}; preset {cfg.preset}",
        output=output,
    )


# ---- registering -------------------------------------------------------------------------------------------
class _DataclassOutputAsDict(torch.nn.Module):
    """Wraps a module whose ``forward`` returns an unregistered dataclass so that it returns ``{field: value}``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        out = self.module(x)
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}


def _check_batch_is_dynamic(model: torch.nn.Module, example: torch.Tensor) -> None:
    """Export with a strict dynamic batch ``Dim`` (MLflow's export would silently specialise the batch size)."""
    try:
        torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:  # torch raises UserError/ConstraintViolation/... depending on the cause
        raise StageError(
            f"register_student: the student cannot be exported with a dynamic batch size "
            f"(torch.export: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); the registered "
            "model would only accept batches of the input example's size. Make forward() keep the batch "
            "dimension symbolic (no int(x.shape[0]) / comparisons that fix it)."
        ) from exc


def _output_arrays(out: Any, where: str) -> dict[str, np.ndarray] | np.ndarray:
    """Model outputs -> numpy for the signature: one array, or ``{"a.b": array}`` for nested containers."""
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().numpy()
    flat: dict[str, np.ndarray] = {}

    def visit(value: Any, key: str) -> None:
        if isinstance(value, torch.Tensor):
            flat[key] = value.detach().cpu().numpy()
        elif isinstance(value, Mapping):
            for k, v in value.items():
                visit(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, tuple | list):
            for i, v in enumerate(value):
                visit(v, f"{key}.{i}" if key else f"output_{i}")
        elif value is not None:
            raise StageError(
                f"{where}: output {key or '<root>'} is a {type(value).__name__}; "
                "expected tensors in a tensor, dict, tuple or dataclass"
            )

    visit(out, "")
    if not flat:
        raise StageError(f"{where}: the student's forward returned no tensor")
    return flat


def _champion(tracker: Tracker, name: str, metric_name: str, task: str) -> tuple[int, float | None] | None:
    """(version, metric) of the current champion; metric None when it is for another task (not comparable)."""
    client = tracker.client
    try:
        if CHAMPION not in client.get_registered_model(name).aliases:
            return None
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    mv = client.get_model_version_by_alias(name, CHAMPION)
    if mv.tags.get("pkdot.task", task) != task:
        return int(mv.version), None
    if not mv.run_id:
        raise StageError(f"registered model {name!r}: champion version {mv.version} has no MLflow run")
    metrics = client.get_run(mv.run_id).data.metrics
    if metric_name not in metrics:
        raise StageError(
            f"registered model {name!r}: champion version {mv.version} (run {mv.run_id}) has no metric "
            f"{metric_name!r} (it has {sorted(metrics)}); cannot compare"
        )
    return int(mv.version), float(metrics[metric_name])


def register_student(
    tracker: Tracker,
    model: torch.nn.Module,
    input_example: np.ndarray,
    *,
    metric_name: str,
    metric_value: float,
    dataset: str,
    higher_is_better: bool = True,
    scores: Mapping[str, float] | None = None,
    datasets: Sequence[DatasetSplit] = (),
    card: ModelCard | None = None,
) -> Registration:
    """Log ``model`` (one tensor in) as a new version of ``tracker.model_name(dataset)`` and alias it by the
    champion rule on ``metric_name``. ``input_example``: a batch of >= 2 inputs; ``scores``: the model's own;
    ``datasets``: the rows it saw; its run also holds the run's ``config.yaml``."""
    own_scores = {str(k): float(v) for k, v in (scores or {}).items()}
    checked = {f"metric {metric_name!r}": metric_value} | {f"score {k!r}": v for k, v in own_scores.items()}
    for what, value in checked.items():
        if not math.isfinite(float(value)):
            raise StageError(f"register_student: {what} is {value}; expected a finite number")
    example = np.asarray(input_example)
    if example.ndim < 1 or example.shape[0] < 2:
        raise StageError(
            f"register_student: input_example has shape {example.shape}; expected a batch of at least 2 samples "
            "on axis 0 (a batch of 1 fixes the exported batch size)"
        )
    name, task = tracker.model_name(dataset), tracker.cfg.data.task
    previous = _champion(tracker, name, metric_name, task)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(example))
        export_model: torch.nn.Module = model
        if dataclasses.is_dataclass(out) and not isinstance(out, type):
            if type(out) not in pytree.SUPPORTED_NODES:  # not registered with torch.export: export as a dict
                export_model = _DataclassOutputAsDict(model).eval()
            out = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        outputs = _output_arrays(out, "register_student")
        signature = infer_signature(example, outputs)
        _check_batch_is_dynamic(export_model, torch.from_numpy(example))
        with tracker.stage_run("register", dataset=dataset, model_name=name) as sr:
            sr.log_metrics({metric_name: metric_value, **own_scores})
            sr.log_params(dict(metric_name=metric_name, higher_is_better=higher_is_better, dataset=dataset))
            use_tracking_uri(tracker.tracking_uri)  # another Tracker in this process may have moved it
            with mlflow.start_run(run_id=sr.run_id, nested=True):
                for split in datasets:
                    with warnings.catch_warnings():  # MLflow's hints on a file source / integer columns
                        warnings.filterwarnings("ignore", message=".*interpreted in multiple ways.*")
                        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer.*")
                        data = mlflow.data.from_pandas(
                            split.frame, source=split.source, name=split.name, digest=split.digest
                        )
                        mlflow.log_input(data, context=split.context)  # the schema is inferred here
                info = mlflow.pytorch.log_model(
                    export_model,
                    name="student",
                    input_example=example,
                    signature=signature,
                    registered_model_name=name,
                    serialization_format="pt2",
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],  # pt2 needs torch only
                    validate_serving_input=isinstance(out, torch.Tensor),  # pyfunc serves single tensors only
                )
            tracker.client.log_text(sr.run_id, tracker.cfg.yaml_text(), "config.yaml")  # model_config_path()
    finally:
        model.train(was_training)

    version = int(info.registered_model_version)
    mine = f"its {metric_name} {metric_value:.4f}"
    if previous is None:
        alias, note = CHAMPION, "the first version of this model"
    elif previous[1] is None:
        alias = CHALLENGER
        note = f"not compared: champion v{previous[0]} is for another task (set tracking.model_name to keep tasks apart)"
    else:
        better = metric_value > previous[1] if higher_is_better else metric_value < previous[1]
        alias = CHAMPION if better else CHALLENGER
        note = f"{mine} {'beats' if better else 'does not beat'} champion v{previous[0]}'s {previous[1]:.4f}"
    client = tracker.client
    client.set_registered_model_alias(name, alias, str(version))
    tags = {"pkdot.dataset": dataset, "pkdot.task": task, "pkdot.alias": alias, metric_name: metric_value}
    tags |= own_scores | (card.tags() if card else {})
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    if card is not None:
        per_output = isinstance(outputs, dict)
        shapes = {k: tuple(v.shape[1:]) for k, v in outputs.items()} if per_output else outputs.shape[1:]
        card_md = card.markdown(f"`{alias}`: {note}.") + f"\nOutput arrays (after the batch axis): {shapes}\n"
        client.update_model_version(name, str(version), description=card_md)
    logger.info("registered %s version %d as %s: %s", name, version, alias, note)
    return Registration(name, version, alias, None if previous is None else previous[0], sr.run_id)


def register_best(
    cfg: RunConfig,
    summary: Any,
    student: torch.nn.Module,
    input_shape: Sequence[int],
    *,
    manifest: Any,
    subjects: Mapping[str, Sequence[str]],
    manifest_fingerprint: str = "",
    trained_on: str | None = None,
    unit: str = "subject_id",
) -> dict[str, Any]:
    """Register the student chosen on validation (``summary.selection``) with its model card; returns the details
    the stage records. ``student``: its best-validation (fold, seed) model, or one refit on every subject
    (``trained_on``, e.g. ``"all subjects (refit)"``); ``subjects``: split -> subjects it saw."""
    sel = summary.selection
    dtype = np.uint8 if cfg.data.student_modalities[0] == "video" else np.float32
    example = np.zeros((2, *input_shape), dtype=dtype)
    trained_on = trained_on or f"fold {sel.fold}, seed {sel.seed} (the best validation run of that loss)"
    label = f"fold{sel.fold}-seed{sel.seed}" if trained_on.startswith("fold") else "refit"
    datasets = dataset_splits(cfg, manifest, subjects, label, manifest_fingerprint, unit)
    training_subjects = len(subjects["train"])
    if unit != "subject_id":  # clips folds: count the people behind the training clips
        train_rows = next(d for d in datasets if d.context == "train").frame
        training_subjects = int(train_rows["subject_id"].nunique())
    card = model_card(
        cfg, summary, input_example=example, training_subjects=training_subjects, trained_on=trained_on
    )
    pf = summary.per_fold
    run = pf[(pf["model"] == sel.model) & (pf["fold"] == sel.fold) & (pf["seed"] == sel.seed)]
    scores = {
        f"mean_val_{sel.metric}": sel.val_mean,
        f"cv_{sel.metric}_ci_low": card.cv_ci[0],
        f"cv_{sel.metric}_ci_high": card.cv_ci[1],
    }
    if len(run) == 1 and not trained_on.startswith("all"):  # the fold model's own scores
        for col in (f"val_{sel.metric}", "accuracy", "macro_f1", "ccc", "mae", "rmse", "pearson"):
            if col in run.columns and np.isfinite(value := float(run[col].iloc[0])):
                scores[col if col.startswith("val_") else f"test_{col}"] = value
    reg = register_student(
        Tracker(cfg),
        student,
        example,
        metric_name=f"cv_{sel.metric}",
        metric_value=card.cv_mean,
        dataset=cfg.data.dataset,
        scores=scores,
        datasets=datasets,
        card=card,
    )
    return {
        "model_name": reg.name,
        "model_version": str(reg.version),
        "alias": reg.alias,
        "registered_loss": sel.loss,
        "registered_fold": sel.fold,
        "registered_seed": sel.seed,
        "model_card": card.summary(),
    }


# ---- reading the registry ------------------------------------------------------------------------------------
def require_existing_store(uri: str) -> str:
    """Return ``uri`` when it names a server or an existing local store (MLflow would create a missing one)."""
    if uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql", "mssql")):
        return uri
    if uri.startswith("sqlite:"):
        path = Path(uri.removeprefix("sqlite:///").split("?", 1)[0])  # sqlite:///rel.db or sqlite:////abs.db
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


def model_version(model_uri: str, tracking_uri: str | None = None):
    """The MLflow ``ModelVersion`` of ``models:/<name>@<alias>`` or ``models:/<name>/<version>``."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    rest = model_uri.removeprefix("models:/").strip("/")
    if not model_uri.startswith("models:/") or ("@" not in rest and "/" not in rest):
        raise StageError(
            f"model URI {model_uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>"
        )
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if "@" in rest:
            return client.get_model_version_by_alias(*rest.rsplit("@", 1))
        return client.get_model_version(*rest.rsplit("/", 1))
    except MlflowException as exc:
        raise StageError(f"cannot read {model_uri!r} from {uri}: {exc}") from exc


def model_config_path(model_uri: str, tracking_uri: str | None = None) -> Path:
    """Download the ``config.yaml`` logged with a registered student; returns the local path."""
    uri = tracking_uri or mlflow.get_tracking_uri()
    mv = model_version(model_uri, uri)
    if not mv.run_id:
        raise StageError(f"{model_uri!r} (version {mv.version}) has no MLflow run holding its config.yaml")
    try:
        dst = tempfile.mkdtemp(prefix="pkdot-model-config-")
        return Path(MlflowClient(tracking_uri=uri).download_artifacts(mv.run_id, "config.yaml", dst))
    except MlflowException as exc:
        raise StageError(f"cannot read config.yaml of {model_uri!r} from {uri}: {exc}") from exc


def load_student(model_uri: str, tracking_uri: str | None = None) -> torch.nn.Module:
    """Load a registered student (the exported ``pt2`` graph), e.g. ``models:/pkdot-student-biovid@champion``,
    from ``tracking_uri`` or MLflow's current store (another dataclass than ``ModelOutput`` comes back a dict)."""
    import pkdot.models.heads  # noqa: F401 - registers ModelOutput as a pytree node, needed to deserialize

    if tracking_uri is not None:
        use_tracking_uri(tracking_uri)
    try:
        return mlflow.pytorch.load_model(model_uri)
    except MlflowException as exc:
        raise StageError(
            f"cannot load student {model_uri!r} from {mlflow.get_tracking_uri()}: {exc}"
        ) from exc
