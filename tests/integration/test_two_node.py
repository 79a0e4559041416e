"""Two Ray nodes on this machine: teacher and student jobs spread over both, a killed worker is resumed, and
the metrics equal those of the same jobs trained one after another in one process, without Ray.

The cluster is Ray's own test helper (``ray.cluster_utils.Cluster``): a head and a second node with 1 CPU
each, every listener on 127.0.0.1, ports chosen free (a fixed dashboard/metrics port collides with another
Ray on the machine). ``pkdot train-teacher`` / ``pkdot distill`` join it with ``--ray-address``; where the jobs
ran is read back from Ray's State API (node ids: the two nodes share an IP, so ranks/IPs would not tell).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.conftest import registered_metrics

# Part of CI (about 2.6 min on a quiet 2-core machine). The kill waits for Ray Train's controller to have
# *registered* a student-phase checkpoint (its checkpoint_manager_snapshot.json): killing as soon as a checkpoint
# folder appeared on disk raced the controller's poll, and the restarted worker group got the T-Net phase's
# checkpoint, so the student phase rightly restarted from epoch 1 and no resume was recorded.
pytestmark = [pytest.mark.integration]

#: Tiny synthetic run: 2 folds x 1 seed (2 teacher jobs, 2 student jobs: one per node at a time); no dropout, so a job resumed
#: from an epoch checkpoint replays exactly what an uninterrupted one does.
OVERRIDES = {
    "synth.subjects": 4,
    "synth.samples_per_class": 2,
    "synth.frame_size": 64,
    "synth.fps": 25,  # at 64 px the demo's 10 fps left one subject's 4 sampled frames without a detectable face
    "features.n_frames": 4,
    "features.crop_size": 32,
    "features.workers": 1,
    "train.folds": 2,
    "train.seeds": [0],
    "train.epochs_unimodal": 1,
    "train.epochs_teacher": 1,
    "train.epochs_tnet": 1,
    "train.epochs_student": 6,
    "train.num_workers": 1,
    "train.jobs_per_run": 1,  # one Ray Train run per job, so jobs can land on both nodes (demo bundles 8)
    "train.max_failures": 2,
    "train.checkpoint_every_s": 0,
    "model.dropout": 0.0,
    "tracking.log_checkpoints": False,
    "distill.losses": ["none"],
    "train.refit": False,  # about spreading jobs over nodes; the refit stage is tested in servers/test_deployment.py
}
STEP_TIMEOUT_S = 600
#: The reference: the same three stages in one process with every job trained right there (the functions each
#: Ray Train worker calls, on one torch thread as a worker has): no Ray at all, so the cluster's run (placement
#: on two nodes, a worker killed and resumed) must reproduce plain sequential training, job by job.
REFERENCE = (
    "import sys\n"
    "from pathlib import Path\n"
    "import torch\n"
    "from pkdot import pipeline\n"
    "from pkdot.config import load_config\n"
    "from pkdot.train import ray_runner\n"
    "from tests.train.conftest import jobs_here\n"
    "torch.set_num_threads(1)\n"
    "ray_runner.run_jobs_on_ray = jobs_here\n"
    "run = Path(sys.argv[1])\n"
    "cfg = load_config(run / 'config.yaml', overrides={'run_dir': str(run)})\n"
    "for name in ('train-teacher', 'cache', 'distill'):\n"
    "    pipeline.run_stage(name, cfg)\n"
)


def _checked(it, env: dict[str, str], argv: list[str], what: str) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=it.REPO, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    assert done.returncode == 0, f"{what} failed:\n{(done.stdout + done.stderr)[-6000:]}"
    return done


def _pkdot(it, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return _checked(it, env, [str(it.BIN / "pkdot"), *args], f"pkdot {' '.join(args)}")


def _metrics(run_dir: Path) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(run_dir)): json.loads(p.read_text())
        for sub in ("teacher", "student")
        for p in sorted((run_dir / sub).rglob("metrics.json"))
    }


def _resumed_jobs(run_dir: Path) -> dict[str, dict[str, list[int]]]:
    """Per student job folder, the phases that were resumed from a checkpoint and after which epochs."""
    found = {}
    for path in sorted((run_dir / "student").rglob("history.json")):
        phases = json.loads(path.read_text()).get("phases", {})
        resumed = {k: v.get("resumed_from") for k, v in phases.items() if v.get("resumed_from")}
        if resumed:
            found[str(path.parent.relative_to(run_dir))] = resumed
    return found


@pytest.fixture
def two_nodes(monkeypatch):
    """A head and a second node (1 CPU each) on 127.0.0.1; yields (cluster, dashboard address, node ids)."""
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster

    from pkdot.ray_utils import free_ports

    metrics, dashboard, agent, metrics2 = free_ports(4)  # distinct: Ray refuses one port for two components
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Cluster() records its address as "the latest cluster" (/tmp/ray/ray_current_cluster), where any
    # `ray.init()` on this machine would join it: put back what was there.
    address_file = Path(get_ray_address_file(None))
    previous = address_file.read_text() if address_file.is_file() else None
    common = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "metrics_export_port": 0}
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **common,
                "metrics_export_port": metrics,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard,
                "dashboard_agent_listen_port": agent,
            },
        )
        cluster.add_node(**common | {"metrics_export_port": metrics2})
        cluster.wait_for_nodes()
    finally:
        if previous is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(previous)
    try:
        head_id = cluster.head_node.node_id
        second_id = next(iter(cluster.worker_nodes)).node_id
        yield cluster, f"http://{cluster.webui_url}", head_id, second_id
    finally:
        cluster.shutdown()


def test_jobs_spread_over_two_nodes_survive_a_killed_worker_and_match_one_process(it, tmp_path, two_nodes):
    import psutil
    from ray.util.state import list_actors, list_tasks

    cluster, dashboard, head_id, second_id = two_nodes
    env = it.base_env(tmp_path / "prefect-home")
    sets = [a for k, v in OVERRIDES.items() for a in ("--set", f"{k}={json.dumps(v)}")]

    base = tmp_path / "base"
    _pkdot(it, env, "extract", "--preset", "demo", "--dataset", "biovid", "--out", str(base), *sets)
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(base, one, symlinks=True)
    shutil.copytree(base, two, symlinks=True)

    # -- the reference: the three stages and their jobs in one process, no Ray
    _checked(it, env, [str(it.PYTHON), "-c", REFERENCE, str(one)], "the in-process reference")

    # -- the cluster: teacher jobs, one per node at a time (1 CPU each)
    _pkdot(it, env, "train-teacher", "--run", str(two), "--ray-address", cluster.address)
    workers = list_actors(
        address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000
    )
    assert {a.node_id for a in workers} == {head_id, second_id}, "teacher jobs did not run on both nodes"
    checks = list_tasks(address=dashboard, filters=[("name", "=", "pkdot:check-run-dir")], limit=1000)
    assert {t.node_id for t in checks} == {head_id, second_id}, (
        "the run directory was not checked on each node"
    )
    _pkdot(it, env, "cache", "--run", str(two))

    # -- students, with the training worker on the second node killed once it has a checkpoint
    log = tmp_path / "distill.log"
    with open(log, "wb") as out:
        distill = subprocess.Popen(
            [str(it.BIN / "pkdot"), "distill", "--run", str(two), "--ray-address", cluster.address],
            cwd=it.REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    killed = None
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while killed is None and distill.poll() is None and time.monotonic() < deadline:
            alive = list_actors(
                address=dashboard,
                filters=[
                    ("class_name", "=", "RayTrainWorker"),
                    ("state", "=", "ALIVE"),
                    ("node_id", "=", second_id),
                ],
                detail=True,
            )
            for actor in alive:
                try:
                    run_name = Path(psutil.Process(actor.pid).cwd()).name  # Ray Train's per-run working dir
                except (psutil.Error, ValueError):
                    continue
                # Kill once Ray Train's controller has *registered* a checkpoint of the student phase
                # (`student-<loss>`): a checkpoint folder on disk is not enough -- the controller registers a
                # report when it next polls the worker, so a worker killed in between restarts from the
                # previous registered checkpoint (the one-epoch T-Net phase's, already finished), and the
                # student phase would rightly start again from epoch 1. The controller's snapshot file is
                # what it hands to the restarted worker group.
                if str(registered_metrics(two, "student", run_name).get("phase", "")).startswith("student-"):
                    os.kill(actor.pid, signal.SIGKILL)
                    killed = run_name
                    break
            time.sleep(0.3)
        distill.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if distill.poll() is None:
            distill.kill()
            distill.wait()
    output = log.read_text(errors="replace")
    assert distill.returncode == 0, output[-6000:]
    assert killed is not None, f"no student worker on the second node was caught mid-job:\n{output[-3000:]}"
    # the killed job resumed from its checkpoint (Ray Train restarted its worker group) and finished
    job_dir = "student/" + killed.removeprefix("student-").replace("-fold-", "/fold-").replace(
        "-seed-", "/seed-"
    )
    assert job_dir in _resumed_jobs(two), (killed, _resumed_jobs(two), output[-3000:])
    students = list_actors(
        address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000
    )
    assert len(students) > len(workers) and {a.node_id for a in students[len(workers) :]} <= {
        head_id,
        second_id,
    }

    # -- same seeds, same data: the same metrics, job by job, as in one process
    reference, spread = _metrics(one), _metrics(two)
    assert len(reference) == 2 + 2, sorted(reference)
    assert spread == reference
