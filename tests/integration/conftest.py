"""Real servers for the integration tests under ``servers/``: a Prefect server, an MLflow server and a Ray head on
127.0.0.1 (the other modules here need no server; tests/conftest.py sends ``servers/`` to one xdist worker).

They are started by ``infra/local_stack.py`` (the code behind ``infra/local-stack.sh``) on free ports, with their
stores in a temporary directory, and stopped by PID at the end of the session. Credentials are on (``--auth``):
MLflow's basic-auth app and Prefect's auth string, with secrets drawn for the session (:data:`SECRETS`) and set in
this process's environment, as ``.env`` sets them for a team; every client (pkdot, Prefect, MLflow) reads them
from there. Processes a test starts itself
(``python -m flows.serve``, ``prefect worker``) go through :class:`Processes`, which stops them before the
servers: workers first, then the stack.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(sys.executable).parent

#: A tiny demo run: 4 synthetic subjects, one fold, one epoch per phase, two losses (a baseline and PKDOT).
TINY_OVERRIDES: dict[str, Any] = {
    "synth.subjects": 4,
    "synth.samples_per_class": 2,
    "train.folds": 2,
    "train.epochs_unimodal": 1,
    "train.epochs_teacher": 1,
    "train.epochs_tnet": 1,
    "train.epochs_student": 1,
    # Ray Train's local mode, as the demo preset: no worker group to start per run. The worker-group path
    # (checkpoints, a killed worker resumed, several nodes): tests/train/test_ray_runner.py, test_two_node.py.
    "train.num_workers": 0,
    "features.workers": 1,
    # These tests are about the servers, the flow and resumption, not the student's init: the paper's frozen
    # init (students from the embedding cache) keeps them fast (teacher-finetune: tests/train/test_student_init.py).
    "train.student_init": "teacher-frozen",
    # Both students in one Ray Train run (bundling: tests/train/test_bundles.py).
    "train.jobs_per_run": 2,
    # The refit stage (one more teacher + student job) is tested where the champion is checked:
    # servers/test_deployment.py turns it back on.
    "train.refit": False,
}
TINY_LOSSES = ["none", "pkdot"]


def _load_local_stack():
    spec = importlib.util.spec_from_file_location("pkdot_local_stack", REPO / "infra" / "local_stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


local_stack_module = _load_local_stack()


def base_env(prefect_home: Path) -> dict[str, str]:
    """Environment of every client process: telemetry off, its own PREFECT_HOME, fast polling, no server URLs."""
    env = dict(os.environ)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PREFECT_PROFILES_PATH"):
        env.pop(key, None)
    env.update(local_stack_module.TELEMETRY_OFF)
    env.update(
        {
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "MPLBACKEND": "Agg",
            "PYTHONUNBUFFERED": "1",
            # The repository on sys.path: `flows` and `pkdot` import from the working tree.
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        }
    )
    return env


class Processes:
    """Background processes started by a test, each in its own session, stopped by PID (newest first)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen]] = []
        self._logs: dict[int, Any] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.started.append((name, proc))
        self._logs[proc.pid] = log
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def stop(self, name: str | None = None) -> None:
        for entry in reversed(list(self.started)):
            label, proc = entry
            if name is not None and label != name:
                continue
            local_stack_module.terminate_process_group(proc.pid, label, timeout=20)
            self._logs.pop(proc.pid).close()
            self.started.remove(entry)


#: The session's credentials (random): the tests check that none of them ever reaches MLflow or a log.
SECRETS: dict[str, str] = {
    "MLFLOW_TRACKING_USERNAME": "pkdot-admin",
    "MLFLOW_TRACKING_PASSWORD": f"mlflow-{secrets.token_urlsafe(16)}",
    "PREFECT_API_AUTH_STRING": f"pkdot:prefect-{secrets.token_urlsafe(16)}",
}


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    saved = {k: os.environ.get(k) for k in SECRETS}
    os.environ.update(SECRETS)
    stack = local_stack_module.LocalStack(
        tmp_path_factory.mktemp("stack"), free_ports=True, ray_cpus=2, auth=True
    )
    try:
        stack.start(timeout=240)
        yield stack
    finally:
        stack.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()  # workers and served deployments before the servers (session fixture ends later)


@pytest.fixture
def stack_env(local_stack: Any, tmp_path: Path) -> dict[str, str]:
    env = base_env(tmp_path / "prefect-home")
    env.update(local_stack.env())
    return env


# ---- Prefect REST helpers -------------------------------------------------------------------------------------
def prefect_api(env: dict[str, str], path: str, body: dict | None = None) -> Any:
    url = env["PREFECT_API_URL"].rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    auth = env.get("PREFECT_API_AUTH_STRING")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def wait_for_deployment(
    env: dict[str, str], name: str, timeout: float, procs: Processes, served: str
) -> dict:
    """Poll until ``flow/deployment`` exists as a served deployment (no work pool) while ``served`` is alive."""
    deadline = time.monotonic() + timeout
    flow, deployment = name.split("/")
    while time.monotonic() < deadline:
        try:
            found = prefect_api(env, f"/deployments/name/{flow}/{deployment}")
            if found["work_pool_name"] is None:  # (one left by `prefect deploy` has a pool)
                return found
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        for label, proc in procs.started:
            if label == served and proc.poll() is not None:
                pytest.fail(f"{served} exited with {proc.returncode}:\n{procs.log(served)[-4000:]}")
        time.sleep(1)
    pytest.fail(f"deployment {name} did not appear within {timeout:.0f}s:\n{procs.log(served)[-4000:]}")


def flow_run_id_from(output: str) -> str:
    for line in output.splitlines():
        if "UUID:" in line:
            return line.split("UUID:", 1)[1].strip()
    raise AssertionError(f"no flow run UUID in the output:\n{output[-3000:]}")


def run_deployment(env: dict[str, str], params: dict[str, Any], timeout: int) -> tuple[str, str]:
    """``prefect deployment run pkdot/full-pipeline --watch`` with ``--param`` per parameter; (flow run id, output)."""
    argv = [
        str(BIN / "prefect"),
        "deployment",
        "run",
        "pkdot/full-pipeline",
        "--watch",
        "--watch-timeout",
        str(timeout),
    ]
    for key, value in params.items():
        argv += ["--param", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout + 60)
    output = done.stdout + done.stderr
    return flow_run_id_from(output), output


@pytest.fixture(scope="session")
def it() -> Any:
    """This file's helpers and constants for the test modules (conftest is not importable under importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        REPO=REPO,
        BIN=BIN,
        PYTHON=PYTHON,
        TINY_OVERRIDES=TINY_OVERRIDES,
        TINY_LOSSES=TINY_LOSSES,
        SECRETS=SECRETS,
        local_stack=local_stack_module,
        base_env=base_env,
        prefect_api=prefect_api,
        run_deployment=run_deployment,
        wait_for_deployment=wait_for_deployment,
        terminate_process_group=local_stack_module.terminate_process_group,
    )
