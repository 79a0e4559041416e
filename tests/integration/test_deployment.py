"""The deployment pkdot/full-pipeline on real servers (Prefect, MLflow, Ray started by infra/local_stack.py).

1. prefect.yaml: ``prefect deploy --all`` puts it on the process pool ``pkdot-pool``; a ``prefect worker`` picks a
   run up and executes the flow's code (a run with an unknown preset fails with pkdot's ConfigError).
2. ``python -m flows.serve``: ``prefect deployment run pkdot/full-pipeline --watch`` runs the whole demo
   pipeline on a tiny synthetic Biovid set; the MLflow server then holds the runs and the registered model
   ``pkdot-student-biovid`` with alias ``champion``, and the flow run carries the summary and MLflow artifacts.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

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
        "root",
        "preset",
        "losses",
        "folds",
        "seed",
        "run_dir",
        "overrides",
    } <= set(schema)

    processes.start(
        "worker", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"], stack_env
    )
    flow_run_id, output = it.run_deployment(stack_env, {"preset": "no-such-preset"}, timeout=240)
    flow_run = prefect_api(stack_env, f"/flow_runs/{flow_run_id}")
    assert flow_run["state"]["type"] == "FAILED", output[-3000:]
    assert "unknown preset 'no-such-preset'" in flow_run["state"]["message"] + output
    processes.stop("worker")
    done = subprocess.run(
        [str(BIN / "prefect"), "deployment", "delete", "pkdot/full-pipeline"],
        cwd=REPO, env=stack_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_served_full_pipeline_trains_and_registers_the_champion(
    it, stack_env, processes, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    prefect_api = it.prefect_api
    processes.start("serve", [it.PYTHON, "-m", "flows.serve"], stack_env)
    deployment = it.wait_for_deployment(stack_env, "pkdot/full-pipeline", 180, processes, served="serve")
    assert deployment["work_pool_name"] is None and "pkdot" in deployment["tags"]  # served: no pool

    run_dir = tmp_path / "run"
    params = {
        "preset": "demo",
        "dataset": "biovid",
        "losses": it.TINY_LOSSES,
        "folds": 1,
        "run_dir": str(run_dir),
        "overrides": it.TINY_OVERRIDES,
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

    # The flow run's artifacts: the evaluation summary and the link to its MLflow run.
    artifacts = prefect_api(
        stack_env, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    by_key = {a["key"]: a for a in artifacts}
    assert "pkdot-summary" in by_key and by_key["pkdot-summary"]["data"].strip()
    link = by_key["pkdot-mlflow-run"]["data"]
    assert stack_env["MLFLOW_TRACKING_URI"] in link

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

    # `pkdot predict` loads the champion from the server's registry and runs stage-1 face extraction on videos.
    videos = sorted((run_dir / "data").rglob("*.mp4"))[:2]
    assert videos, "the synthetic set has no videos"
    done = subprocess.run(
        [str(it.BIN / "pkdot"), "predict", "--model", "models:/pkdot-student-biovid@champion", *map(str, videos)],
        env=stack_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import json as _json

    rows = [_json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["video"] for r in rows] == [str(v) for v in videos]
    for r in rows:
        assert r["prediction"] in ("BL1", "PA4")
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-3
