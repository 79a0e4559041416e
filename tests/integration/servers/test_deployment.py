"""The deployment pkdot/full-pipeline on real servers (Prefect, MLflow, Ray started by infra/local_stack.py).

1. prefect.yaml: ``prefect deploy --all`` puts it on the process pool ``pkdot-pool`` with a parameter form that
   documents every parameter (descriptions, drop-downs); the server refuses a preset outside the drop-down; a
   ``prefect worker`` picks a run up and executes the flow's code (a bad override fails with pkdot's ConfigError).
2. ``python -m flows.serve``: ``prefect deployment run pkdot/full-pipeline --watch`` runs the whole demo
   pipeline on a tiny synthetic Biovid set with one undecodable video; the flow run's logs (read back through
   the Prefect client) hold pkdot's quarantine WARNING; the MLflow server then holds the runs and the registered
   model ``pkdot-student-biovid`` with alias ``champion`` (its own validation/test scores, its datasets), and the
   flow run carries the summary, results table, progress and MLflow-link artifacts (the link on the public UI
   address). ``pkdot predict --tracking-uri`` then runs the champion from another folder, leaving it empty.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.integration

PIPELINE_TIMEOUT_S = 900


def test_prefect_yaml_deploys_to_the_process_pool_and_a_worker_runs_it(it, stack_env, processes) -> None:
    REPO, BIN, prefect_api = it.REPO, it.BIN, it.prefect_api
    pool = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]
    assert pool == "pkdot-pool"
    for argv in (
        [str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process", "--overwrite"],
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
    ):
        done = subprocess.run(argv, cwd=REPO, env=stack_env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}"

    deployment = prefect_api(stack_env, "/deployments/name/pkdot/full-pipeline")
    assert deployment["work_pool_name"] == pool
    assert deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    pull = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert Path(pull["directory"]) == REPO
    schema = deployment["parameter_openapi_schema"]["properties"]
    assert {
        "config_path",
        "dataset",
        "task",
        "root",
        "preset",
        "losses",
        "folds",
        "seed",
        "run_dir",
        "overrides",
    } <= set(schema)
    # The "Custom run" form documents itself: a description per parameter, drop-downs for the choices.
    for name, prop in schema.items():
        assert len(prop.get("description") or "") > 20, f"parameter {name} has no description in the UI"
    enums = {n: [o.get("enum") for o in p.get("anyOf", [p]) if "enum" in o] for n, p in schema.items()}
    assert enums["preset"] == [["demo", "paper"]] and enums["dataset"] == [["biovid", "affwild2", "table"]]
    assert enums["task"] and "arousal" in enums["task"][0]

    # A preset outside the drop-down is refused by the server before any run exists.
    done = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "pkdot/full-pipeline", "--param", "preset=no-such-preset"],
        cwd=REPO, env=stack_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    refused = done.stdout + done.stderr
    assert "UUID:" not in refused and "no-such-preset" in refused, refused[-3000:]

    processes.start(
        "worker", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"], stack_env
    )
    flow_run_id, output = it.run_deployment(stack_env, {"overrides": {"train.no_such_field": 1}}, timeout=240)
    flow_run = prefect_api(stack_env, f"/flow_runs/{flow_run_id}")
    assert flow_run["state"]["type"] == "FAILED", output[-3000:]
    assert "train.no_such_field" in flow_run["state"]["message"] + output
    processes.stop("worker")
    done = subprocess.run(
        [str(BIN / "prefect"), "deployment", "delete", "pkdot/full-pipeline"],
        cwd=REPO, env=stack_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def _flow_run_logs(env: dict[str, str], flow_run_id: str) -> list:
    """The flow run's logs, read through the Prefect client from the stack's server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def test_served_full_pipeline_trains_and_registers_the_champion(
    it, stack_env, processes, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    from pkdot.data.synthetic import write_synthetic

    prefect_api = it.prefect_api
    # The UI address people open differs from the address the processes log to (as in the compose stack).
    public = stack_env["MLFLOW_TRACKING_URI"].replace("127.0.0.1", "localhost")
    stack_env["PKDOT_MLFLOW_PUBLIC_URI"] = public
    processes.start("serve", [it.PYTHON, "-m", "flows.serve"], stack_env)

    # A tiny synthetic Biovid set with one video that cannot be decoded: extraction quarantines that sample.
    root = write_synthetic(
        "biovid",
        tmp_path / "biovid",
        subjects=it.TINY_OVERRIDES["synth.subjects"],
        samples_per_class=it.TINY_OVERRIDES["synth.samples_per_class"],
        progress=False,
    )
    videos = sorted(v for v in root.rglob("*.mp4") if "-BL1-" in v.name or "-PA4-" in v.name)  # binary task
    broken = videos[-1]
    broken.write_bytes(b"this is not an MP4 file")

    deployment = it.wait_for_deployment(stack_env, "pkdot/full-pipeline", 180, processes, served="serve")
    assert deployment["work_pool_name"] is None and "pkdot" in deployment["tags"]  # served: no pool

    run_dir = tmp_path / "run"
    params = {
        "preset": "demo",
        "dataset": "biovid",
        "root": str(root),
        "losses": it.TINY_LOSSES,
        "folds": 1,
        "run_dir": str(run_dir),
        "overrides": {**it.TINY_OVERRIDES, "train.refit": True},  # the champion is the refit (issue 22)
    }
    flow_run_id, output = it.run_deployment(stack_env, params, timeout=PIPELINE_TIMEOUT_S)
    flow_run = prefect_api(stack_env, f"/flow_runs/{flow_run_id}")
    assert flow_run["state"]["type"] == "COMPLETED", (
        f"{output[-4000:]}\n--- serve log ---\n{processes.log('serve')[-6000:]}"
    )
    assert (run_dir / "report" / "report.md").is_file()
    assert not (run_dir / "mlflow.db").exists(), (
        "the run logged to a local SQLite store, not to the MLflow server"
    )

    # pkdot's own WARNING (the quarantine, logged by the extract stage) is in the flow run's logs.
    logs = _flow_run_logs(stack_env, flow_run_id)
    warnings = [log for log in logs if log.name.startswith("pkdot") and log.level == logging.WARNING]
    assert any("quarantined" in log.message and broken.stem in log.message for log in warnings), [
        (log.name, log.level, log.message[:200]) for log in logs
    ][-40:]
    assert all(log.task_run_id is not None for log in warnings)  # attributed to the stage's task run

    # The flow run's artifacts: summary, results table, progress per long stage, link to its MLflow run.
    artifacts = prefect_api(
        stack_env, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    by_key = {a["key"]: a for a in artifacts}
    assert "pkdot-summary" in by_key and by_key["pkdot-summary"]["data"].strip()
    table = json.loads(by_key["pkdot-results"]["data"])
    assert {"student-none", "student-pkdot"} <= {row["model"] for row in table}
    for stage in ("extract", "train-teacher", "distill"):
        assert float(by_key[f"pkdot-progress-{stage}"]["data"]) == 100.0, stage
    link = by_key["pkdot-mlflow-run"]["data"]
    assert f"]({public}/#/experiments/" in link, link

    # The MLflow server holds the pipeline's runs and the registered student.
    client = MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("pkdot")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert runs, "no runs on the MLflow server"
    assert any(r.info.run_id in link for r in runs), (
        "the link artifact does not point at one of the server's runs"
    )
    names = {r.info.run_name or "" for r in runs}
    assert any(n.startswith("train-teacher") for n in names) and any(
        n.startswith("evaluate") for n in names
    ), names
    champion = client.get_model_version_by_alias("pkdot-student-biovid", "champion")
    assert champion.status == "READY"
    assert champion.run_id in {r.info.run_id for r in runs}
    # Issue 22: the champion is the chosen configuration refit on every subject of the data set, with its card;
    # its run logs the manifest rows it was trained on (train + the validation carve-out: every sample).
    subjects = set(pd.read_parquet(run_dir / "manifest.parquet")["subject_id"].astype(str))
    refit_fold = json.loads((run_dir / "refit" / "splits.json").read_text())[0]
    assert set(refit_fold["train"]) | set(refit_fold["val"]) == subjects
    assert champion.tags["pkdot.trained_on"].startswith(f"all {len(subjects)} subjects (refit")
    assert {"cv_accuracy", "pkdot.cv_estimate", "pkdot.protocol", "pkdot.loss"} <= set(champion.tags)
    assert "Cross-validated test accuracy" in champion.description
    register_run = client.get_run(champion.run_id)
    contexts = {
        {t.key: t.value for t in d.tags}["mlflow.data.context"] for d in register_run.inputs.dataset_inputs
    }
    assert contexts == {"train", "validation"}

    # `pkdot predict` loads the champion from the server's registry and runs stage-1 face extraction on videos,
    # from a folder it leaves empty.
    videos = [v for v in videos if v != broken][:2]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [str(it.BIN / "pkdot"), "predict", "--tracking-uri", stack_env["MLFLOW_TRACKING_URI"],
         "--model", "models:/pkdot-student-biovid@champion", *map(str, videos)],
        cwd=elsewhere, env=stack_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["video"] for r in rows] == [str(v) for v in videos]
    for r in rows:
        assert r["prediction"] in ("BL1", "PA4")
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-3
    assert list(elsewhere.iterdir()) == []

    # Issue 24 case 6: the credentials never reach MLflow (params, tags, logged files) nor the run directory.
    leaks = []
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values()]
        leaks += [
            f"run {run.info.run_id}: {v[:60]}" for v in values if any(s in v for s in it.SECRETS.values())
        ]
        for artifact in _artifact_files(client, run.info.run_id):
            text = client.download_artifacts(run.info.run_id, artifact, str(tmp_path / "artifacts"))
            content = Path(text).read_bytes()
            leaks += [f"{run.info.run_id}/{artifact}" for s in it.SECRETS.values() if s.encode() in content]
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".json", ".log", ".md", ".txt", ".jsonl"):
            content = path.read_bytes()
            leaks += [str(path) for s in it.SECRETS.values() if s.encode() in content]
    leaks += [f"serve log: {s[:4]}..." for s in it.SECRETS.values() if s in processes.log("serve")]
    assert not leaks, leaks


def _artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    """Every small text artifact of a run (YAML, JSON, Markdown, logs), recursively."""
    found = []
    for entry in client.list_artifacts(run_id, path):
        if entry.is_dir:
            found += _artifact_files(client, run_id, entry.path)
        elif entry.path.endswith((".yaml", ".json", ".md", ".txt", ".log", ".csv")):
            found.append(entry.path)
    return found
