"""The Prefect flow ``pkdot`` (flows/pipeline.py): config parameters, skipping finished stages, retries, artifacts.

The orchestration is tested here with small stand-in stage bodies (each writes a file) behind the library's real
"up to date" decision (:func:`pkdot.pipeline.base.execute`), on a temporary Prefect server; the real stages run
in tests/integration/.
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
from pkdot import pipeline
from pkdot.errors import ConfigError, DatasetError, StageError
from pkdot.pipeline.base import StageOutput
from pkdot.progress import report as report_progress

STAGE_ORDER = [s.name for s in pipeline.STAGES]
ARTIFACT_DIRS = {
    "manifest": "manifest.parquet",
    "extract": "features",
    "train-teacher": "teacher",
    "cache": "embeddings",
    "distill": "student",
    "evaluate": "report",
    "refit": "refit",
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
def test_the_flow_makes_no_caching_decision_of_its_own() -> None:
    from prefect.cache_policies import NO_CACHE

    assert list(pl.STAGE_TASKS) == STAGE_ORDER
    for name, stage_task in pl.STAGE_TASKS.items():
        assert stage_task.cache_policy is NO_CACHE and not stage_task.persist_result, name
        assert stage_task.name == name


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
    """Stand-in stage bodies (write the stage's artifact, count calls) behind the real up-to-date decision."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import dataclasses

        self.calls: Counter[str] = Counter()
        self.fail: dict[str, list[BaseException]] = {}
        monkeypatch.setattr(pipeline, "prepare_run", self.prepare_run)
        fakes = tuple(
            dataclasses.replace(
                s, body=self._body(s), key_extra=None, stale=None, before=None, is_current=None
            )
            for s in pipeline.STAGES
        )
        monkeypatch.setattr(pipeline, "STAGES", fakes)

    @staticmethod
    def prepare_run(cfg):
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        return cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"root": Path(cfg.run_dir) / "data"})}
        )

    def _body(self, stage):
        name = stage.name

        def run(cfg) -> StageOutput:
            self.calls[name] += 1
            if self.fail.get(name):
                raise self.fail[name].pop(0)
            path = Path(cfg.run_dir) / ARTIFACT_DIRS[name]
            path.mkdir(parents=True, exist_ok=True)
            (path / "out.txt").write_text(str(self.calls[name]))
            if name in PROGRESS_UNITS:  # what the library reports as it goes (pkdot.progress)
                for done in range(4):
                    report_progress(name, done, 3, PROGRESS_UNITS[name])
            if name == "extract":
                logging.getLogger("pkdot.features.extract").warning("quarantined s-7 (video): %s", BAD_VIDEO)
            fingerprint = hashlib.sha256(f"{name}|{cfg.section_hash(*stage.sections)}".encode()).hexdigest()
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
            return StageOutput([path / "out.txt"], details, fingerprint=fingerprint[:16])

        return run


def _run(run_dir: Path, **params) -> dict:
    return pl.pipeline(run_dir=str(run_dir), **params)


def test_flow_chains_the_stages_and_skips_finished_ones(
    prefect_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeStages(monkeypatch)
    first = _run(tmp_path / "run")
    assert list(first["stages"]) == STAGE_ORDER
    assert not any(s["skipped"] for s in first["stages"].values())
    assert all(fake.calls[s] == 1 for s in STAGE_ORDER)
    assert first["evaluate"]["alias"] == "champion" and "summary_markdown" not in first["evaluate"]
    assert not (tmp_path / "run" / ".prefect").exists()  # Prefect persists nothing: it decides nothing

    # A finished run directory: every stage is skipped by the library (the manifest re-scans its data set).
    second = _run(tmp_path / "run")
    assert fake.calls["manifest"] == 2
    for stage in STAGE_ORDER[1:]:
        assert second["stages"][stage] == {**first["stages"][stage], "skipped": True}, stage
        assert fake.calls[stage] == 1, stage

    # A distillation setting changed: only distill and evaluate run again.
    _run(tmp_path / "run", overrides={"distill.weights.pkdot": 0.2})
    assert [fake.calls[s] for s in STAGE_ORDER] == [3, 1, 1, 1, 2, 2, 2]

    # A different run directory never reuses another one's results.
    _run(tmp_path / "other")
    assert fake.calls["extract"] == 2


def test_an_output_removed_behind_the_flow_is_rebuilt(
    prefect_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeStages(monkeypatch)
    _run(tmp_path / "run")
    (tmp_path / "run" / "teacher" / "out.txt").unlink()
    again = _run(tmp_path / "run")
    assert fake.calls["train-teacher"] == 2 and not again["stages"]["train-teacher"]["skipped"]
    assert (tmp_path / "run" / "teacher" / "out.txt").is_file()
    assert again["stages"]["extract"]["skipped"] is True


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
        assert resumed["stages"][stage]["skipped"] is True and fake.calls[stage] == 1, stage
    assert fake.calls["distill"] == 2 and not resumed["stages"]["distill"]["skipped"]


def test_a_second_flow_on_a_run_directory_in_use_is_refused(
    prefect_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pkdot.pipeline.lock import RunDirBusy

    fake = FakeStages(monkeypatch)
    holder = _hold_lock_in_child(tmp_path / "run")
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by pid {holder.pid} "):
            _run(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()
    assert sum(fake.calls.values()) == 0
    _run(tmp_path / "run")  # the holder died: the kernel released its lock
    assert fake.calls["evaluate"] == 1


def _hold_lock_in_child(run_dir: Path):
    """A child process that holds the run directory's lock until killed."""
    import subprocess
    import sys
    import time

    code = (
        "import sys, time\n"
        "from pkdot.pipeline.lock import run_dir_lock\n"
        f"with run_dir_lock({str(run_dir)!r}, command='pkdot run (test holder)'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    time.sleep(0.1)
    return child


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
    assert fake.calls["extract"] == 2 and not done["stages"]["extract"]["skipped"]

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
    from pkdot.tracking.runs import PUBLIC_URI_ENV

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
    import dataclasses

    fake = FakeStages(monkeypatch)
    stages = list(pipeline.STAGES)
    at = STAGE_ORDER.index("evaluate")
    real = stages[at].body

    def evaluate_without_details(cfg):
        out = real(cfg)
        return StageOutput(out.outputs, {"report": "r.md"}, out.fingerprint)

    stages[at] = dataclasses.replace(stages[at], body=evaluate_without_details)
    monkeypatch.setattr(pipeline, "STAGES", tuple(stages))
    with pytest.raises(StageError, match="summary_markdown"):
        _run(tmp_path / "run")
    assert fake.calls["evaluate"] == 1
