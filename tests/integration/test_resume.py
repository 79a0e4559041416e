"""A flow killed during distillation resumes without redoing extraction and teacher training.

The flow runs the embedded way (``pkdot run``): in a subprocess, on Prefect's ephemeral API, a local Ray and a
SQLite MLflow store in the run directory. The process group is killed (SIGKILL, a crash) as soon as
``<run>/student/`` appears; the re-run must take extract, train-teacher and cache from Prefect's persisted cache
(files untouched) and finish distill and evaluate.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 900
RESULT_PREFIX = "PKDOT_FLOW_RESULT "
SCRIPT = (
    "import json, sys\n"
    "from flows.pipeline import pipeline\n"
    "result = pipeline(**json.loads(sys.argv[1]))\n"
    f"print({RESULT_PREFIX!r} + json.dumps(result), flush=True)\n"
)


def _snapshot(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_rerun_after_a_kill_during_distill_skips_extract_and_teacher(it, tmp_path: Path) -> None:
    env = it.base_env(tmp_path / "prefect-home")
    run_dir = tmp_path / "run"
    params = {
        "preset": "demo",
        "dataset": "biovid",
        "losses": it.TINY_LOSSES,
        "folds": 1,
        "run_dir": str(run_dir),
        # More student epochs than elsewhere, so the kill lands inside distillation.
        "overrides": {**it.TINY_OVERRIDES, "train.epochs_student": 4},
    }
    argv = [it.PYTHON, "-c", SCRIPT, json.dumps(params)]
    log = tmp_path / "first.log"
    with open(log, "wb") as fh:
        first = subprocess.Popen(
            argv, cwd=it.REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (run_dir / "student").exists():
            assert first.poll() is None, f"the flow ended before distillation:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "distillation did not start in time"
            time.sleep(0.2)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        gone_by = time.monotonic() + 10
        while not _group_gone(first.pid) and time.monotonic() < gone_by:
            time.sleep(0.2)
        assert _group_gone(first.pid), "processes of the killed flow run survived the kill"
    finally:
        if not _group_gone(first.pid):
            it.terminate_process_group(first.pid, "first flow run", timeout=5)
    assert not (run_dir / "report" / "report.md").exists(), "the first run finished before it was killed"
    features_before, teacher_before = _snapshot(run_dir / "features"), _snapshot(run_dir / "teacher")
    assert features_before and teacher_before

    second = subprocess.run(
        argv,
        cwd=it.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        start_new_session=True,
    )
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-6000:]
    line = next(ln for ln in second.stdout.splitlines() if ln.startswith(RESULT_PREFIX))
    stages = json.loads(line.removeprefix(RESULT_PREFIX))["stages"]
    for stage in ("extract", "train-teacher", "cache"):  # skipped by the library (Prefect caches nothing)
        assert stages[stage]["skipped"] is True, (stage, stages[stage])
    assert stages["distill"]["skipped"] is False and stages["evaluate"]["skipped"] is False
    assert _snapshot(run_dir / "features") == features_before, "extraction was redone"
    assert _snapshot(run_dir / "teacher") == teacher_before, "teacher training was redone"
    assert (run_dir / "report" / "report.md").is_file()
