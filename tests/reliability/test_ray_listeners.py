"""Cases 3 and 7 of issue 11: every Ray listener is on loopback, and a running cluster does not break pkdot.

Each of the three ways pkdot starts Ray — the embedded Ray of ``pkdot run`` / ``extract`` (:func:`ensure_ray`),
``make ray-up`` and ``infra/local_stack.py`` (``infra/local-stack.sh``) — is started in its own session; the
OS socket table (``ss -ltunp``) must then show listeners of that session's processes, none of them on a
non-loopback address. With a ``make ray-up`` cluster up and no ``--ray-address``, ``pkdot extract`` starts a
private Ray and says so, instead of dying with Ray's ``ValueError``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkdot.ray_utils import free_port
from tests.reliability.conftest import (
    PKDOT,
    REPO,
    cli_args,
    listeners,
    non_loopback,
    session_pids,
    terminate_session,
)

pytestmark = pytest.mark.integration

EMBEDDED = """
import time, ray
from pkdot.ray_utils import ensure_ray
ensure_ray(num_cpus=1)
assert ray.get(ray.remote(lambda: 1).remote()) == 1
print("READY", flush=True)
time.sleep(600)
"""


def _wait_for_listeners(sid: int, names: set[str], timeout: float = 120.0) -> list[tuple[str, str, str]]:
    """The session's listeners once processes named ``names`` (e.g. gcs_server, raylet) all listen."""
    deadline = time.monotonic() + timeout
    found: list[tuple[str, str, str]] = []
    while time.monotonic() < deadline:
        found = listeners(session_pids(sid))
        if names <= {name for _, _, name in found}:
            time.sleep(3)  # the agents start a moment later
            return listeners(session_pids(sid))
        time.sleep(0.5)
    raise AssertionError(f"Ray processes {names} not listening after {timeout}s; listeners: {found}")


def _short_tmp() -> str:
    return tempfile.mkdtemp(prefix="pkr-", dir="/tmp")  # Ray's socket paths must stay short


def test_embedded_ray_listens_on_loopback_only() -> None:
    env = dict(os.environ, RAY_TMPDIR=_short_tmp())
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", EMBEDDED],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "READY" in line, line + proc.stdout.read() if proc.poll() is not None else line
        found = _wait_for_listeners(proc.pid, {"gcs_server", "raylet"})
        assert len(found) >= 4, found  # GCS, raylet, agents, workers, dashboard: many listeners
        assert non_loopback(found) == [], found
    finally:
        terminate_session(proc.pid)


def test_local_stack_ray_head_listens_on_loopback_only(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "infra"))
    try:
        from local_stack import LocalStack
    finally:
        sys.path.remove(str(REPO / "infra"))
    stack = LocalStack(tmp_path / "stack", free_ports=True, ray_cpus=1, ray_dashboard=True)
    try:
        stack.start(["ray"], timeout=240)
        pid = stack.services()["ray"].pid
        found = _wait_for_listeners(pid, {"gcs_server", "raylet"})
        assert len(found) >= 4, found
        assert non_loopback(found) == [], found
    finally:
        stack.stop(timeout=20)


@pytest.fixture(scope="module")
def ray_up_cluster() -> Iterator[dict[str, str]]:
    """``make ray-up`` on free ports in a private Ray temp dir (so no other Ray on the machine sees it)."""
    env = dict(os.environ, RAY_TMPDIR=_short_tmp())
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "ray-up", f"RAY_PORT={port}", "RAY_CPUS=1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        yield {"sid": str(proc.pid), "RAY_TMPDIR": env["RAY_TMPDIR"], "port": str(port), "log": out}
    finally:
        terminate_session(proc.pid)


def test_make_ray_up_listens_on_loopback_only(ray_up_cluster: dict[str, str]) -> None:
    found = _wait_for_listeners(int(ray_up_cluster["sid"]), {"gcs_server", "raylet"})
    assert any(addr.endswith(f":{ray_up_cluster['port']}") for _, addr, _ in found), found  # the GCS
    assert len(found) >= 4, found
    assert non_loopback(found) == [], found


def test_extract_with_a_running_cluster_starts_a_private_ray(
    ray_up_cluster: dict[str, str], tiny_biovid: Path, tmp_path: Path
) -> None:
    env = dict(os.environ, RAY_TMPDIR=ray_up_cluster["RAY_TMPDIR"])
    env.pop("RAY_ADDRESS", None)
    run = tmp_path / "run"
    done = subprocess.run(
        [str(PKDOT), "-v", *cli_args(tiny_biovid, run, **{"features.workers": 2})],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ValueError" not in done.stderr, done.stderr[-3000:]
    assert "a Ray cluster is running on this machine" in done.stderr
    assert "starting a private Ray instead (pass --ray-address auto to use that cluster)" in done.stderr
    assert (run / "features" / "faces.parquet").is_file()
    assert session_pids(int(ray_up_cluster["sid"])), "the running cluster was left alone"


def test_extract_joins_the_running_cluster_when_asked(
    ray_up_cluster: dict[str, str], tiny_biovid: Path, tmp_path: Path
) -> None:
    """``ray_address=auto`` joins the ``make ray-up`` cluster on 127.0.0.1 (Ray would rewrite that address to
    the machine's external one, where nothing listens, without pkdot's loopback switch)."""
    env = dict(os.environ, RAY_TMPDIR=ray_up_cluster["RAY_TMPDIR"])
    env.pop("RAY_ADDRESS", None)
    run = tmp_path / "run"
    done = subprocess.run(
        [str(PKDOT), *cli_args(tiny_biovid, run, **{"features.workers": 2, "ray_address": "auto"})],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "joining the Ray cluster at auto (as asked by ray_address)" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert (run / "features" / "faces.parquet").is_file()
