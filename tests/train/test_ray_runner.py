"""Ray Train: 2 workers, a worker that fails mid-training, and a fit that resumes from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from pkdot.train.ray_runner import FailOnce, run_jobs_on_ray
from pkdot.train.splits import save_folds, subject_folds
from tests.train.conftest import make_tiny_run


def test_worker_failure_resumes_from_checkpoint_and_finishes(tmp_path):
    from pkdot.stages import teacher_jobs

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
    run_jobs_on_ray(cfg, "teacher", jobs, callbacks=[FailOnce(marker, phase="teacher", epoch=2, rank=1)])
    assert marker.is_file(), "the injected failure never fired"
    jdir = Path(jobs[0].out_dir)
    assert (jdir / "DONE.json").is_file()
    history = json.loads((jdir / "history.json").read_text())
    # the teacher phase resumed after epoch 2 from the checkpoint: its history is whole and not repeated
    assert [r["epoch"] for r in history["phases"]["teacher"]["epochs"]] == [1, 2, 3, 4]
    assert history["phases"]["teacher"]["resumed_from"] == [2]
    # checkpoints were written by Ray Train under the run directory
    assert any((Path(cfg.run_dir) / "ray").rglob("state.pt"))
