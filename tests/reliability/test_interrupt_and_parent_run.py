"""Cases 4 and 5 of issue 11: Ctrl-C prints one line and exits 130; the MLflow parent run never stays RUNNING.

- ``pkdot extract`` alone ends its parent run FINISHED;
- a command that fails ends it FAILED;
- Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-stage ends it KILLED, prints
  ``interrupted; the run directory is consistent, re-run to resume`` and no traceback, and leaves only complete
  shard files; the re-run resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pkdot import cli
from tests.reliability.conftest import PKDOT, REPO, cli_args, parent_run_status


def test_extract_alone_finishes_its_parent_run_and_a_failure_marks_it_failed(
    tiny_biovid: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert cli.main(cli_args(tiny_biovid, run)) == 0
    assert parent_run_status(run) == "FINISHED"

    for video in (tiny_biovid / "video").rglob("*.mp4"):  # the next extract fails: no sample left
        video.write_bytes(b"")
    assert cli.main(cli_args(tiny_biovid, run)) == 2
    assert parent_run_status(run) == "FAILED"
    assert cli.main(["train-teacher", "--run", str(run)]) == 2  # refused: extract did not complete
    assert parent_run_status(run) == "FAILED"


@pytest.fixture
def interruptible_biovid(tmp_path: Path) -> Path:
    """A set large enough (90 one-sample shards per modality) that its extraction is still running when the
    signal lands: on a fast machine the 15-sample set was done before Ctrl-C arrived (exit 0)."""
    from pkdot.data.synthetic import write_synthetic

    return write_synthetic(
        "biovid", tmp_path / "data", subjects=6, samples_per_class=3, frame_size=96, seed=1, progress=False
    )


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_mid_stage_one_line_exit_130_parent_killed_and_resumable(
    interruptible_biovid: Path, tmp_path: Path
) -> None:
    tiny_biovid = interruptible_biovid
    run = tmp_path / "run"
    assert cli.main(cli_args(tiny_biovid, run)) == 0  # a parent run exists (FINISHED)
    again = cli_args(tiny_biovid, run, **{"features.crop_size": 40})  # new settings: every shard again
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [str(PKDOT), *again],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A foreground command's Ctrl-C: a test run started in the background by a non-interactive shell
        # (`cmd &`) inherits SIGINT ignored, and Python keeps an inherited SIG_IGN, so restore the default.
        preexec_fn=_sigint_default,
    )
    marker = run / "stages" / "extract.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:  # mid-stage: the marker is pending
            if "pending:" in marker.read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1] == (
        "pkdot extract: interrupted; the run directory is consistent, re-run to resume"
    )
    assert parent_run_status(run) == "KILLED"
    assert "fingerprint" not in json.loads(marker.read_text())  # nothing downstream takes the half run
    for shard in (run / "features" / "shards").glob("*/shard-*.parquet"):  # only complete shard files
        pq.read_table(shard)

    assert cli.main(again) == 0  # the re-run resumes and completes
    assert parent_run_status(run) == "FINISHED"
    assert "fingerprint" in json.loads(marker.read_text())
