"""Starting (or joining) Ray the same way everywhere in pkdot — on loopback unless opened on purpose.

Ray binds its listeners to the node IP and on Linux rewrites a requested ``127.0.0.1`` into the routable address
unless multi-node clusters are disabled (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``; Ray 2.60). Opening Ray to a
network is explicit (``PKDOT_RAY_NODE_IP``, ``RAY_NODE_IP``, ``--ray-node-ip``) and turns token authentication on."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

from pkdot.errors import ConfigError, InfrastructureError, PkdotError, resource_error

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: Ray's switch that keeps a node's listeners on the loopback address it was given (see the module docstring).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: Ray Train's controller poll interval on a private Ray (seconds; Ray's default is 2).
TRAIN_POLL_ENV, TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
#: Set to an address of this machine to open the embedded Ray to a network (token authentication on).
NODE_IP_ENV = "PKDOT_RAY_NODE_IP"
#: ``ray start`` options of the listeners :func:`loopback_head_args` puts on free ports.
PORT_FLAGS = (
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--ray-client-server-port",
)


def free_ports(n: int, host: str = LOOPBACK, *, exclude: Iterable[int] = ()) -> list[int]:
    """``n`` distinct TCP ports free on ``host`` right now, none in ``exclude`` (the OS picks them; every socket
    stays bound until all are picked, so the OS cannot hand out one port twice; Ray's fixed defaults collide
    between Rays, and Ray refuses a port given to two of its components)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    exclude = set(exclude)
    try:
        while len(ports) < n:
            held.append(s := socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            if (port := int(s.getsockname()[1])) not in exclude:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now."""
    return free_ports(1, host)[0]


def is_loopback(address: str) -> bool:
    """Whether an IP address (``127.0.0.0/8``, ``::1`` or IPv4-mapped loopback) is a loopback address."""
    host = address.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def loopback_env(node_ip: str = LOOPBACK) -> dict[str, str]:
    """Environment for a ``ray start --head`` process: loopback switch, or token auth for a network address."""
    return dict(LOOPBACK_ENV) if is_loopback(node_ip) else {"RAY_AUTH_MODE": "token"}


def loopback_head_args(
    node_ip: str = LOOPBACK, *, dashboard: bool = False, taken: Iterable[int] = ()
) -> list[str]:
    """``ray start --head`` arguments that put every listener on ``node_ip``, each on its own free port (Ray's
    fixed defaults 8265, 52365, 10001 collide with any other Ray on the machine). None takes a port of ``taken``:
    the caller's GCS port and those of servers not listening yet."""
    ports = free_ports(len(PORT_FLAGS) + 1, exclude=taken)
    args = ["--node-ip-address", node_ip]
    for flag, port in zip(PORT_FLAGS, ports[:-1], strict=True):
        args += [flag, str(port)]
    tail = ["--dashboard-host", node_ip, "--dashboard-port", str(ports[-1])] if dashboard else []
    return [*args, f"--include-dashboard={str(dashboard).lower()}", *tail]


_ORIGINAL_CLUSTER_FLAG: list[bool] = []
#: Called after every :func:`ensure_ray` (the CLI adds one that sends Ray's worker output to its log file).
_init_hooks: list[Callable[[], object]] = []


def add_init_hook(hook: Callable[[], object]) -> None:
    """Run ``hook()`` after every :func:`ensure_ray` (once, however often it is added)."""
    if hook not in _init_hooks:
        _init_hooks.append(hook)


def _set_loopback_only(on: bool) -> None:
    """Keep (or stop keeping) loopback addresses on loopback here and in the Ray processes this one spawns (Ray
    reads the switch at import time and when it canonicalises an address: both env and constant are set)."""
    import ray._private.ray_constants as ray_constants

    if not _ORIGINAL_CLUSTER_FLAG:
        _ORIGINAL_CLUSTER_FLAG.append(bool(ray_constants.ENABLE_RAY_CLUSTER))
    if on:
        os.environ.update(LOOPBACK_ENV)
        ray_constants.ENABLE_RAY_CLUSTER = False
    else:
        for k in LOOPBACK_ENV:
            os.environ.pop(k, None)
        ray_constants.ENABLE_RAY_CLUSTER = _ORIGINAL_CLUSTER_FLAG[0]


def running_local_cluster() -> str | None:
    """The address of a ``ray start`` cluster this machine's Ray would join by default, or None."""
    try:
        from ray._private.services import find_bootstrap_address

        return find_bootstrap_address(None) or None
    except Exception:  # noqa: BLE001 - Ray's discovery reads /tmp files; anything odd means "none found"
        return None


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> bool:
    """Initialise Ray unless it already is; return True when this call started it (the caller shuts it down).
    ``num_cpus``: CPUs of a private Ray (None = all). ``address``: a Ray cluster (``"auto"`` or ``host:port``); None
    = ``$RAY_ADDRESS`` if set, else a new private Ray on 127.0.0.1 unless ``$PKDOT_RAY_NODE_IP`` names another
    address (a ``ray start`` cluster on this machine is only joined when asked for). Usage statistics are off."""
    import ray

    if started := not ray.is_initialized():
        _init(ray, num_cpus, address)
    for hook in _init_hooks:
        hook()
    return started


def _init(ray: Any, num_cpus: int | None, address: str | None) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if target := address or os.environ.get("RAY_ADDRESS") or None:
        source = "ray_address" if address else "$RAY_ADDRESS"
        logger.warning("joining the Ray cluster at %s (as asked by %s)", target, source)
        joined = running_local_cluster() if target == "auto" else target
        # no host to keep on loopback for a Ray client URL
        host = joined.rsplit(":", 1)[0] if joined and "://" not in joined else None
        _set_loopback_only(host is not None and is_loopback(host))
        try:
            ray.init(address=target, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{source} {target!r}: cannot connect to a Ray cluster there ({exc})") from exc
        return
    if existing := running_local_cluster():
        logger.warning(
            "a Ray cluster is running on this machine (%s); starting a private Ray instead "
            "(pass --ray-address auto to use that cluster)",
            existing,
        )
    # One machine cannot be preempted from under itself: no watcher actor (a process) per Ray Train run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray Train's controller polls its workers every 2 s, so a finished run returned ~4 s late; at 0.25 s, 0.9 s
    # (measured by polling a one-report run on this private Ray; the polls are local calls, cheap on one machine).
    os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_S)
    node_ip = os.environ.get(NODE_IP_ENV) or LOOPBACK
    if loopback := is_loopback(node_ip):
        logger.info("starting a private Ray on %s (num_cpus=%s)", node_ip, num_cpus)
    else:
        msg = "starting a private Ray on %s (%s): reachable from that network, with Ray token authentication"
        logger.warning(msg, node_ip, NODE_IP_ENV)
        os.environ["RAY_AUTH_MODE"] = "token"
    _set_loopback_only(loopback)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        # The dashboard (ray[default]) also serves the State API that Ray Train's placement-group cleaner
        # polls; without it the cleaner floods the log. On the node IP, on a free port (8265 may be taken).
        include_dashboard=True,
        dashboard_host=node_ip,
        dashboard_port=free_port(),
        logging_level=logging.WARNING,
        _node_ip_address=node_ip,
    )
    if url := ray._private.worker.global_worker.node.address_info.get("webui_url"):
        logger.info("private Ray started; dashboard at http://%s", url)


#: Ray exceptions that mean the infrastructure failed (a process, node or store), not the task's input.
_RAY_INFRASTRUCTURE = (
    "LocalRayletDiedError WorkerCrashedError RayActorError RaySystemError ObjectStoreFullError OutOfDiskError "
    "OutOfMemoryError NodeDiedError ObjectLostError RpcError GetTimeoutError TaskPlacementGroupRemoved "
    "ActorPlacementGroupRemoved"
).split()


def is_infrastructure_error(exc: BaseException | None) -> bool:
    """Whether an exception is a transient infrastructure failure (worth retrying): ``InfrastructureError``,
    ``OSError``, Ray's worker/node deaths, OOM kills and object-store failures (also as a task error's cause); not
    other ``PkdotError`` (bad data stays bad), exhausted resources or any other exception (a bug stays a bug)."""
    if exc is None or resource_error(exc) is not None:  # a full disk or memory: a retry cannot fix it
        return False
    if isinstance(exc, PkdotError):
        return isinstance(exc, InfrastructureError)
    if isinstance(exc, OSError):
        return True
    import ray.exceptions as rex

    infra = tuple(getattr(rex, name) for name in _RAY_INFRASTRUCTURE if hasattr(rex, name))
    if isinstance(exc, infra):
        return True
    if isinstance(exc, rex.RayTaskError):  # the task raised: infrastructure only if what it raised is
        cause = getattr(exc, "cause", None)
        return cause is not exc and is_infrastructure_error(cause)
    return False


def main(argv: list[str] | None = None) -> int:
    """``python -m pkdot.ray_utils head-args|head-env NODE_IP [--dashboard] [--gcs-port P]`` (used by ``make ray-up``)."""
    parser = argparse.ArgumentParser(prog="python -m pkdot.ray_utils")
    parser.add_argument("what", choices=["head-args", "head-env"])
    parser.add_argument("node_ip", nargs="?", default=LOOPBACK)
    parser.add_argument("--dashboard", action="store_true")
    parser.add_argument("--gcs-port", type=int, help="the head's --port, which no listener takes")
    args = parser.parse_args(argv)
    if args.what == "head-args":
        taken = [args.gcs_port] if args.gcs_port else []
        print(" ".join(loopback_head_args(args.node_ip, dashboard=args.dashboard, taken=taken)))
    else:
        print(" ".join(f"{k}={v}" for k, v in loopback_env(args.node_ip).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
