"""Issue 24, case 3: exhausted resources are named in one line, with the path and what to do, and never retried.

A real full disk: the extraction shards of a run directory go to a tmpfs mounted full (root only: the sandbox of
every developer and CI machine runs as root). The other resources are raised inside a stage's body.
"""

from __future__ import annotations

import dataclasses
import errno
import subprocess
from pathlib import Path

import pytest

from pkdot import pipeline
from pkdot.errors import ResourceError, resource_error
from pkdot.ray_utils import is_infrastructure_error
from tests.reliability.conftest import cli_args


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs, filled up; yields its mount point."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): the disk-full case needs root"
        )
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={mount / 'filler'}", "bs=4k"], capture_output=True)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_extract_is_one_line_naming_the_path(tiny_biovid, tmp_path, full_disk, capsys):
    from pkdot.cli import main

    run = tmp_path / "run"
    shards = run / "features" / "shards"
    shards.parent.mkdir(parents=True)
    shards.symlink_to(full_disk)  # the Ray tasks write their shards on the full disk
    assert main(cli_args(tiny_biovid, run)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pkdot extract: error:")]
    assert len(lines) == 1, err
    assert f"disk full writing {shards}/" in lines[0] and "(0 MB free now)" in lines[0]
    assert "Traceback" not in err and "\x1b[" not in err and "Ray infrastructure failure" not in err


@pytest.mark.parametrize(
    ("exc", "says"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/runs/r/features/x.parquet"),
            "disk full writing /runs/r",
        ),
        (MemoryError(), "out of memory: lower features.workers"),
        (
            OSError(errno.EMFILE, "Too many open files", "/runs/r/a"),
            "too many open files (at /runs/r/a): lower features.workers",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/runs/r/stages"),
            "permission denied: /runs/r/stages",
        ),
    ],
)
def test_resource_errors_in_a_stage_are_named_and_not_retried(tmp_path, monkeypatch, capsys, exc, says):
    from pkdot.config import load_config

    def exhausted(cfg, **options):
        raise RuntimeError("a Ray task failed") from exc  # as the scheduler's errors wrap their cause

    stages = tuple(
        dataclasses.replace(s, body=exhausted) if s.name == "manifest" else s for s in pipeline.STAGES
    )
    monkeypatch.setattr(pipeline, "STAGES", stages)
    cfg = load_config(overrides={"run_dir": str(tmp_path / "run")})
    with pytest.raises(ResourceError, match=says.replace("(", r"\(").replace(")", r"\)")) as raised:
        pipeline.run_stage("manifest", cfg)
    assert not is_infrastructure_error(raised.value)  # the flow does not retry it
    assert not is_infrastructure_error(exc)


def test_ordinary_io_errors_stay_infrastructure_errors() -> None:
    reset = ConnectionResetError(errno.ECONNRESET, "reset by peer")
    assert resource_error(reset) is None and is_infrastructure_error(reset)
