"""Issue 24 item 5: a checkpoint in a run directory is never unpickled.

A pickle whose ``__reduce__`` creates a file is planted as a teacher / student / phase / Ray Train job
checkpoint; every loader refuses it with a :class:`PkdotError` naming the file, and the file is never created.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from pkdot.config import RunConfig
from pkdot.errors import PkdotError
from pkdot.rundir import RunDir
from pkdot.train.jobs import load_checkpoint
from pkdot.train.ray_runner import resume_state
from pkdot.train.student import load_trained_student
from pkdot.train.teacher import load_teacher, load_unimodal


class SideEffect:
    """Unpickling this creates ``marker`` (what an attacker's payload would do, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path, how: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {"w": torch.zeros(2)}, "fit": SideEffect(marker)}
    if how == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path


def _refused(load, path: Path, marker: Path) -> None:
    with pytest.raises(PkdotError, match="not a state_dict") as info:
        load()
    assert str(path) in str(info.value)
    assert not marker.exists(), "the pickle was executed"


@pytest.fixture
def cfg(tmp_path: Path) -> RunConfig:
    return RunConfig.model_validate({"run_dir": str(tmp_path / "run")})


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_teacher_and_phase_checkpoints_are_not_unpickled(cfg, tmp_path, how):
    job_dir = RunDir(cfg.run_dir).teacher(0, 0)
    marker = tmp_path / f"pwned-{how}"
    path = _plant(job_dir / "teacher.pt", marker, how)
    _refused(lambda: load_teacher(cfg, job_dir), path, marker)
    path = _plant(job_dir / "unimodal-physio.pt", marker, how)
    _refused(lambda: load_unimodal(cfg, job_dir, "physio"), path, marker)


def test_student_checkpoint_is_not_unpickled(cfg, tmp_path):
    marker = tmp_path / "pwned"
    path = _plant(RunDir(cfg.run_dir).student("kd", 0, 0) / "student.pt", marker, "torch")
    _refused(lambda: load_trained_student(cfg, "kd", 0, 0), path, marker)


def test_ray_train_job_checkpoint_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint_000001"
    path = _plant(ckpt / "state.pt", marker, "torch")
    (ckpt / "meta.json").write_text(
        json.dumps(
            {
                "job": "teacher/fold-0/seed-0",
                "dir": "/run/teacher/fold-0/seed-0",
                "phase": "teacher",
                "token": "t",
            }
        )
    )
    _refused(lambda: resume_state(ckpt, {"/run/teacher/fold-0/seed-0": "t"}), path, marker)


def test_plain_checkpoints_still_load(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "fit": {"history": [{"epoch": 1, "loss": 0.5}]}}, path)
    assert load_checkpoint(path)["fit"]["history"][0]["epoch"] == 1
