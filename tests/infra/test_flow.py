"""The Prefect flow ``pkdot`` (flows/pipeline.py): cache keys, config parameters, caching across runs, retries.

The orchestration is tested here with small stand-in stage functions (each writes a file and returns a
``StageResult``) on a temporary Prefect server; the real stages run in tests/integration/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import typing
import warnings
from collections import Counter
from pathlib import Path

import pytest
import yaml

from flows import pipeline as pl
from pkdot.config import load_config
from pkdot.errors import ConfigError, DatasetError, StageError
from pkdot.progress import report as report_progress
from pkdot.stages import StageResult

STAGE_FUNCTIONS = {
    "manifest": "stage_manifest",
    "extract": "stage_extract",
    "train-teacher": "stage_train_teacher",
    "cache": "stage_cache",
    "distill": "stage_distill",
    "evaluate": "stage_evaluate",
}
ARTIFACT_DIRS = {
    "manifest": "manifest.parquet",
    "extract": "features",
    "train-teacher": "teacher",
    "cache": "embeddings",
    "distill": "student",
    "evaluate": "report",
}


PROGRESS_UNITS = {"extract": "shards", "train-teacher": "jobs", "distill": "jobs"}
BAD_VIDEO = "video s-7.mp4 cannot be decoded"
SUMMARY_TABLE = [
    {"model": "student-pkdot", "metric": "accuracy", "mean": 0.912345, "std": 0.1, "ci_low": 0.7,
     "ci_high": 1.0, "n": 2, "macro_f1_mean": 0.9, "naive_ci_low": 0.8},
    {"model": "student-none", "metric": "accuracy", "mean": 0.8, "std": 0.1, "ci_low": 0.6,
     "ci_high": 1.0, "n": 2, "macro_f1_mean": 0.79, "naive_ci_low": 0.7},
]  # fmt: skip


# ---- the deployment's parameter form (no Prefect server) ---------------------------------------------------
def _enum(prop: dict) -> list | None:
    for option in prop.get("anyOf", [prop]):
        if "enum" in option:
            return option["enum"]
    return None


@pytest.mark.parametrize("source", ["function", "entrypoint"])
def test_parameter_schema_documents_every_parameter_and_offers_choices(source: str) -> None:
    """What the UI's "Custom run" form shows: a description per parameter (from the Google-style "Args"), and
    drop-downs (enums) for dataset, task and preset, read as `prefect deploy` (entrypoint) and `serve` do."""
    from prefect.utilities.callables import parameter_schema, parameter_schema_from_entrypoint

    from pkdot.config import DataConfig, Preset, Task

    if source == "function":
        schema = parameter_schema(pl.pipeline).model_dump()
    else:
        entrypoint = f"{Path(pl.__file__).resolve()}:pipeline"
        schema = parameter_schema_from_entrypoint(entrypoint).model_dump()
    props = schema["properties"]
    assert list(props)[:5] == ["config_path", "dataset", "task", "root", "preset"]
    for name, prop in props.items():
        assert len(prop.get("description") or "") > 20, f"{name} has no description"
    assert _enum(props["dataset"]) == list(typing.get_args(DataConfig.model_fields["dataset"].annotation))
    assert _enum(props["task"]) == list(typing.get_args(Task))
    assert _enum(props["preset"]) == list(typing.get_args(Preset))
    assert _enum(props["root"]) is None and _enum(props["run_dir"]) is None
    assert "synth.subjects" in props["overrides"]["description"]


def test_flow_pickled_by_value_still_validates_its_parameters() -> None:
    """`flow.serve` runs a flow in a process that gets it pickled by value: names used only in its annotations
    (Literal, Any) must not be needed there (they were, and every served run failed validation)."""
    import pickle

    import cloudpickle

    assert not any(isinstance(a, str) for a in pl.pipeline.fn.__annotations__.values())
    cloudpickle.register_pickle_by_value(pl)
    try:
        served = pickle.loads(cloudpickle.dumps(pl.pipeline))
    finally:
        cloudpickle.unregister_pickle_by_value(pl)
    assert served.validate_parameters({"preset": "demo", "dataset": "biovid"})["preset"] == "demo"
    with pytest.raises(Exception, match="preset"):
        served.validate_parameters({"preset": "huge"})


def test_build_config_maps_task() -> None:
    assert pl.build_config(dataset="biovid", task="multiclass").data.task == "multiclass"
    with pytest.raises(ConfigError, match="given twice"):
        pl.build_config(task="binary", overrides={"data.task": "multiclass"})


# ---- cache keys and config (no Prefect server) ------------------------------------------------------------
def test_cache_key_follows_the_stage_inputs() -> None:
    cfg = load_config(overrides={"run_dir": "/tmp/x"})
    key = pl.stage_cache_key("distill", cfg, "abc")
    assert key == pl.stage_cache_key("distill", cfg, "abc")  # deterministic
    assert key != pl.stage_cache_key("distill", cfg, "abd")  # upstream outputs changed
    student = load_config(overrides={"run_dir": "/tmp/x", "train.epochs_student": 3})
    assert pl.stage_cache_key("distill", student, "abc") != key  # its own section changed
    assert pl.stage_cache_key("extract", student, "abc") == pl.stage_cache_key("extract", cfg, "abc")
    loss = load_config(overrides={"run_dir": "/tmp/x", "distill.weights.pkdot": 0.2})
    assert pl.stage_cache_key("extract", loss, "m") == pl.stage_cache_key("extract", cfg, "m")
    assert pl.stage_cache_key("distill", loss, "m") != pl.stage_cache_key("distill", cfg, "m")
    seeded = load_config(overrides={"run_dir": "/tmp/x", "seed": 7})
    for stage in pl.STAGE_INPUTS:
        assert pl.stage_cache_key(stage, seeded, "u") != pl.stage_cache_key(stage, cfg, "u")
    with pytest.raises(StageError, match="unknown stage"):
        pl.stage_cache_key("nonsense", cfg, "")


def test_evaluate_key_follows_the_tracking_server(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(overrides={"run_dir": "/tmp/x"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://a:5000")
    at_a = pl.stage_cache_key("evaluate", cfg, "u")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://b:5000")
    assert pl.stage_cache_key("evaluate", cfg, "u") != at_a
    assert pl.stage_cache_key("distill", cfg, "u") == pl.stage_cache_key("distill", cfg, "u")


def test_every_stage_but_manifest_has_cache_inputs() -> None:
    assert set(pl.STAGE_INPUTS) == set(pl.STAGE_ORDER) - {"manifest"}
    sections = set(load_config().model_dump())
    for stage, inputs in pl.STAGE_INPUTS.items():
        assert "seed" in inputs and set(inputs) <= sections, stage


def test_build_config_maps_named_parameters(tmp_path: Path) -> None:
    cfg = pl.build_config(
        dataset="biovid",
        losses=["none", "pkdot"],
        folds=1,
        seed=3,
        run_dir=str(tmp_path / "run"),
        overrides={"synth.subjects": 4},
    )
    assert cfg.data.dataset == "biovid" and cfg.distill.losses == ["none", "pkdot"]
    assert cfg.train.max_folds == 1 and cfg.seed == 3 and cfg.synth.subjects == 4
    assert Path(cfg.run_dir) == (tmp_path / "run").resolve() and Path(cfg.run_dir).is_absolute()
    assert pl.build_config(run_dir="runs/x").run_dir == Path.cwd() / "runs" / "x"
    assert cfg.preset == "demo"
    with pytest.raises(ConfigError, match="given twice"):
        pl.build_config(seed=1, overrides={"seed": 2})
    with pytest.raises(ConfigError, match="preset"):
        pl.build_config(preset="huge")


def test_build_config_keeps_the_files_preset(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"preset": "paper", "train": {"epochs_student": 2}}))
    cfg = pl.build_config(config_path=str(path))
    assert cfg.preset == "paper" and cfg.model.embed_dim == 512 and cfg.train.epochs_student == 2
    assert pl.build_config(config_path=str(path), preset="demo").model.embed_dim == 64


def test_mlflow_links() -> None:
    link, _ = pl._mlflow_run_link("http://mlflow:5000/", "r1")
    assert link == "http://mlflow:5000/#/runs/r1"
    link, description = pl._mlflow_run_link("sqlite:////runs/a/mlflow.db", "r2")
    assert (
        link.endswith("/#/runs/r2")
        and "mlflow ui --backend-store-uri sqlite:////runs/a/mlflow.db" in description
    )


# ---- the flow on a temporary Prefect server -----------------------------------------------------------------
@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class FakeStages:
    """Stand-ins for pkdot.stages: write the stage's artifact, count calls, fingerprint = hash(inputs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        self.fail: dict[str, list[BaseException]] = {}
        from pkdot import stages

        monkeypatch.setattr(stages, "prepare_run", self.prepare_run)
        for name, fn in STAGE_FUNCTIONS.items():
            monkeypatch.setattr(stages, fn, self._stage(name))

    @staticmethod
    def prepare_run(cfg):
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        return cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"root": Path(cfg.run_dir) / "data"})}
        )

    def _stage(self, name: str):
        def run(cfg, upstream: str = "") -> StageResult:
            self.calls[name] += 1
            if self.fail.get(name):
                raise self.fail[name].pop(0)
            path = Path(cfg.run_dir) / ARTIFACT_DIRS[name]
            path.mkdir(parents=True, exist_ok=True)
            (path / "out.txt").write_text(upstream)
            if name in PROGRESS_UNITS:  # what the library reports as it goes (pkdot.progress)
                for done in range(4):
                    report_progress(name, done, 3, PROGRESS_UNITS[name])
            if name == "extract":
                logging.getLogger("pkdot.features.extract").warning("quarantined s-7 (video): %s", BAD_VIDEO)
            sections = pl.STAGE_INPUTS.get(name, ("data",))
            fingerprint = hashlib.sha256(
                f"{name}|{cfg.section_hash(*sections)}|{upstream}".encode()
            ).hexdigest()
            details = {"n": self.calls[name]}
            if name == "evaluate":
                (path / "summary.json").write_text(json.dumps({"table": SUMMARY_TABLE}))
                details.update(
                    summary_markdown="# PKDOT report\n| model | accuracy |\n|---|---|\n| student-pkdot | 0.9 |",
                    report=str(path / "report.md"),
                    experiment_id="7",
                    mlflow_run_id="run123",
                    tracking_uri="http://mlflow.test:5000",
                    model_name="pkdot-student-biovid",
                    model_version="1",
                    alias="champion",
                )
            return StageResult(name, path, fingerprint[:16], False, details)

        return run


def _run(run_dir: Path, **params) -> dict:
    return pl.pipeline(run_dir=str(run_dir), **params)


def test_flow_chains_the_stages_and_caches_finished_ones(
    prefect_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeStages(monkeypatch)
    first = _run(tmp_path / "run")
    assert list(first["stages"]) == list(pl.STAGE_ORDER)
    assert not any(s["cached"] for s in first["stages"].values())
    assert all(fake.calls[s] == 1 for s in pl.STAGE_ORDER)
    # each stage got the previous stage's fingerprint as `upstream`
    for before, after in zip(pl.STAGE_ORDER, pl.STAGE_ORDER[1:], strict=False):
        written = (Path(first["stages"][after]["path"]) / "out.txt").read_text()
        assert written == first["stages"][before]["fingerprint"]
    assert first["evaluate"]["alias"] == "champion" and "summary_markdown" not in first["evaluate"]
    assert any((tmp_path / "run" / pl.RESULTS_DIR).iterdir()), (
        "results are not persisted in the run directory"
    )

    # Same inputs: every stage but the manifest comes from Prefect's cache.
    second = _run(tmp_path / "run")
    assert second["stages"]["manifest"]["cached"] is False and fake.calls["manifest"] == 2
    for stage in pl.STAGE_ORDER[1:]:
        assert second["stages"][stage]["cached"] is True, stage
        assert fake.calls[stage] == 1, stage
        assert second["stages"][stage] == {**first["stages"][stage], "cached": True}, stage

    # A distillation setting changed: only distill and evaluate run again.
    _run(tmp_path / "run", overrides={"distill.weights.pkdot": 0.2})
    assert [fake.calls[s] for s in pl.STAGE_ORDER] == [3, 1, 1, 1, 2, 2]

    # A different run directory never reuses another one's cache.
    _run(tmp_path / "other")
    assert fake.calls["extract"] == 2


def test_cached_result_with_missing_artifacts_is_recomputed(
    prefect_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import shutil

    fake = FakeStages(monkeypatch)
    _run(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "teacher")
    again = _run(tmp_path / "run")
    assert fake.calls["train-teacher"] == 2 and again["stages"]["train-teacher"]["cached"] is False
    assert (tmp_path / "run" / "teacher" / "out.txt").is_file()
    assert again["stages"]["extract"]["cached"] is True


def test_rerun_after_a_failure_skips_the_finished_stages(
    prefect_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeStages(monkeypatch)
    fake.fail["distill"] = [RuntimeError("worker lost")]
    with pytest.raises(RuntimeError, match="worker lost"):
        _run(tmp_path / "run")
    assert fake.calls["evaluate"] == 0
    resumed = _run(tmp_path / "run")
    for stage in ("extract", "train-teacher", "cache"):
        assert resumed["stages"][stage]["cached"] is True and fake.calls[stage] == 1, stage
    assert fake.calls["distill"] == 2 and resumed["stages"]["distill"]["cached"] is False


def test_io_stages_retry_io_errors_but_not_bad_input(
    prefect_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeStages(monkeypatch)
    fast = {k: pl.STAGE_TASKS[k].with_options(retry_delay_seconds=0) for k in ("manifest", "extract")}
    monkeypatch.setitem(pl.STAGE_TASKS, "manifest", fast["manifest"])
    monkeypatch.setitem(pl.STAGE_TASKS, "extract", fast["extract"])
    assert pl.STAGE_TASKS["extract"].retries == pl.IO_RETRIES >= 1

    fake.fail["extract"] = [OSError("NFS hiccup")]
    done = _run(tmp_path / "flaky")
    assert fake.calls["extract"] == 2 and done["stages"]["extract"]["cached"] is False

    fake.fail["manifest"] = [DatasetError("samples.csv: missing column 'subject_name'")]
    with pytest.raises(DatasetError, match="subject_name"):
        _run(tmp_path / "bad")
    assert fake.calls["manifest"] == 2  # one call in the flaky run + one here: no retry of bad input


def _artifacts_of(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in artifacts}


def test_flow_publishes_summary_results_progress_and_mlflow_link_artifacts(
    prefect_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pkdot.tracking import PUBLIC_URI_ENV

    monkeypatch.delenv(PUBLIC_URI_ENV, raising=False)
    FakeStages(monkeypatch)
    state = pl.pipeline(run_dir=str(tmp_path / "run"), return_state=True)
    assert state.is_completed()
    by_key = _artifacts_of(state.state_details.flow_run_id)
    assert by_key[pl.SUMMARY_ARTIFACT_KEY].type == "markdown"
    assert "# PKDOT report" in by_key[pl.SUMMARY_ARTIFACT_KEY].data
    # Prefect stores a link artifact as the markdown "[text](link)".
    assert "](http://mlflow.test:5000/#/experiments/7/runs/run123)" in by_key[pl.MLFLOW_ARTIFACT_KEY].data

    # The results table: one row per model, the chosen columns, rounded.
    results = by_key[pl.RESULTS_ARTIFACT_KEY]
    assert results.type == "table"
    rows = json.loads(results.data)
    assert [r["model"] for r in rows] == ["student-pkdot", "student-none"]
    assert rows[0]["mean"] == 0.9123 and "naive_ci_low" not in rows[0] and rows[0]["macro_f1_mean"] == 0.9

    # One progress artifact per long stage, at 100 % after its last report.
    for stage, unit in PROGRESS_UNITS.items():
        progress = by_key[f"{pl.PROGRESS_ARTIFACT_PREFIX}{stage}"]
        assert progress.type == "progress" and float(progress.data) == 100.0, stage
        assert progress.description == f"{stage}: 3 of 3 {unit} done"
    assert not any(k.endswith(("-cache", "-evaluate", "-manifest")) for k in by_key)

    # With a public UI address (a compose stack), the link points there, not at the service name.
    monkeypatch.setenv(PUBLIC_URI_ENV, "http://localhost:5999")
    state = pl.pipeline(run_dir=str(tmp_path / "run"), return_state=True)
    link = _artifacts_of(state.state_details.flow_run_id)[pl.MLFLOW_ARTIFACT_KEY]
    assert "](http://localhost:5999/#/experiments/7/runs/run123)" in link.data
    assert "logged to http://mlflow.test:5000" in link.description


def test_pkdot_log_lines_reach_the_flow_run_logs(
    prefect_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    (forwarder,) = [h for h in logging.getLogger("pkdot").handlers if isinstance(h, pl.RunLogForwarder)]
    assert any(isinstance(h, APILogHandler) for h in forwarder.targets)
    assert pl.send_library_logs_to_prefect() == []  # idempotent: no second forwarder
    # Outside a run, a pkdot record goes nowhere near the API (no "without a flow run id" warning).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logging.getLogger("pkdot.test").warning("outside any flow run")
    FakeStages(monkeypatch)
    state = pl.pipeline(run_dir=str(tmp_path / "run"), return_state=True)
    flow_run_id = state.state_details.flow_run_id
    messages: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        messages = [f"{log.name} {logging.getLevelName(log.level)} {log.message}" for log in logs]
        if any(BAD_VIDEO in m for m in messages):
            break
        time.sleep(0.5)
    assert any(m.startswith("pkdot.features.extract WARNING") and BAD_VIDEO in m for m in messages), messages[
        -20:
    ]
    assert sum(BAD_VIDEO in m for m in messages) == 1  # once, not once per handler


def test_flow_rejects_an_evaluate_result_without_its_details(
    prefect_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeStages(monkeypatch)
    from pkdot import stages

    real_evaluate = stages.stage_evaluate

    def evaluate_without_details(cfg, upstream=""):
        result = real_evaluate(cfg, upstream)
        return StageResult(result.stage, result.path, result.fingerprint, False, {"report": "r.md"})

    monkeypatch.setattr(stages, "stage_evaluate", evaluate_without_details)
    with pytest.raises(StageError, match="summary_markdown"):
        _run(tmp_path / "run")
    assert fake.calls["evaluate"] == 1
