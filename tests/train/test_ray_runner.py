"""Ray Train runs per job: a worker that fails mid-training, runs at once, a failed run resumed by a re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkdot.errors import StageError
from pkdot.folds import FoldPlan, as_plan, save_folds, subject_folds
from pkdot.train.jobs import Job, fold_for_job, teacher_jobs
from pkdot.train.ray_runner import _read_token_on_node, run_jobs_on_ray, run_name, runs_that_fit
from tests.train.conftest import FailOnce, make_tiny_run, run_jobs_local


def _teacher_history(job: Job) -> dict:
    return json.loads((Path(job.out_dir) / "history.json").read_text())["phases"]["teacher"]


def test_worker_failure_resumes_from_checkpoint_and_finishes(tmp_path):

    cfg = make_tiny_run(
        tmp_path / "run",
        overrides={
            "train": {"num_workers": 2, "epochs_teacher": 4, "max_failures": 2, "checkpoint_every_s": 0}
        },
    )
    folds = subject_folds([f"s{i}" for i in range(6)], 3, val_fraction=0.2, seed=0)[:1]
    save_folds(folds, Path(cfg.run_dir) / "splits.json")
    jobs = teacher_jobs(cfg, folds)
    marker = tmp_path / "failed-once"
    registered = (str(cfg.run_dir), "teacher", "teacher-fold-0-seed-0")
    fail = FailOnce(marker, phase="teacher", epoch=2, rank=1, registered=registered)
    runs = run_jobs_on_ray(cfg, "teacher", jobs, callbacks=[fail])
    assert marker.is_file(), "the injected failure never fired"
    jdir = Path(jobs[0].out_dir)
    assert (jdir / "DONE.json").is_file()
    # the teacher phase resumed after epoch 2 from the checkpoint: its history is whole and not repeated
    history = _teacher_history(jobs[0])
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3, 4]
    assert history["resumed_from"] == [2]
    # one Ray Train run, named after the job, whose checkpoints are under the run directory
    assert [r["name"] for r in runs] == ["teacher-fold-0-seed-0"]
    run_folders = list((Path(cfg.run_dir) / "ray").glob("teacher-*/teacher-fold-0-seed-0"))
    assert run_folders and any(run_folders[0].rglob("state.pt"))


def _seed_1_fails_once(tmp_path: Path, **train) -> tuple:
    """Teacher jobs of seeds 0 and 1 on one fold (1 epoch per phase but 3 teacher epochs, ``train`` on top) and an
    epoch callback that fails seed 1's job once after teacher epoch 2: (config, folds, jobs, callback)."""

    base = {
        "seeds": [0, 1],
        "epochs_unimodal": 1,
        "epochs_tnet": 1,
        "epochs_teacher": 3,
        "checkpoint_every_s": 0,
    }
    cfg = make_tiny_run(tmp_path / "run", overrides={"train": base | train})
    folds = subject_folds([f"s{i}" for i in range(6)], 3, val_fraction=0.2, seed=0)[:1]
    save_folds(folds, Path(cfg.run_dir) / "splits.json")
    jobs = teacher_jobs(cfg, folds)
    assert len(jobs) == 2
    fail = FailOnce(tmp_path / "failed", phase="teacher", epoch=2, rank=0)

    def only_seed_1(job_key: str, phase: str, epoch: int, rank: int) -> None:
        if job_key.endswith("seed-1"):
            fail(job_key, phase, epoch, rank)

    return cfg, folds, jobs, only_seed_1


def test_local_mode_trains_in_the_task_and_retries_a_failed_run_from_its_first_unfinished_job(tmp_path):
    """``train.num_workers = 0``: Ray Train's local mode in a task that holds a worker's CPU; two jobs in one
    run; the second fails once mid-training, the task is retried, the finished first job is not trained again
    and the second starts afresh (no epoch checkpoint is kept)."""
    cfg, folds, jobs, only_seed_1 = _seed_1_fails_once(
        tmp_path, num_workers=0, max_failures=1, jobs_per_run=2
    )
    runs = run_jobs_on_ray(cfg, "teacher", jobs, callbacks=[only_seed_1])
    assert (tmp_path / "failed").is_file(), "the injected failure never fired"
    assert [r["name"] for r in runs] == ["teacher-fold-0-seed-0+1"] and all(j.is_done() for j in jobs)
    first_done = jobs[0].done_marker.stat().st_mtime
    assert first_done < (tmp_path / "failed").stat().st_mtime, "the first job was trained again"
    history = _teacher_history(jobs[1])
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3]
    assert not history.get("resumed_from")
    assert not list((Path(cfg.run_dir) / "ray").rglob("state.pt")), "local mode wrote epoch checkpoints"
    # the same jobs in this process (the reference of tests/integration/test_two_node.py): the same metrics
    ref = make_tiny_run(tmp_path / "ref", overrides={"train": cfg.train.model_dump(mode="json")})
    save_folds(folds, Path(ref.run_dir) / "splits.json")
    run_jobs_local(ref, "teacher", teacher_jobs(ref, folds))
    for job, ref_job in zip(jobs, teacher_jobs(ref, folds), strict=True):
        metrics = [json.loads((Path(j.out_dir) / "metrics.json").read_text()) for j in (job, ref_job)]
        assert metrics[0] == metrics[1], job.key


def test_jobs_run_as_separate_concurrent_runs_and_a_failed_run_resumes(tmp_path):
    """Two jobs (1 worker each) run at once as two Ray Train runs; a run that exhausted its retries fails
    the stage naming its job, and the next call resumes that job from the run's last checkpoint."""
    # seed 1's job dies after teacher epoch 2 with no retry left; seed 0's job is unaffected
    cfg, _, jobs, only_seed_1 = _seed_1_fails_once(
        tmp_path, num_workers=1, max_failures=0, max_concurrent_jobs=2
    )

    with pytest.raises(StageError, match="teacher/fold-0/seed-1"):
        run_jobs_on_ray(cfg, "teacher", jobs, callbacks=[only_seed_1])
    assert jobs[0].is_done() and not jobs[1].is_done()

    runs = run_jobs_on_ray(cfg, "teacher", jobs)
    assert [r["name"] for r in runs] == ["teacher-fold-0-seed-1"], "only the unfinished job runs again"
    history = _teacher_history(jobs[1])
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3]
    assert history["resumed_from"] == [2], "the re-run did not resume from the failed run's checkpoint"
    assert "resumed_from" not in _teacher_history(jobs[0]) or not _teacher_history(jobs[0])["resumed_from"]


def test_runs_that_fit_counts_whole_runs_per_resource():
    from pkdot.config import RunConfig

    cfg = RunConfig.model_validate(
        {"train": {"num_workers": 2, "cpus_per_worker": 1.5, "gpus_per_worker": 0.5}}
    )
    assert runs_that_fit(cfg, {"CPU": 8.0}, use_gpu=False) == 2  # 3 CPUs a run
    assert runs_that_fit(cfg, {"CPU": 64.0, "GPU": 3.0}, use_gpu=True) == 3  # 1 GPU a run
    assert runs_that_fit(cfg, {"CPU": 2.0}, use_gpu=False) == 1  # too small: one at a time (with a warning)


def test_fold_for_job_finds_the_seeds_fold_by_index():
    folds = subject_folds([f"s{i}" for i in range(6)], 3, val_fraction=0.2, seed=0)
    job = Job(key="teacher/fold-2/seed-7", out_dir="x", fold=2, seed=7)
    assert fold_for_job(as_plan(folds), job) == folds[2]
    assert fold_for_job(as_plan(folds[2:]), job) == folds[2]  # by index, not position
    assert fold_for_job(as_plan({7: folds}), job).test == folds[2].test
    with pytest.raises(StageError, match="no folds for seed 7"):
        fold_for_job(as_plan({0: folds}), job)
    with pytest.raises(StageError, match="no fold 2 for seed 7"):
        fold_for_job(FoldPlan(by_seed={}, shared=tuple(folds[:2])), job)


def test_run_names_are_job_keys():
    jobs = [Job(key=f"student/pkdot/fold-{i}/seed-0", out_dir="x", fold=i, seed=0) for i in range(3)]
    assert run_name(jobs[:1]) == "student-pkdot-fold-0-seed-0"
    assert run_name(jobs) == "student-pkdot-fold-0-seed-0+2"


def test_node_check_reports_an_unreadable_run_directory(tmp_path):
    token = tmp_path / ".ray-node-check"
    assert "cannot read" in _read_token_on_node(str(token), "abc")
    token.write_text("other")
    assert "another token" in _read_token_on_node(str(token), "abc")
    token.write_text("abc\n")
    assert _read_token_on_node(str(token), "abc") == ""
