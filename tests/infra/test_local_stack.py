"""infra/local_stack.py (process handling, fast) and flows/serve.py (argument parsing).

The servers themselves are started for real by tests/integration/.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_local_stack():
    spec = importlib.util.spec_from_file_location("pkdot_local_stack", REPO / "infra" / "local_stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ls = _load_local_stack()

#: A process that ignores SIGTERM (like a Prefect worker whose server is gone) and starts a child that does too.
STUBBORN = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
    print(child.pid, flush=True)
    time.sleep(300)
    """
)


def _alive(pid: int) -> bool:
    return ls._pid_alive(pid)


def test_terminate_escalates_to_sigint_and_stops_the_whole_group() -> None:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, start_new_session=True)
    child = int(proc.stdout.readline())
    try:
        t0 = time.monotonic()
        ls.terminate_process_group(proc.pid, "stubborn", timeout=1.0, marker="signal.SIG_IGN")
        assert not _alive(proc.pid)  # (terminate_process_group reaps its own children)
        assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the group's other member survived"
    finally:
        for pid in (proc.pid, child):
            if _alive(pid):
                os.kill(pid, 9)
        proc.stdout.close()


def test_terminate_leaves_a_pid_that_is_now_another_program_alone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        ls.terminate_process_group(proc.pid, "recycled", timeout=1.0, marker="mlflow server")
        time.sleep(0.3)
        assert proc.poll() is None, "a process whose command line does not match was signalled"
    finally:
        proc.kill()
        proc.wait()


def test_busy_default_port_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        monkeypatch.setitem(ls.DEFAULT_PORTS, "mlflow", port)
        stack = ls.LocalStack(tmp_path / "state")
        with pytest.raises(ls.StackError, match=f"port {port}"):
            stack.start(["mlflow"])
    assert stack.status() == {}


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mlflow"
    fake.write_text("#!/bin/sh\necho 'mlflow: backend store unreachable' >&2\nexit 3\n")
    fake.chmod(0o755)
    stack = ls.LocalStack(tmp_path / "state", free_ports=True, bin_dir=bin_dir)
    with pytest.raises(ls.StackError, match="backend store unreachable") as err:
        stack.start(["mlflow"], timeout=30)
    assert "mlflow.log" in str(err.value)
    assert stack.services() == {}  # nothing recorded as running


#: A stand-in for ``mlflow server``: imports for a second, then serves 200 on its ``--port``, or exits as
#: uvicorn/gunicorn do when the port is taken.
FAKE_MLFLOW = """#!{python}
import http.server, sys, time
time.sleep(1.0)
port = int(sys.argv[sys.argv.index("--port") + 1])
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"OK")
try:
    server = http.server.HTTPServer(("127.0.0.1", port), Ok)
except OSError as exc:
    print(f"[Errno 98] Address already in use: {{exc}}", file=sys.stderr)
    sys.exit(1)
server.serve_forever()
"""

#: What another program on a port picked as free answers: an HTTP 200 (another test's server) or a gRPC
#: server's HTTP/2 SETTINGS frame (another test's Ray), which urllib reports as BadStatusLine.
FOREIGN_REPLIES = {
    "http-200": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nOK",
    "grpc": b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x05\x00\x00\x40\x00\r\n",
}


@pytest.mark.parametrize("reply", sorted(FOREIGN_REPLIES))
def test_a_free_port_taken_by_another_program_before_the_server_binds_it_moves_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, reply: str
) -> None:
    caplog.set_level(logging.WARNING, logger=ls.logger.name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (fake := bin_dir / "mlflow").write_text(FAKE_MLFLOW.format(python=sys.executable))
    fake.chmod(0o755)
    foreign = socket.socket()
    foreign.bind(("127.0.0.1", 0))
    foreign.listen(8)
    foreign.settimeout(0.2)
    taken = foreign.getsockname()[1]
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                conn, _ = foreign.accept()
            except OSError:
                continue
            with conn:
                conn.recv(1024)
                conn.sendall(FOREIGN_REPLIES[reply])

    threading.Thread(target=answer, daemon=True).start()
    picks = iter([[taken]])  # the race: the first port handed out is the one another program took
    real = ls.free_ports
    monkeypatch.setattr(ls, "free_ports", lambda n, **kw: next(picks, None) or real(n, **kw))
    stack = ls.LocalStack(tmp_path / "state", free_ports=True, bin_dir=bin_dir)
    try:
        stack.start(["mlflow"], timeout=30)
        port = stack.ports()["mlflow"]
        assert port != taken
        assert ls._http_ok(f"http://127.0.0.1:{port}/health")
        assert f"port {taken} was taken by another program" in caplog.text
        assert f"starting it again on port {port}" in caplog.text
    finally:
        stack.stop()
        stop.set()
        foreign.close()


def test_unknown_service_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ls.StackError, match="unknown services"):
        ls.LocalStack(tmp_path).start(["postgres"])


def test_client_env_points_at_the_ports() -> None:
    env = ls.client_env({"prefect": 1, "mlflow": 2, "ray": 3})
    assert env == {
        "PREFECT_API_URL": "http://127.0.0.1:1/api",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:2",
        "RAY_ADDRESS": "127.0.0.1:3",
    }


def test_serve_parameters_parse_json_values() -> None:
    from flows.serve import parse_parameters
    from pkdot.errors import ConfigError

    params = parse_parameters(
        ["preset=demo", 'overrides={"synth.subjects": 4}', "folds=1", 'losses=["pkdot"]']
    )
    assert params == {"preset": "demo", "overrides": {"synth.subjects": 4}, "folds": 1, "losses": ["pkdot"]}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_parameters(["preset"])
