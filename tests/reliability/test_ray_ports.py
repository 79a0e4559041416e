"""Ray's pre-selected ports are distinct: Ray refuses to start when two of its components get one port
(CI's stop 28 failed on ``dashboard_agent_grpc`` drawing the GCS port a moment after it was released)."""

from __future__ import annotations

import socket

from pkdot import ray_utils


class _ReusingSocket:
    """A socket whose OS hands out the ports of ``script`` in turn (a real OS reuses a released port too)."""

    script: list[int] = []

    def __init__(self, *_: object) -> None:
        self.port = 0

    def bind(self, _: tuple[str, int]) -> None:
        self.port = _ReusingSocket.script.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        pass


def test_free_ports_skips_excluded_ports(monkeypatch) -> None:
    monkeypatch.setattr(ray_utils.socket, "socket", _ReusingSocket)
    _ReusingSocket.script = [5000, 5001, 5000, 5002]
    assert ray_utils.free_ports(2, exclude=[5000]) == [5001, 5002]


def test_free_ports_holds_every_socket_until_all_are_picked() -> None:
    ports = ray_utils.free_ports(64)
    assert len(set(ports)) == 64
    with socket.socket() as s:  # released afterwards: each one can be bound again
        s.bind(("127.0.0.1", ports[0]))


def test_head_args_give_every_listener_its_own_port_and_leave_the_gcs_port(monkeypatch) -> None:
    monkeypatch.setattr(ray_utils.socket, "socket", _ReusingSocket)
    _ReusingSocket.script = [6379, *range(7000, 7010)]
    args = ray_utils.loopback_head_args(dashboard=True, gcs_port=6379)
    flags = [*ray_utils.PORT_FLAGS, "--dashboard-port"]
    ports = [int(args[args.index(flag) + 1]) for flag in flags]
    assert ports == list(range(7000, 7006))
    assert args[args.index("--dashboard-host") + 1] == "127.0.0.1"
