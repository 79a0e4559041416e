"""Cross-fitted teacher targets: no training target comes from a teacher that saw the sample's subject."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pkdot.rundir import RunDir
from pkdot.train.cache import build_cache, cache_metadata, job_record, read_cache
from pkdot.train.data import load_samples, split_fold, write_run_folds
from pkdot.train.jobs import student_jobs, teacher_cost, teacher_jobs
from pkdot.train.student import DistillationObjective, load_student_samples
from pkdot.train.teacher import load_teacher
from tests.train.conftest import make_tiny_run, run_jobs_local

CROSSFIT = {
    "distill": {"teacher_targets": "crossfit", "crossfit_groups": 2, "losses": ["pkdot"]},
    "train": {
        "epochs_unimodal": 1,
        "epochs_teacher": 1,
        "epochs_tnet": 1,
        "epochs_student": 1,
        "batch_size": 8,
    },
}


def test_crossfit_targets_jobs_cache_and_batches(tmp_path, monkeypatch):
    cfg = make_tiny_run(tmp_path / "run", overrides=CROSSFIT)
    run_dir = Path(cfg.run_dir)
    plan = write_run_folds(cfg)
    fold = plan.fold(0, 0)
    assert len(fold.crossfit) == 2 and sorted(s for g in fold.crossfit for s in g) == sorted(fold.train)

    jobs = teacher_jobs(cfg, plan)
    assert [j.group for j in jobs] == [None, 0, 1]
    assert len({j.key for j in jobs}) == len({j.out_dir for j in jobs}) == 3
    run_jobs_local(cfg, "teacher", jobs)

    # each cross-fitting teacher trained on the fold's training subjects minus its own group (its DONE record
    # lists the subjects of the data it was given)
    for j, group in enumerate(fold.crossfit):
        trained_on = set(job_record(RunDir(run_dir).teacher(0, 0, j, 2))["train_subjects"])
        assert trained_on == set(fold.train) - set(group)
    assert set(job_record(RunDir(run_dir).teacher(0, 0))["train_subjects"]) == set(fold.train)
    cost = teacher_cost(jobs)
    assert cost["teacher_jobs"] == 1 and cost["crossfit_jobs"] == 2 and cost["crossfit_seconds"] > 0

    samples = load_samples(cfg, run_dir)
    path = build_cache(cfg, samples, 0, 0)
    assert path.name == "fold-0-seed-0-crossfit2.parquet"
    meta = cache_metadata(path)
    assert meta["extra_teacher_jobs"] == 2 and meta["extra_teacher_seconds"] > 0
    cached = read_cache(run_dir, 0, 0, samples.sample_ids, 2, ("teacher_embedding", "target_group"))
    groups = cached["target_group"]
    for sample, subject, g in zip(samples.sample_ids, samples.subject_ids, groups, strict=True):
        if subject in fold.train:
            assert g == fold.group_of(subject), sample
            assert subject not in job_record(RunDir(run_dir).teacher(0, 0, int(g), 2))["train_subjects"], (
                sample
            )
        else:
            assert g == -1, sample  # validation / test: the full-fold teacher
    # the full-fold teacher's embeddings are kept for val/test rows and replaced for training rows
    full, _, _ = load_teacher(cfg, RunDir(run_dir).teacher(0, 0))
    with torch.no_grad():
        z = full({m: torch.from_numpy(samples.arrays[m]) for m in cfg.data.modalities}).embedding.numpy()
    outside = groups < 0
    np.testing.assert_allclose(cached["teacher_embedding"][outside], z[outside], rtol=1e-4, atol=1e-5)
    assert not np.allclose(cached["teacher_embedding"][~outside], z[~outside], atol=1e-3)

    # the student's training batches never mix crossfit groups
    seen: list[np.ndarray] = []
    forward = DistillationObjective.forward

    def spy(self, student_input, teacher_z, teacher_logits, target, index, from_features):
        seen.append(index.numpy().copy())
        return forward(self, student_input, teacher_z, teacher_logits, target, index, from_features)

    monkeypatch.setattr(DistillationObjective, "forward", spy)
    run_jobs_local(cfg, "student", student_jobs(cfg, plan, ["pkdot"]))
    train = split_fold(load_student_samples(cfg, run_dir), fold).train
    assert seen and sum(len(i) for i in seen) > 0
    for index in seen:
        assert len({fold.group_of(train.subject_ids[i]) for i in index}) == 1
