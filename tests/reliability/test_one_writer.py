"""Issue 24, case 1: one writer per run directory (:mod:`pkdot.pipeline.lock`).

A second ``pkdot`` command that would write to a run directory in use fails at once naming the holder (pid, host,
command, since when), or waits with ``--wait-lock``; a holder killed with SIGKILL leaves no stale lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pkdot.cli import main
from pkdot.config import load_config
from pkdot.pipeline.lock import RunDirBusy, run_dir_lock


def _hold(run_dir: Path, seconds: float = 600) -> subprocess.Popen:
    code = (
        "import time\n"
        "from pkdot.pipeline.lock import run_dir_lock\n"
        f"with run_dir_lock({str(run_dir)!r}, command='pkdot run --run-dir R'):\n"
        "    print('held', flush=True)\n"
        f"    time.sleep({seconds})\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(load_config(preset="demo", overrides={"run_dir": str(run)}).yaml_text())
    return run


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path, capsys):
    run = _run_dir(tmp_path)
    holder = _hold(run)
    try:
        t0 = time.monotonic()
        assert main(["cache", "--run", str(run)]) == 2
        assert time.monotonic() - t0 < 10
        err = capsys.readouterr().err
        assert (
            f"in use by pid {holder.pid} on " in err and "'pkdot run --run-dir R'" in err and "since" in err
        )
        assert "--wait-lock" in err
        assert not (run / "stages").exists()  # nothing was written
    finally:
        holder.kill()
        holder.wait()


def test_wait_lock_waits_for_the_holder(tmp_path, capsys):
    run = _run_dir(tmp_path)
    holder = _hold(run, seconds=2)
    t0 = time.monotonic()
    # once the holder is gone, the command runs (and fails for its own reason: no upstream stage yet)
    assert main(["cache", "--run", str(run), "--wait-lock"]) == 2
    assert time.monotonic() - t0 > 1
    err = capsys.readouterr().err
    assert "in use" not in err and "has not completed" in err
    holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    holder = _hold(run)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with run_dir_lock(run, command="next"):  # the kernel released the dead process's lock
        pass


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    run = tmp_path / "run"
    with run_dir_lock(run, command="outer"), run_dir_lock(run, command="inner (the flow under pkdot run)"):
        code = (
            "from pkdot.pipeline.lock import run_dir_lock, RunDirBusy\n"
            f"try:\n    run_dir_lock({str(run)!r}).__enter__()\nexcept RunDirBusy as e:\n    print(e)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert f"in use by pid {os.getpid()}" in out and "'outer'" in out
    with run_dir_lock(run):
        pass
    assert RunDirBusy.__mro__[1].__name__ == "StageError"
