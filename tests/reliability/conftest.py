"""Shared pieces of the reliability tests: a tiny synthetic Biovid set, its config, and the OS socket table.

Every test here breaks something the way real data or a real machine breaks it (issue 11) and asserts the exact
outcome: the error names the file / line / field and the command to re-run, or the sample is quarantined with
its reason, and what earlier stages wrote is intact.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pkdot.config import RunConfig, load_config

for _k, _v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MPLBACKEND": "Agg",
}.items():
    os.environ.setdefault(_k, _v)

REPO = Path(__file__).resolve().parents[2]
PKDOT = Path(sys.executable).parent / "pkdot"

#: Small features: 4 frames of 32 px, one sample per shard (so "which shards were redone" is exact).
TINY = {
    "features.n_frames": 4,
    "features.crop_size": 32,
    "features.detect_width": 96,
    "features.shard_size": 1,
    "features.workers": 1,
    "train.folds": 3,
    "train.student_init": "teacher-frozen",  # students from the cache: fast (finetune: test_student_init)
    "train.jobs_per_run": "auto",
}


def tiny_overrides(root: Path, run_dir: Path, **extra: object) -> dict[str, object]:
    return {**TINY, "data.root": str(root), "run_dir": str(run_dir), **extra}


def tiny_cfg(root: Path, run_dir: Path, **extra: object) -> RunConfig:
    """A prepared run config over ``root`` (binary Biovid task: 2 classes x 3 subjects = 6 samples)."""
    from pkdot.pipeline import prepare_run

    return prepare_run(load_config(preset="demo", overrides=tiny_overrides(root, run_dir, **extra)))


def cli_args(root: Path, run_dir: Path, **extra: object) -> list[str]:
    """``pkdot extract`` arguments for the tiny set."""
    args = ["extract", "--root", str(root), "--out", str(run_dir)]
    for k, v in {**TINY, **extra}.items():
        args += ["--set", f"{k}={v}"]
    return args


@pytest.fixture(scope="session")
def tiny_biovid_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pkdot.data.synthetic import write_synthetic

    return write_synthetic(
        "biovid",
        tmp_path_factory.mktemp("tiny_biovid"),
        subjects=3,
        samples_per_class=1,
        frame_size=96,
        seed=1,
        progress=False,
    )


@pytest.fixture
def tiny_biovid(tiny_biovid_master: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny set (tests break its files)."""
    return Path(shutil.copytree(tiny_biovid_master, tmp_path / "data"))


def extract(cfg: RunConfig):
    """``pkdot extract``'s two stages in this process (manifest, then extract); returns the extract result."""
    from pkdot.pipeline import run_stage

    return run_stage("extract", cfg, run_stage("manifest", cfg).fingerprint)


# ---- processes and sockets -----------------------------------------------------------------------------------
def session_pids(sid: int) -> set[int]:
    """Every live process of session ``sid`` (a process started with ``start_new_session`` and its children)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            pids.add(int(entry))
    return pids


def listeners(pids: set[int]) -> list[tuple[str, str, str]]:
    """``(protocol, local address:port, process name)`` of every TCP/UDP listener of ``pids`` (``ss -ltnup``)."""
    out = subprocess.run(
        ["ss", "-H", "-l", "-t", "-u", "-n", "-p"], capture_output=True, text=True, check=True
    )
    found = []
    for line in out.stdout.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            parts = line.split()
            names = re.findall(r'\(\("([^"]+)"', line)
            found.append((parts[0], parts[4], names[0] if names else "?"))
    return found


def non_loopback(found: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    from pkdot.ray_utils import is_loopback

    return [f for f in found if not is_loopback(f[1].rsplit(":", 1)[0].split("%")[0])]


def terminate_session(sid: int) -> None:
    """SIGTERM then SIGKILL every process of a session this test started (by PID, never by name). 3 s of grace:
    Ray's gcs_server and dashboard outlive a SIGTERM by 15 s and more, and these sessions are only torn down."""
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        pids = session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and session_pids(sid):
            time.sleep(0.2)
            for pid in pids:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if not session_pids(sid):
            return


def parent_run_status(run_dir: Path) -> str:
    import json

    from mlflow.tracking import MlflowClient

    doc = json.loads((Path(run_dir) / "mlflow_parent.json").read_text())
    return MlflowClient(tracking_uri=doc["tracking_uri"]).get_run(doc["run_id"]).info.status
