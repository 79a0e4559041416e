"""Teacher job -> embedding cache -> student job, run directly (no Ray): the plain-PyTorch path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pkdot.errors import StaleCacheError
from pkdot.folds import as_plan, save_folds, subject_folds
from pkdot.rundir import RunDir
from pkdot.train.cache import build_cache, check_cache, read_cache
from pkdot.train.data import load_samples, split_fold
from pkdot.train.jobs import WorkerContext
from pkdot.train.student import load_trained_student, run_student_job
from pkdot.train.teacher import run_teacher_job
from tests.train.conftest import make_tiny_run


def _setup(cfg):
    from pkdot.train.jobs import student_jobs, teacher_jobs

    run_dir = Path(cfg.run_dir)
    samples = load_samples(cfg, run_dir)
    folds = subject_folds(sorted(set(samples.subject_ids.tolist())), 3, val_fraction=0.2, seed=0)[:1]
    save_folds(folds, run_dir / "splits.json")
    return samples, folds, teacher_jobs(cfg, folds), student_jobs


def test_teacher_cache_student_chain(tmp_path):
    cfg = make_tiny_run(tmp_path / "run")
    samples, folds, tjobs, student_jobs = _setup(cfg)
    job = tjobs[0]
    data = split_fold(samples, folds[0])
    assert not set(data.train.subject_ids) & set(data.test.subject_ids)
    metrics = run_teacher_job(cfg, job, data, WorkerContext())
    jdir = Path(job.out_dir)
    for name in (
        "unimodal-video.pt",
        "unimodal-physio.pt",
        "teacher.pt",
        "tnet.pt",
        "predictions.parquet",
        "history.json",
        "metrics.json",
        "DONE.json",
    ):
        assert (jdir / name).is_file(), name
    pred = pd.read_parquet(jdir / "predictions.parquet")
    assert set(pred["model"]) == {"unimodal-video", "unimodal-physio", "teacher"}
    assert set(pred["split"]) == {"val", "test"}
    test_subjects = set(pred.loc[pred["split"] == "test", "subject_id"])
    assert test_subjects == set(folds[0].test)
    assert "teacher/test_accuracy" in metrics
    history = json.loads((jdir / "history.json").read_text())
    assert set(history["phases"]) == {"unimodal-video", "unimodal-physio", "teacher", "tnet"}

    # a second run of the same job loads every finished phase instead of training it
    mtimes = {p.name: p.stat().st_mtime_ns for p in jdir.glob("*.pt")}
    run_teacher_job(cfg, job, data, WorkerContext())
    assert {p.name: p.stat().st_mtime_ns for p in jdir.glob("*.pt")} == mtimes

    cpath = build_cache(cfg, samples, job.fold, job.seed)
    assert cpath == RunDir(cfg.run_dir).cache(0, 0)
    arrays = read_cache(Path(cfg.run_dir), 0, 0, samples.sample_ids[:5])
    assert arrays["teacher_embedding"].shape == (5, cfg.model.embed_dim)
    assert arrays["teacher_logits"].shape == (5, 2)
    assert arrays["video_tokens"].ndim == 3 and arrays["video_tokens"].shape[2] == cfg.model.embed_dim

    # the cached embeddings are the frozen teacher's
    from pkdot.train.teacher import load_teacher

    teacher, _, _ = load_teacher(cfg, jdir)
    idx = np.arange(5)
    with torch.no_grad():
        out = teacher({m: torch.from_numpy(samples.arrays[m][idx]) for m in cfg.data.modalities})
    np.testing.assert_allclose(arrays["teacher_embedding"], out.embedding.numpy(), rtol=1e-4, atol=1e-5)

    for sjob in student_jobs(cfg, folds, ["none", "pkdot"]):
        sdata = split_fold(load_samples(cfg, Path(cfg.run_dir), modalities=["video"]), folds[0])
        for part in (sdata.train, sdata.val, sdata.test):
            part.arrays = {}
        m = run_student_job(cfg, sjob, sdata, WorkerContext())
        assert 0.0 <= m["test_accuracy"] <= 1.0
        sd = RunDir(cfg.run_dir).student(sjob.loss, 0, 0)
        assert (sd / "DONE.json").is_file()
        p = pd.read_parquet(sd / "predictions.parquet")
        assert set(p["model"]) == {f"student-{sjob.loss}"}

    # the registered form of a student takes raw video and agrees with the cache path
    student, shapes = load_trained_student(cfg, "pkdot", 0, 0)
    frames = torch.from_numpy(samples.arrays["video"][:4])
    tokens = torch.from_numpy(read_cache(Path(cfg.run_dir), 0, 0, samples.sample_ids[:4])["video_tokens"])
    with torch.no_grad():
        a = student(frames).logits
        b = student.forward_from_features(tokens).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # retraining the teacher makes the cache stale, and the distill stage refuses it
    saved = torch.load(jdir / "teacher.pt", weights_only=True)
    key = next(iter(saved["state_dict"]))
    saved["state_dict"][key] = saved["state_dict"][key] + 1.0
    torch.save(saved, jdir / "teacher.pt")
    with pytest.raises(StaleCacheError, match="rebuild it with `pkdot cache`"):
        check_cache(Path(cfg.run_dir), 0, 0)


def test_teacher_job_is_deterministic_for_a_seed(tmp_path):
    results = []
    for name in ("a", "b"):
        cfg = make_tiny_run(tmp_path / name)
        samples, folds, tjobs, _ = _setup(cfg)
        run_teacher_job(cfg, tjobs[0], split_fold(samples, folds[0]), WorkerContext())
        results.append(pd.read_parquet(Path(tjobs[0].out_dir) / "predictions.parquet"))
    np.testing.assert_array_equal(np.stack(results[0]["scores"]), np.stack(results[1]["scores"]))


def test_a_relative_run_directory_gives_jobs_absolute_output_folders(tmp_path, monkeypatch):
    """`pkdot train-teacher --run runs/r1`: Ray Train runs workers in their own working directory, so a job's
    output folder must not be relative (it was, and the jobs wrote under Ray's session folder)."""
    import argparse

    from pkdot.cli import _build_config
    from pkdot.config import RunConfig
    from pkdot.train.jobs import student_jobs, teacher_jobs

    cfg = make_tiny_run(tmp_path / "runs" / "r1")
    folds = subject_folds(sorted(set(load_samples(cfg, Path(cfg.run_dir)).subject_ids.tolist())), 3, seed=0)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(run=Path("runs/r1"), overrides=["train.epochs_teacher=1"], ray_address=None)
    loaded = _build_config(args)
    assert Path(loaded.run_dir) == (tmp_path / "runs" / "r1").resolve()
    jobs = teacher_jobs(loaded, folds) + student_jobs(loaded, folds, ["none"])
    assert jobs and all(Path(j.out_dir).is_absolute() for j in jobs)
    monkeypatch.chdir(tmp_path / "runs")  # a worker's own working directory
    assert all(Path(j.out_dir).is_relative_to(tmp_path / "runs" / "r1") for j in jobs)
    assert RunConfig(run_dir=Path("x")).run_dir == (tmp_path / "runs" / "x").resolve()


def test_teachers_under_teacher_scope_all_train_with_the_test_part(tmp_path):
    from pkdot.train.jobs import fold_for_job, student_jobs, teacher_jobs

    cfg = make_tiny_run(tmp_path / "run", overrides={"train": {"teacher_scope": "all"}})
    samples = load_samples(cfg, Path(cfg.run_dir))
    fold = subject_folds(sorted(set(samples.subject_ids.tolist())), 3, seed=0)[0]
    (tjob,) = teacher_jobs(cfg, [fold])
    taught = fold_for_job(as_plan([fold]), tjob)
    assert taught.train == (*fold.train, *fold.test) and (taught.val, taught.test) == (fold.val, fold.test)
    assert tjob.out_dir == str(RunDir(cfg.run_dir).teacher(0, 0))  # same paths, another fold
    data = split_fold(samples, taught)
    assert set(data.test.sample_ids) <= set(data.train.sample_ids)
    assert fold_for_job(as_plan([fold]), student_jobs(cfg, [fold], ["kd"])[0]) == fold
    sound = make_tiny_run(tmp_path / "sound")
    assert fold_for_job(as_plan([fold]), teacher_jobs(sound, [fold])[0]) == fold


def test_clip_folds_split_the_samples_by_sample_id(tmp_path):
    from pkdot.train.data import write_run_folds

    cfg = make_tiny_run(tmp_path / "run", overrides={"train": {"folds": "clips", "max_folds": 2}})
    plan = write_run_folds(cfg)
    data = split_fold(load_samples(cfg, Path(cfg.run_dir)), plan.fold(0, 1))
    assert sorted(data.test.sample_ids) == sorted(plan.fold(0, 1).test) and len(data.test) == 12
    assert set(data.train.subject_ids) & set(data.test.subject_ids)  # subjects ignored
