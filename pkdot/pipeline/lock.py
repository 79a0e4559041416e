"""One writer per run directory: ``fcntl.flock`` on ``RUN/run.lock`` (released by the kernel when the holder
dies: a crash never leaves a stale lock). The holder writes who it is into the file; a second writer is refused
with that line (or waits). Re-entrant within a process. On NFS Linux maps ``flock`` to server-held POSIX locks,
so nodes exclude each other; where ``flock`` fails (some FUSE mounts) pkdot says so."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pkdot.errors import StageError
from pkdot.rundir import RunDir

#: Locks held by this process: path -> (file descriptor, depth).
_HELD: dict[Path, list[int]] = {}


class RunDirBusy(StageError):
    """Another process writes to this run directory."""


def holder_of(path: Path) -> str:
    """The holder line recorded in a lock file, for messages."""
    try:
        doc = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    return f"pid {doc.get('pid')} on {doc.get('host')} ({doc.get('command')!r}, since {doc.get('since')})"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path, *, command: str | None = None, wait: bool = False) -> Iterator[Path]:
    """Hold the run directory's lock for the block; raise :class:`RunDirBusy` naming the holder when another
    process holds it (``wait=True``: block until it is released)."""
    path = RunDir(run_dir).lock.resolve()
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield path
        finally:
            _HELD[path][1] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RunDirBusy(
                f"{Path(run_dir)} is in use by {holder_of(path)}: wait for it to finish, or pass --wait-lock "
                f"(lock file {path})"
            ) from None
        except OSError as exc:
            raise StageError(f"cannot lock {path} ({exc}): this file system does not support locks") from exc
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or " ".join(["pkdot", *sys.argv[1:]]),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _HELD[path] = [fd, 1]
        try:
            yield path
        finally:
            del _HELD[path]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the lock
