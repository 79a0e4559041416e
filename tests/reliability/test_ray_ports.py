"""Every port pkdot picks for servers that are not listening yet is distinct: Ray refuses to start when two of
its components get one port (CI's stop 28 failed on ``dashboard_agent_grpc`` drawing the GCS port a moment after
it was released), and two servers of the local stack cannot share one either.

The OS here is a fake that hands out the lowest port not bound right now, as a real OS may reuse a released one.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from pkdot import ray_utils
from tests.infra.test_local_stack import ls


class _LowestFreeSocket:
    bound: set[int] = set()

    def __init__(self, *_: object) -> None:
        self.port: int | None = None

    def bind(self, _: tuple[str, int]) -> None:
        self.port = min(set(range(7000, 8000)) - _LowestFreeSocket.bound)
        _LowestFreeSocket.bound.add(self.port)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        _LowestFreeSocket.bound.discard(self.port)


def _fake_os(monkeypatch) -> None:
    _LowestFreeSocket.bound = set()
    monkeypatch.setattr(ray_utils.socket, "socket", _LowestFreeSocket)


def test_free_ports_are_distinct_and_skip_excluded_ports(monkeypatch) -> None:
    _fake_os(monkeypatch)
    assert ray_utils.free_ports(3, exclude=[7001]) == [7000, 7002, 7003]
    assert _LowestFreeSocket.bound == set()  # all released


def test_free_ports_on_the_real_os_can_be_bound_afterwards() -> None:
    ports = ray_utils.free_ports(16)
    assert len(set(ports)) == 16
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))


def test_head_args_give_every_listener_its_own_port_and_none_of_the_taken_ones(monkeypatch) -> None:
    _fake_os(monkeypatch)
    args = ray_utils.loopback_head_args(dashboard=True, taken=[7000, 7002])
    ports = [int(args[args.index(flag) + 1]) for flag in [*ray_utils.PORT_FLAGS, "--dashboard-port"]]
    assert ports == [7001, 7003, 7004, 7005, 7006, 7007]


def test_local_stack_servers_and_ray_listeners_all_get_distinct_ports(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ls.SERVICES:
        (bin_dir / name).write_text("#!/bin/sh\nexit 3\n")
        (bin_dir / name).chmod(0o755)
    stack = ls.LocalStack(tmp_path / "state", free_ports=True, bin_dir=bin_dir)
    argvs: dict[str, list[str]] = {}
    spawn = stack._spawn

    def record(name: str, argv: list[str], env: dict[str, str], marker: str):
        # the command line as the stack built it; the process dies at start (the stack stops the others then,
        # so the servers cannot write their command lines themselves: under load they were killed first)
        argvs[name] = argv
        return spawn(name, [str(bin_dir / name)], env, marker)

    monkeypatch.setattr(stack, "_spawn", record)
    _fake_os(monkeypatch)
    try:
        stack.start(list(ls.SERVICES), timeout=30)
    except ls.StackError:
        pass
    monkeypatch.undo()
    assert set(argvs) == set(ls.SERVICES)
    ports = [int(p) for name in ls.SERVICES for p in re.findall(r"-port (\d+)", " ".join(argvs[name]))]
    assert len(ports) == 2 + 1 + len(ray_utils.PORT_FLAGS)
    assert len(set(ports)) == len(ports), ports
