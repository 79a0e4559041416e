"""pkdot.tracking.runs against a real MLflow SQLite store in tmp_path (no server)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pkdot.config import load_config
from pkdot.errors import StageError
from pkdot.tracking.runs import (
    EXPERIMENT_KIND,
    PARENT_FILE,
    Tracker,
    end_parent_run,
    log_jobs,
    resolve_tracking_uri,
)


@pytest.fixture()
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return load_config(overrides={"run_dir": str(tmp_path / "run"), "tracking.experiment": "pkdot-test"})


def test_resolve_tracking_uri_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = load_config(overrides={"run_dir": str(tmp_path / "r")})
    assert resolve_tracking_uri(c) == f"sqlite:///{(tmp_path / 'r').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri(c) == "http://127.0.0.1:5999"
    c2 = load_config(overrides={"run_dir": str(tmp_path / "r"), "tracking.tracking_uri": "sqlite:////x/m.db"})
    assert resolve_tracking_uri(c2) == "sqlite:////x/m.db"


def test_two_run_directories_in_one_process_keep_their_own_stores(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = load_config(overrides={"run_dir": str(tmp_path / "a")})
    b = load_config(overrides={"run_dir": str(tmp_path / "b")})
    ta = Tracker(a)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow exports it; Tracker undoes that
    tb = Tracker(b)
    assert ta.tracking_uri != tb.tracking_uri == resolve_tracking_uri(b)
    assert ta.parent_run_id() != tb.parent_run_id()
    assert (tmp_path / "a" / "mlflow.db").is_file() and (tmp_path / "b" / "mlflow.db").is_file()


def test_parent_and_stage_runs(cfg):
    tracker = Tracker(cfg)
    parent = tracker.parent_run_id()
    run_dir = Path(cfg.run_dir).resolve()
    assert json.loads((run_dir / PARENT_FILE).read_text())["run_id"] == parent
    assert (run_dir / "mlflow.db").is_file()
    # A second Tracker (another stage/process) finds the same parent.
    assert Tracker(cfg).parent_run_id() == parent

    with tracker.stage_run("train-teacher", fold=0, seed=1, loss="none") as sr:
        sr.log_params({"lr": 1e-3, "layers": [1, 2]})
        sr.log_params({f"many.p{i:03d}": i for i in range(250)})  # three MLflow batches of <= 100
        sr.log_metrics({"test_accuracy": 0.75}, step=2)
        stage_id = sr.run_id
    with pytest.raises(RuntimeError), tracker.stage_run("distill") as failed:
        failed_id = failed.run_id
        raise RuntimeError("boom")

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    prun = client.get_run(parent)
    flat = cfg.flat()
    assert len(prun.data.params) == len(flat)
    assert prun.data.params["train.epochs_student"] == str(flat["train.epochs_student"])
    assert prun.data.params["distill.losses"] == json.dumps(flat["distill.losses"])
    assert [a.path for a in client.list_artifacts(parent)] == ["config.yaml"]
    assert client.get_experiment(prun.info.experiment_id).artifact_location.endswith("run/mlartifacts")

    srun = client.get_run(stage_id)
    assert srun.data.tags[MLFLOW_PARENT_RUN_ID] == parent
    assert srun.info.run_name == "train-teacher/fold-0/seed-1"
    assert srun.data.tags["loss"] == "none" and srun.info.status == "FINISHED"
    assert {k: srun.data.params[k] for k in ("lr", "layers")} == {"lr": "0.001", "layers": "[1, 2]"}
    assert len(srun.data.params) == 252 and srun.data.params["many.p249"] == "249"
    assert srun.data.metrics["test_accuracy"] == 0.75
    assert client.get_run(failed_id).info.status == "FAILED"
    assert prun.info.status == "RUNNING"
    end_parent_run(cfg.run_dir, "FINISHED")
    assert client.get_run(parent).info.status == "FINISHED"
    with pytest.raises(StageError, match="status"):
        end_parent_run(cfg.run_dir, "DONE")


def test_log_jobs_logs_each_epoch_at_its_step(cfg, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    epochs = [
        {"epoch": e, "train_loss": 1.0 / e, "val_metric": 0.5 + 0.1 * e, "best": e == 3} for e in (1, 2, 3)
    ]
    (job_dir / "history.json").write_text(json.dumps({"phases": {"student": {"epochs": epochs}}}))
    (job_dir / "metrics.json").write_text(json.dumps({"test/accuracy": 0.75}))
    log_jobs(cfg, "distill", [SimpleNamespace(out_dir=job_dir, fold=0, seed=1, loss="pkdot")])
    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    runs = client.search_runs([Tracker(cfg).experiment_id])
    (run,) = [r for r in runs if r.info.run_name == "distill/pkdot/fold-0/seed-1"]
    val = client.get_metric_history(run.info.run_id, "student/val_metric")
    assert [(m.step, round(m.value, 6)) for m in sorted(val, key=lambda m: m.step)] == [
        (1, 0.6),
        (2, 0.7),
        (3, 0.8),
    ]
    assert len(client.get_metric_history(run.info.run_id, "student/train_loss")) == 3
    assert run.data.metrics["test_accuracy"] == 0.75 and "student/best" not in run.data.metrics
    assert run.data.tags["loss"] == "pkdot" and run.data.tags["pkdot.fold"] == "0"


def test_bad_inputs_raise_stage_errors(cfg):
    tracker = Tracker(cfg)
    with tracker.stage_run("x") as sr:
        with pytest.raises(StageError, match="metric 'acc'"):
            sr.log_metrics({"acc": "high"})
        with pytest.raises(StageError, match="does not exist"):
            sr.log_artifact(Path(cfg.run_dir) / "missing.txt")
    (Path(cfg.run_dir) / PARENT_FILE).write_text("not json")
    with pytest.raises(StageError, match=PARENT_FILE):
        Tracker(cfg).parent_run_id()


def test_public_uri_is_distinct_from_the_tracking_uri(tmp_path, monkeypatch):
    from pkdot.tracking.runs import PUBLIC_URI_ENV, resolve_public_uri, run_ui_url

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PUBLIC_URI_ENV, raising=False)
    local = load_config(overrides={"run_dir": str(tmp_path / "r")})
    assert resolve_public_uri(local) is None  # a SQLite store has no UI to link to
    server = load_config(
        overrides={"run_dir": str(tmp_path / "r"), "tracking.tracking_uri": "http://mlflow:5000/"}
    )
    assert resolve_public_uri(server) == "http://mlflow:5000"
    monkeypatch.setenv(PUBLIC_URI_ENV, "http://localhost:5000/")
    assert resolve_public_uri(server) == "http://localhost:5000"
    assert resolve_tracking_uri(server) == "http://mlflow:5000/"  # processes still log to the service name
    assert resolve_public_uri(local) == "http://localhost:5000"
    own = load_config(
        overrides={"run_dir": str(tmp_path / "r"), "tracking.public_uri": "https://mlflow.example.org"}
    )
    assert resolve_public_uri(own) == "https://mlflow.example.org"  # the config wins over the environment
    assert run_ui_url("http://h:5000/", "abc") == "http://h:5000/#/runs/abc"
    assert run_ui_url("http://h:5000", "abc", "7") == "http://h:5000/#/experiments/7/runs/abc"


@pytest.mark.parametrize(("verbose", "shown"), [(False, False), (True, True)])
def test_mlflow_store_chatter_is_muted_unless_verbose(tmp_path, verbose, shown):
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        f"logging.basicConfig(level=logging.{'INFO' if verbose else 'WARNING'})\n"
        "from pkdot.config import load_config\n"
        "from pkdot.tracking.runs import Tracker\n"
        "Tracker(load_config(overrides={'run_dir': sys.argv[1]})).parent_run_id()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_LOGGING_LEVEL")}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "mlflow.db").is_file()
    assert ("Creating initial MLflow database tables" in done.stderr) is shown, done.stderr[-2000:]


def test_mlflow_run_links_on_stdout_are_off_by_default():
    """MLflow would print "View run ... at <tracking server>" per ended run (the internal address)."""
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    import pkdot.tracking.runs  # noqa: F401 - sets the default on import

    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is True


def test_experiment_is_tagged_as_model_development(cfg):
    """MLflow 3 opens an experiment on its GenAI overview unless it is tagged as model development."""
    tracker = Tracker(cfg)
    experiment = MlflowClient(tracking_uri=tracker.tracking_uri).get_experiment(tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND[0]] == "custom_model_development"
