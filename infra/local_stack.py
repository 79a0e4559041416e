"""Start the team stack's servers natively on 127.0.0.1, without Docker: Prefect, MLflow and a Ray head.

The same servers as ``docker-compose.yml``, with local stores: Prefect on SQLite, MLflow on SQLite with
``--artifacts-destination DIR --serve-artifacts``, a Ray head with ``--num-cpus N`` and no dashboard (unless
``--ray-dashboard``). Used by ``infra/local-stack.sh`` and by the integration tests' fixtures.

Every server runs in its own session (process group), is recorded with its PID in ``<state>/stack.json``, and
is stopped by PID only: SIGTERM to its process group, SIGINT if it lingers, SIGKILL as the last resort. A PID
is only signalled while its command line still is the one we started (a recycled PID is left alone).

Command line::

    python infra/local_stack.py start [--state DIR] [--free-ports] [--services prefect,mlflow,ray] [--auth]
    python infra/local_stack.py status [--state DIR]
    python infra/local_stack.py stop [--state DIR]
    eval "$(python infra/local_stack.py env)"      # PREFECT_API_URL, MLFLOW_TRACKING_URI, RAY_ADDRESS

Credentials (``--auth``, and always when Ray is opened with ``--ray-node-ip``): MLflow runs its basic-auth app
(``mlflow server --app-name basic-auth``) with the admin user ``$MLFLOW_TRACKING_USERNAME`` /
``$MLFLOW_TRACKING_PASSWORD``, and Prefect requires ``$PREFECT_API_AUTH_STRING`` (``user:password``, the server's
``PREFECT_SERVER_API_AUTH_STRING``). pkdot's clients, Prefect's and MLflow's read the same variables, which come
from the environment (``.env``) only: they are never written to the printed ``env`` lines, logs or state file.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pkdot.ray_utils import free_ports, loopback_env, loopback_head_args

logger = logging.getLogger(__name__)

SERVICES: tuple[str, ...] = ("prefect", "mlflow", "ray")
#: The ports of docker-compose.yml, used unless ``free_ports`` is asked for.
DEFAULT_PORTS: dict[str, int] = {"prefect": 4200, "mlflow": 5000, "ray": 6379, "ray-dashboard": 8265}
STATE_FILE = "stack.json"

#: Telemetry and usage statistics off for every server and client (see the project's ecosystem notes).
TELEMETRY_OFF: dict[str, str] = {
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


#: What the servers' credentials are read from (the environment: ``.env``).
CREDENTIAL_VARS: tuple[str, ...] = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_API_AUTH_STRING",
)


class StackError(RuntimeError):
    """A local server could not be started, checked or stopped (the message names it and its log)."""


class PortTaken(StackError):
    """A server exited during start-up because another program took its port after it was picked as free."""


@dataclass
class ServiceProcess:
    """One server we started: its PID (= its process group), port, URL and log file."""

    name: str
    pid: int
    port: int
    url: str
    log: str
    marker: str  # a token of its command line, checked before signalling the PID


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _is_ours(pid: int, marker: str) -> bool:
    """Whether a recorded server's PID is alive and still runs the command we started."""
    return _pid_alive(pid) and marker in _cmdline(pid)


def _http_ok(url: str, timeout: float = 3.0, user_password: str | None = None) -> bool:
    request = urllib.request.Request(url)
    if user_password:
        request.add_header("Authorization", "Basic " + base64.b64encode(user_password.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return False  # not (yet) our HTTP server: e.g. another program's gRPC on a port picked as free


def _listening_inodes(port: int) -> set[str]:
    """``socket:[inode]`` of every TCP socket listening on ``port`` (any address), from ``/proc/net/tcp*``."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for f in (row.split() for row in rows):
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.add(f"socket:[{f[9]}]")
    return found


def _session_listens(sid: int, port: int) -> bool:
    """Whether a process of session ``sid`` (a server we started with its own session) listens on ``port``.

    A health check alone cannot tell: between picking a free port and binding it, another program (another
    test's Ray or Prefect) may take the port and answer.
    """
    inodes = _listening_inodes(port)
    for proc in Path("/proc").iterdir() if inodes else ():
        try:
            if (
                not proc.name.isdigit()
                or int((proc / "stat").read_text().rsplit(") ", 1)[1].split()[3]) != sid
            ):
                continue
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return True
        except (OSError, ValueError, IndexError):
            continue  # a process that exited meanwhile, or one we may not inspect
    return False


def _tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():
        try:
            return stat.read_text().split(") ", 1)[1][0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def client_env(ports: dict[str, int]) -> dict[str, str]:
    """Environment variables that point clients (flows, CLIs, tests) at the servers on ``ports``."""
    env: dict[str, str] = {}
    if "prefect" in ports:
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{ports['prefect']}/api"
    if "mlflow" in ports:
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{ports['mlflow']}"
    if "ray" in ports:
        env["RAY_ADDRESS"] = f"127.0.0.1:{ports['ray']}"
    return env


def terminate_process_group(pid: int, name: str, timeout: float = 30.0, marker: str | None = None) -> None:
    """Stop a process we started in its own session: SIGTERM, then SIGINT, then SIGKILL, to its group only.

    Parameters
    ----------
    pid : int
        The PID returned when it was started with ``start_new_session=True`` (so its process group id).
    name : str
        For messages.
    timeout : float
        Seconds to wait after SIGTERM and again after SIGINT.
    marker : str, optional
        A token its command line must contain; when the PID now belongs to another program it is left alone.
    """
    if not _pid_alive(pid):
        return
    if marker is not None and marker not in _cmdline(pid):
        logger.warning(
            "%s: PID %d is now another program (%r); not signalling it", name, pid, _cmdline(pid)[:80]
        )
        return
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGINT, timeout / 2), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError as exc:
            raise StackError(f"{name}: not allowed to signal process group {pid}: {exc}") from exc
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap(pid)
            if not _pid_alive(pid):
                _signal_group_rest(pid)
                return
            time.sleep(0.2)
        logger.warning("%s (PID %d) still running after %s; escalating", name, pid, signal.Signals(sig).name)
    raise StackError(f"{name}: PID {pid} survived SIGKILL")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal_group_rest(pgid: int) -> None:
    """After the group leader exited, SIGTERM whatever is left in its group (children it did not stop)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return


class LocalStack:
    """Prefect server, MLflow server and Ray head as local processes, recorded under ``state_dir``.

    Parameters
    ----------
    state_dir : Path
        Holds ``stack.json`` (PIDs, ports), the servers' stores (``prefect-home/``, ``mlflow/``) and logs.
    free_ports : bool
        Pick free ports (tests) instead of the compose ports 4200 / 5000 / 6379.
    ray_cpus : int
        ``--num-cpus`` of the Ray head.
    ray_dashboard : bool
        Start Ray's dashboard (needs ``ray[default]``) on 8265 (or a free port).
    ray_node_ip : str
        The address every Ray listener binds to: ``127.0.0.1`` (default). Another address of this machine
        opens the Ray head to that network, with Ray's token authentication on (``RAY_AUTH_MODE=token``):
        anyone who can reach an open Ray without it can run code as you.
    bin_dir : Path, optional
        Where the ``prefect``, ``mlflow`` and ``ray`` executables are (default: next to this Python).
    auth : bool
        Credentials on MLflow and Prefect (see the module docstring); forced on when Ray is opened.
    """

    def __init__(
        self,
        state_dir: str | Path,
        *,
        free_ports: bool = False,
        ray_cpus: int = 2,
        ray_dashboard: bool = False,
        bin_dir: str | Path | None = None,
        ray_node_ip: str = "127.0.0.1",
        auth: bool = False,
    ) -> None:
        self.ray_node_ip = ray_node_ip
        self.auth = auth or not ipaddress.ip_address(ray_node_ip).is_loopback
        self.state_dir = Path(state_dir).resolve()
        self.free_ports = free_ports
        self.ray_cpus = ray_cpus
        self.ray_dashboard = ray_dashboard
        self.bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent

    # ---- state -------------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE

    def _load(self) -> dict:
        if not self.state_file.is_file():
            return {"services": {}}
        try:
            return json.loads(self.state_file.read_text())
        except json.JSONDecodeError as exc:
            raise StackError(
                f"{self.state_file} is not valid JSON ({exc}); remove it after stopping by hand"
            ) from exc

    def _save(self, state: dict) -> None:
        from pkdot.rundir import atomic_write_json

        atomic_write_json(self.state_file, state)

    def services(self) -> dict[str, ServiceProcess]:
        return {k: ServiceProcess(**v) for k, v in self._load()["services"].items()}

    def ports(self) -> dict[str, int]:
        return {k: s.port for k, s in self.services().items()}

    def env(self) -> dict[str, str]:
        """Client environment for the running servers (see :func:`client_env`)."""
        return client_env(self.ports())

    # ---- start -------------------------------------------------------------------------------------------
    def _exe(self, name: str) -> str:
        path = self.bin_dir / name
        if not path.is_file():
            found = shutil.which(name)
            if found is None:
                raise StackError(
                    f"executable {name!r} not found in {self.bin_dir} nor on PATH (pip install -e .)"
                )
            return found
        return str(path)

    def _ports(self, names: Sequence[str]) -> dict[str, int]:
        """A port per service: all picked at once, so no two servers (none listening yet) share one."""
        if self.free_ports:
            return dict(zip(names, free_ports(len(names)), strict=True))
        for name in names:
            if not port_is_free(DEFAULT_PORTS[name]):
                raise StackError(
                    f"{name}: port {DEFAULT_PORTS[name]} on 127.0.0.1 is in use (stop that server or use --free-ports)"
                )
        return {name: DEFAULT_PORTS[name] for name in names}

    def credentials(self) -> dict[str, str]:
        """The credentials from the environment; :class:`StackError` naming what is missing."""
        missing = [k for k in CREDENTIAL_VARS if not os.environ.get(k)]
        if missing:
            raise StackError(
                f"credentials are on but {', '.join(missing)} not set: put them in .env (see .env.example); "
                "no default password is ever used"
            )
        if ":" not in os.environ["PREFECT_API_AUTH_STRING"]:
            raise StackError("PREFECT_API_AUTH_STRING must be 'user:password'")
        return {k: os.environ[k] for k in CREDENTIAL_VARS}

    def _mlflow_auth_config(self, store: Path) -> Path:
        """The basic-auth app's configuration (admin user from the environment), readable by us only."""
        creds = self.credentials()
        path = store / "basic_auth.ini"
        text = (
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{store / 'basic_auth.db'}\n"
            f"admin_username = {creds['MLFLOW_TRACKING_USERNAME']}\n"
            f"admin_password = {creds['MLFLOW_TRACKING_PASSWORD']}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        return path

    def _server_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(TELEMETRY_OFF)
        for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
            env.pop(key, None)
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], marker: str) -> tuple[int, Path]:
        log = self.state_dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.state_dir,
                start_new_session=True,
            )
        logger.info("%s: started PID %d: %s", name, proc.pid, " ".join(argv))
        return proc.pid, log

    def _wait_healthy(self, svc: ServiceProcess, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(svc.pid):
                _reap(svc.pid)
                tail = _tail(Path(svc.log))
                if _listening_inodes(svc.port) or "already in use" in tail.lower():
                    raise PortTaken(
                        f"{svc.name}: port {svc.port} was taken by another program; see {svc.log}"
                    )
                raise StackError(f"{svc.name} exited during start-up; see {svc.log}:\n{tail}")
            if self._healthy(svc) and _session_listens(svc.pid, svc.port):
                return
            time.sleep(0.5)
        raise StackError(
            f"{svc.name} not healthy after {timeout:.0f}s; see {svc.log}:\n{_tail(Path(svc.log))}"
        )

    def _healthy(self, svc: ServiceProcess) -> bool:
        if svc.name == "prefect":
            creds = self.credentials()["PREFECT_API_AUTH_STRING"] if self.auth else None
            return _http_ok(f"{svc.url}/health", user_password=creds)
        if svc.name == "mlflow":
            if not self.auth:
                return _http_ok(f"{svc.url}/health")
            creds = self.credentials()
            user = f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds['MLFLOW_TRACKING_PASSWORD']}"
            return _http_ok(f"{svc.url}/api/2.0/mlflow/experiments/search?max_results=1", user_password=user)
        if svc.name == "ray":
            host = svc.url.rsplit(":", 1)[0] or "127.0.0.1"
            if not _tcp_open(svc.port, host):
                return False
            from pkdot.ray_utils import loopback_env

            # A client must keep 127.0.0.1 as it is too (Ray resolves it to the external address otherwise).
            done = subprocess.run(
                [self._exe("ray"), "health-check", "--address", svc.url],
                capture_output=True,
                env=dict(self._server_env(), **loopback_env(self.ray_node_ip)),
                timeout=60,
            )
            return done.returncode == 0
        raise StackError(f"unknown service {svc.name!r}")

    def start(self, services: Iterable[str] = SERVICES, timeout: float = 180.0) -> dict[str, str]:
        """Start the servers not yet running; returns the client environment (:meth:`env`)."""
        wanted = list(services)
        unknown = sorted(set(wanted) - set(SERVICES))
        if unknown:
            raise StackError(f"unknown services {unknown} (expected some of {list(SERVICES)})")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = self._load()
        env = self._server_env()
        started: list[ServiceProcess] = []
        try:
            running = [
                n for n in wanted if (old := state["services"].get(n)) and _is_ours(old["pid"], old["marker"])
            ]
            for name in running:
                logger.info("%s already running (PID %d)", name, state["services"][name]["pid"])
            ports = self._ports([n for n in wanted if n not in running])
            for name, port in ports.items():
                svc = self._start_one(name, env, port, taken=ports.values())
                state["services"][name] = asdict(svc)
                self._save(state)
                started.append(svc)
            for i in range(len(started)):
                self._wait_healthy_or_move(started, i, env, ports, state, timeout)
        except BaseException:
            for svc in reversed(started):
                terminate_process_group(svc.pid, svc.name, timeout=15, marker=svc.marker)
                state["services"].pop(svc.name, None)
            self._save(state)
            raise
        return self.env()

    def _wait_healthy_or_move(
        self,
        started: list[ServiceProcess],
        i: int,
        env: dict,
        ports: dict[str, int],
        state: dict,
        timeout: float,
    ) -> None:
        """Wait for ``started[i]``; with free ports, start it again on another port if its port was taken (3 tries;
        ``started[i]`` is always the process to stop on failure)."""
        tries = 3
        while True:
            svc = started[i]
            try:
                self._wait_healthy(svc, timeout)
                return
            except PortTaken as exc:
                tries -= 1
                if not self.free_ports or tries == 0:
                    raise
                ports[svc.name] = free_ports(1, exclude=ports.values())[0]
                logger.warning("%s; starting it again on port %d", exc, ports[svc.name])
                started[i] = self._start_one(svc.name, env, ports[svc.name], taken=ports.values())
                state["services"][svc.name] = asdict(started[i])
                self._save(state)

    def _start_one(self, name: str, env: dict[str, str], port: int, taken: Iterable[int]) -> ServiceProcess:
        """Start service ``name`` on ``port``; ``taken``: the ports the other new servers will listen on."""
        if name == "prefect":
            home = self.state_dir / "prefect-home"
            home.mkdir(parents=True, exist_ok=True)
            penv = dict(env, PREFECT_HOME=str(home))
            if self.auth:
                penv["PREFECT_SERVER_API_AUTH_STRING"] = self.credentials()["PREFECT_API_AUTH_STRING"]
            argv = [self._exe("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
            pid, log = self._spawn(name, argv, penv, marker="prefect")
            return ServiceProcess(name, pid, port, f"http://127.0.0.1:{port}/api", str(log), "prefect")
        if name == "mlflow":
            store = self.state_dir / "mlflow"
            (store / "artifacts").mkdir(parents=True, exist_ok=True)
            argv = [
                self._exe("mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{store / 'mlflow.db'}",
                "--artifacts-destination",
                str(store / "artifacts"),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ]
            menv = dict(env)
            if self.auth:
                argv += ["--app-name", "basic-auth"]
                menv["MLFLOW_AUTH_CONFIG_PATH"] = str(self._mlflow_auth_config(store))
                menv["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
            pid, log = self._spawn(name, argv, menv, marker="mlflow")
            return ServiceProcess(name, pid, port, f"http://127.0.0.1:{port}", str(log), "mlflow")
        if name == "ray":
            # Ray's session directory holds Unix sockets, whose paths must stay short: keep it under /tmp.
            temp_dir = tempfile.mkdtemp(prefix="pkdot-ray-", dir="/tmp")
            (self.state_dir / "ray-temp-dir").write_text(temp_dir)
            # Every listener (GCS, raylet, agents, metrics, client server, dashboard) on the node IP, which is
            # 127.0.0.1 unless --ray-node-ip opens it (then with Ray's token authentication), on free ports.
            argv = [
                self._exe("ray"),
                "start",
                "--head",
                "--port",
                str(port),
                "--num-cpus",
                str(self.ray_cpus),
                "--temp-dir",
                temp_dir,
                "--disable-usage-stats",
                "--block",
                *loopback_head_args(self.ray_node_ip, dashboard=self.ray_dashboard, taken=taken),
            ]
            if self.ray_dashboard and not self.free_ports:
                dash_at = argv.index("--dashboard-port") + 1
                if port_is_free(DEFAULT_PORTS["ray-dashboard"]):
                    argv[dash_at] = str(DEFAULT_PORTS["ray-dashboard"])
            # A local head has nothing to drain for: stop at once on SIGTERM instead of after 30 s.
            renv = dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", **loopback_env(self.ray_node_ip))
            if "RAY_AUTH_MODE" in loopback_env(self.ray_node_ip):
                logger.warning(
                    "ray: listening on %s (reachable from that network); Ray token authentication is on: "
                    "clients need the token (~/.ray/auth_token or $RAY_AUTH_TOKEN)",
                    self.ray_node_ip,
                )
            pid, log = self._spawn(name, argv, renv, marker="ray")
            return ServiceProcess(name, pid, port, f"{self.ray_node_ip}:{port}", str(log), "ray")
        raise StackError(f"unknown service {name!r}")

    # ---- status / stop -----------------------------------------------------------------------------------
    def status(self) -> dict[str, dict]:
        """``{service: {"pid", "port", "url", "running", "healthy", "log"}}`` for the recorded servers."""
        out: dict[str, dict] = {}
        for name, svc in self.services().items():
            running = _is_ours(svc.pid, svc.marker)
            out[name] = {
                "pid": svc.pid,
                "port": svc.port,
                "url": svc.url,
                "running": running,
                "healthy": bool(running and self._healthy(svc)),
                "log": svc.log,
            }
        return out

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every recorded server, in reverse start order (Ray, then MLflow, then Prefect)."""
        state = self._load()
        for name in reversed(SERVICES):
            raw = state["services"].get(name)
            if raw is None:
                continue
            svc = ServiceProcess(**raw)
            terminate_process_group(svc.pid, name, timeout=timeout, marker=svc.marker)
            state["services"].pop(name)
            self._save(state)
            logger.info("%s (PID %d) stopped", name, svc.pid)
        temp_file = self.state_dir / "ray-temp-dir"
        if temp_file.is_file():
            shutil.rmtree(temp_file.read_text().strip(), ignore_errors=True)
            temp_file.unlink()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local-stack", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument(
        "--state",
        default=os.environ.get("PKDOT_STACK_DIR", ".local-stack"),
        help="state directory (default: $PKDOT_STACK_DIR or .local-stack)",
    )
    parser.add_argument("--free-ports", action="store_true", help="pick free ports instead of 4200/5000/6379")
    parser.add_argument("--services", default=",".join(SERVICES), help="comma list (default: %(default)s)")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--ray-dashboard", action="store_true", help="also start Ray's dashboard (8265)")
    parser.add_argument(
        "--auth",
        action="store_true",
        help="credentials on MLflow (basic-auth app) and Prefect (auth string), from $MLFLOW_TRACKING_USERNAME, "
        "$MLFLOW_TRACKING_PASSWORD and $PREFECT_API_AUTH_STRING (always on when --ray-node-ip opens Ray)",
    )
    parser.add_argument(
        "--ray-node-ip",
        default="127.0.0.1",
        help="address every Ray listener binds to (default 127.0.0.1); another one opens Ray to that "
        "network, with Ray's token authentication on",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    stack = LocalStack(
        args.state,
        free_ports=args.free_ports,
        ray_cpus=args.ray_cpus,
        ray_dashboard=args.ray_dashboard,
        ray_node_ip=args.ray_node_ip,
        auth=args.auth,
    )
    try:
        if args.command == "start":
            env = stack.start([s.strip() for s in args.services.split(",") if s.strip()])
            for k, v in sorted(env.items()):
                print(f"export {k}={v}")
        elif args.command == "env":
            for k, v in sorted(stack.env().items()):
                print(f"export {k}={v}")
        elif args.command == "status":
            status = stack.status()
            print(json.dumps(status, indent=1))
            return 0 if status and all(s["healthy"] for s in status.values()) else 1
        else:
            stack.stop()
    except StackError as exc:
        print(f"local-stack {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
