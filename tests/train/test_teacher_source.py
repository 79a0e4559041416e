"""``distill.teacher_source = privileged``: the student imitates the privileged-only model's embedding and outputs
(full-fold and cross-fitted), the cache records and checks that model, and a cache of the other source is stale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pkdot.config import load_config
from pkdot.errors import ConfigError, StaleCacheError
from pkdot.rundir import RunDir, atomic_torch_save
from pkdot.train.cache import (
    build_cache,
    cache_is_fresh,
    cache_metadata,
    check_cache,
    read_cache,
)
from pkdot.train.data import load_samples, write_run_folds
from pkdot.train.jobs import student_jobs, teacher_jobs
from pkdot.train.teacher import load_teacher, load_unimodal
from tests.train.conftest import make_tiny_run, run_jobs_local
from tests.train.test_crossfit import CROSSFIT

PRIVILEGED = {
    "distill": {**CROSSFIT["distill"], "teacher_source": "privileged", "losses": ["kd"]},
    "train": CROSSFIT["train"],
}


def _outputs(model, samples, modality_inputs):
    with torch.no_grad():
        out = model(modality_inputs)
    return out.embedding.numpy(), out.logits.numpy()


def test_privileged_teacher_source_cache(tmp_path):
    cfg = make_tiny_run(tmp_path / "run", overrides=PRIVILEGED)
    run_dir = Path(cfg.run_dir)
    plan = write_run_folds(cfg)
    fold = plan.fold(0, 0)
    run_jobs_local(cfg, "teacher", teacher_jobs(cfg, plan))
    samples = load_samples(cfg, run_dir)
    path = build_cache(cfg, samples, 0, 0)
    meta = cache_metadata(path)
    assert meta["teacher_source"] == "privileged" and meta["privileged"] == "physio"
    assert "unimodal-physio_hash" in meta and all("unimodal-physio_hash" in g for g in meta["groups"])

    cached = read_cache(run_dir, 0, 0, samples.sample_ids, 2)
    groups = read_cache(run_dir, 0, 0, samples.sample_ids, 2, ("target_group",))["target_group"]
    physio = torch.from_numpy(samples.arrays["physio"])
    # validation/test rows: the full-fold physio-only model; training rows: the one trained without their group
    z, logits = _outputs(load_unimodal(cfg, RunDir(run_dir).teacher(0, 0), "physio"), samples, physio)
    outside = groups < 0
    assert outside.any() and (~outside).any()
    np.testing.assert_allclose(cached["teacher_embedding"][outside], z[outside], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cached["teacher_logits"][outside], logits[outside], rtol=1e-4, atol=1e-5)
    for j in range(len(fold.crossfit)):
        rows = groups == j
        zj, lj = _outputs(load_unimodal(cfg, RunDir(run_dir).teacher(0, 0, j, 2), "physio"), samples, physio)
        np.testing.assert_allclose(cached["teacher_embedding"][rows], zj[rows], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cached["teacher_logits"][rows], lj[rows], rtol=1e-4, atol=1e-5)
    # not the fusion teacher's targets; its video tokens still are the student's frozen input
    fusion, _, _ = load_teacher(cfg, RunDir(run_dir).teacher(0, 0))
    inputs = {m: torch.from_numpy(samples.arrays[m]) for m in cfg.data.modalities}
    with torch.no_grad():
        out = fusion(inputs)
    assert not np.allclose(cached["teacher_logits"][outside], out.logits.numpy()[outside], atol=1e-3)
    np.testing.assert_allclose(cached["video_tokens"], out.tokens["video"].numpy(), rtol=1e-4, atol=1e-5)

    # a student trains from it; a config asking for the fusion teacher's targets refuses this cache
    run_jobs_local(cfg, "student", student_jobs(cfg, plan, ["kd"]))
    assert check_cache(run_dir, 0, 0, 2, "privileged")["teacher_source"] == "privileged"
    with pytest.raises(StaleCacheError, match="'privileged' teacher's targets"):
        check_cache(run_dir, 0, 0, 2, "fusion")
    assert not cache_is_fresh(run_dir, 0, 0, 2, "fusion")
    # retraining the privileged model of a crossfit group makes the cache stale
    gpath = RunDir(run_dir).teacher(0, 0, 1, 2) / "unimodal-physio.pt"
    saved = torch.load(gpath, weights_only=True)
    saved["state_dict"] = {
        k: v + 0.01 if v.is_floating_point() else v for k, v in saved["state_dict"].items()
    }
    atomic_torch_save(saved, gpath)
    with pytest.raises(StaleCacheError, match="unimodal-physio"):
        check_cache(run_dir, 0, 0, 2, "privileged")


def test_privileged_teacher_source_needs_one_privileged_modality(tmp_path):
    with pytest.raises(ConfigError, match="teacher_source 'privileged'"):
        load_config(
            overrides={
                "run_dir": str(tmp_path),
                "data.dataset": "table",
                "data.task": "binary",
                "data.student_modalities": ["a"],
                "data.privileged_modalities": ["b", "c"],
                "distill.teacher_source": "privileged",
            }
        )
    cfg = load_config(overrides={"run_dir": str(tmp_path)})
    assert cfg.distill.teacher_source == "fusion"  # the paper's default


def test_teacher_source_changes_the_cache_key_only_where_it_matters(tmp_path):
    from pkdot.pipeline import stage
    from pkdot.pipeline.base import stage_key

    def key_of(name, cfg, upstream):
        return stage_key(cfg, stage(name), upstream)

    fusion = load_config(overrides={"run_dir": str(tmp_path)})
    privileged = load_config(overrides={"run_dir": str(tmp_path), "distill.teacher_source": "privileged"})
    assert key_of("cache", fusion, "up") != key_of("cache", privileged, "up")
    assert key_of("train-teacher", fusion, "up") == key_of("train-teacher", privileged, "up")
