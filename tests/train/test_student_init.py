"""train.student_init: every mode builds and trains one epoch; which backbone weights move, and which stay."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pkdot.config import RunConfig, load_config
from pkdot.errors import ConfigError
from pkdot.folds import load_fold_plan
from pkdot.models import build_backbone
from pkdot.rundir import RunDir
from pkdot.train.cache import build_cache
from pkdot.train.data import load_samples, write_run_folds
from pkdot.train.jobs import student_jobs, teacher_jobs
from pkdot.train.student import build_student_for_job
from tests.train.conftest import make_tiny_run, run_jobs_local

ONE_EPOCH = {"train": {"epochs_unimodal": 1, "epochs_teacher": 1, "epochs_tnet": 1, "epochs_student": 1}}


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> RunConfig:
    """A tiny run with a trained fold-0/seed-0 teacher and its embedding cache (shared by the modes)."""
    cfg = make_tiny_run(tmp_path_factory.mktemp("init") / "run", overrides=ONE_EPOCH)
    plan = write_run_folds(cfg)
    run_jobs_local(cfg, "teacher", teacher_jobs(cfg, plan))
    build_cache(cfg, load_samples(cfg, Path(cfg.run_dir)), 0, 0)
    return cfg


def _mode_run(cfg: RunConfig, tmp_path: Path, mode: str, **model: object) -> RunConfig:
    """A copy of the teacher run (teacher + cache) whose students use ``train.student_init = mode``."""
    run_dir = tmp_path / mode
    shutil.copytree(cfg.run_dir, run_dir, ignore=shutil.ignore_patterns("student"))
    dump = cfg.model_dump(mode="json")
    dump["run_dir"] = str(run_dir)
    dump["train"]["student_init"] = mode
    dump["model"].update({k: str(v) for k, v in model.items()})
    return RunConfig.model_validate(dump)


def _backbone(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _train_student(cfg: RunConfig) -> dict[str, torch.Tensor]:
    job = student_jobs(cfg, load_fold_plan(Path(cfg.run_dir) / "splits.json"), ["kd"])[0]
    run_jobs_local(cfg, "student", [job])
    saved = torch.load(Path(job.out_dir) / "student.pt", weights_only=True)
    assert saved["student_init"] == cfg.train.student_init
    return _backbone(saved["state_dict"], "video_backbone.")


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys() and a
    return [k for k in a if not torch.equal(a[k], b[k])]


def _teacher_backbone(cfg: RunConfig) -> dict[str, torch.Tensor]:
    saved = torch.load(RunDir(cfg.run_dir).teacher(0, 0) / "teacher.pt", weights_only=True)
    return _backbone(saved["state_dict"], "backbones.video.")


def test_teacher_frozen_keeps_and_finetune_moves_the_teacher_backbone(teacher_run, tmp_path):
    frozen = _mode_run(teacher_run, tmp_path, "teacher-frozen")
    assert _changed(_teacher_backbone(frozen), _train_student(frozen)) == []  # weights and BN statistics
    finetune = _mode_run(teacher_run, tmp_path, "teacher-finetune")
    start = build_student_for_job(finetune, 0, 0)[0]
    assert not _changed(_teacher_backbone(finetune), _backbone(start.state_dict(), "video_backbone."))
    assert all(p.requires_grad for p in start.video_backbone.parameters())
    assert _changed(_teacher_backbone(finetune), _train_student(finetune))


def test_scratch_starts_fresh_and_trains(teacher_run, tmp_path):
    scratch = _mode_run(teacher_run, tmp_path, "scratch")
    start = _backbone(build_student_for_job(scratch, 0, 0)[0].state_dict(), "video_backbone.")
    again = _backbone(build_student_for_job(scratch, 0, 0)[0].state_dict(), "video_backbone.")
    assert _changed(start, again) == []  # seeded by the job: deterministic
    assert _changed(_teacher_backbone(scratch), start)  # not the teacher's
    assert _changed(start, _train_student(scratch))


def test_pretrained_loads_the_given_weights(teacher_run, tmp_path):
    shape = load_samples(teacher_run, Path(teacher_run.run_dir), modalities=["video"]).input_shapes["video"]
    weights = build_backbone("video", shape, teacher_run.model, seed=123).state_dict()
    path = tmp_path / "video.pt"
    torch.save(weights, path)
    cfg = _mode_run(teacher_run, tmp_path, "pretrained", pretrained_video=path)
    start = _backbone(build_student_for_job(cfg, 0, 0)[0].state_dict(), "video_backbone.")
    assert _changed(weights, start) == []
    assert _changed(_teacher_backbone(cfg), start)
    assert _changed(weights, _train_student(cfg))


def test_student_init_config():
    with pytest.raises(ConfigError, match="model.pretrained_video"):
        load_config(overrides={"train.student_init": "pretrained"})
    with pytest.raises(ConfigError, match="student_init"):
        load_config(overrides={"train.student_init": "imagenet"})
    # the former flag maps onto the new setting
    assert (
        load_config(overrides={"train.freeze_student_backbone": False}).train.student_init
        == "teacher-finetune"
    )
    assert (
        load_config(overrides={"train.freeze_student_backbone": True}).train.student_init == "teacher-frozen"
    )
    # the presets take the cell the quality benchmark's validation scores picked; the bare default is the paper's
    assert load_config().train.student_init == "teacher-finetune"
    assert load_config(preset="paper").train.student_init == "teacher-finetune"
    assert RunConfig().train.student_init == "teacher-frozen"
    with pytest.raises(ConfigError, match="contradict"):
        load_config(overrides={"train.freeze_student_backbone": True, "train.student_init": "scratch"})
