"""train.precision: bf16 autocast trains on CPU, the losses stay in float32, the config refuses other values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pkdot.config import load_config
from pkdot.distill.pkdot import pkdot_loss
from pkdot.errors import ConfigError
from pkdot.rundir import HISTORY, METRICS
from pkdot.train.cache import build_cache
from pkdot.train.data import load_samples, write_run_folds
from pkdot.train.jobs import student_jobs, teacher_jobs
from pkdot.train.loops import Amp, task_loss
from tests.train.conftest import make_tiny_run, run_jobs_local

#: bf16 keeps 8 mantissa bits (relative rounding 2**-9 per value); the loss itself runs in float32
PKDOT_REL_TOL = 1e-2


@pytest.mark.parametrize("value", ["auto", "fp32", "bf16", "fp16"])
def test_config_accepts_the_four_precisions(value):
    assert load_config(overrides={"train.precision": value}).train.precision == value


def test_config_refuses_another_precision_naming_the_field():
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(overrides={"train.precision": "fp64"})


def test_auto_is_fp32_on_cpu_and_only_fp16_scales_gradients():
    assert Amp.of("auto", "cpu").dtype is None and Amp.of("auto", "cpu").name == "fp32"
    assert Amp.of("bf16", "cpu").dtype is torch.bfloat16
    assert [Amp.of(p, "cpu").scaler().is_enabled() for p in ("fp32", "bf16", "fp16")] == [False, False, True]
    with Amp.of("bf16", "cpu").autocast():
        assert torch.nn.Linear(4, 2)(torch.ones(3, 4)).dtype is torch.bfloat16
        assert task_loss(torch.ones(3, 2, dtype=torch.bfloat16), torch.zeros(3), False).dtype is torch.float32


def test_pkdot_loss_on_bf16_autocast_inputs_matches_fp32():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(32, 24, generator=gen), torch.randn(24, 16, generator=gen, requires_grad=True)
    teacher = torch.randn(32, 16, generator=gen)
    exact = pkdot_loss(x @ w, teacher, k=10)
    with Amp.of("bf16", "cpu").autocast():
        z = x @ w
        assert z.dtype is torch.bfloat16
        mixed = pkdot_loss(z, teacher, k=10)
    assert mixed.dtype is torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=PKDOT_REL_TOL)
    mixed.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_a_bf16_run_trains_teacher_and_student(tmp_path):
    cfg = make_tiny_run(
        tmp_path / "run",
        overrides={
            "train": {
                "precision": "bf16",
                "epochs_unimodal": 1,
                "epochs_teacher": 1,
                "epochs_tnet": 1,
                "epochs_student": 2,
            }
        },
    )
    plan = write_run_folds(cfg)
    run_jobs_local(cfg, "teacher", teacher_jobs(cfg, plan))
    build_cache(cfg, load_samples(cfg, Path(cfg.run_dir)), 0, 0)
    jobs = student_jobs(cfg, plan, ["pkdot"])
    run_jobs_local(cfg, "student", jobs)
    for job in [*teacher_jobs(cfg, plan), *jobs]:
        out = Path(job.out_dir)
        metrics = json.loads((out / METRICS).read_text())
        assert metrics and all(math.isfinite(v) for v in metrics.values()), job.key
        for phase in json.loads((out / HISTORY).read_text())["phases"].values():
            assert all(math.isfinite(e["train_loss"]) for e in phase["epochs"]), job.key
