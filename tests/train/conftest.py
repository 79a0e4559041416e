"""A tiny run directory with feature tables whose content carries the label (no extraction needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from pkdot.config import RunConfig, load_config
from pkdot.data.manifest import manifest_frame, write_manifest
from pkdot.features.schema import FACES_SCHEMA, PHYSIO_SCHEMA, encode_tensor, write_table_atomic
from pkdot.rundir import RunDir, atomic_write_text

TINY = {
    "features": {"n_frames": 4, "crop_size": 16},
    "model": {
        "embed_dim": 16,
        "video_width": 4,
        "physio_width": 4,
        "fusion_heads": 2,
        "tnet_hidden": [8, 8],
        "dropout": 0.0,
    },
    "train": {
        "folds": 3,
        "max_folds": 1,
        "batch_size": 16,
        "teacher_batch_size": 16,
        "epochs_unimodal": 2,
        "epochs_teacher": 2,
        "epochs_tnet": 2,
        "epochs_student": 3,
        "num_workers": 1,
        "seeds": [0],
        # these tests drive the cache path with load_samples (no face crops for the student): pin the paper's
        # frozen init; tests/train/test_student_init.py covers the other modes
        "student_init": "teacher-frozen",
        "jobs_per_run": 1,  # one Ray Train run per job, as these tests inspect (the demo preset bundles 8)
    },
    "distill": {"pkdot": {"k": 4}, "losses": ["none", "pkdot"]},
}


def make_tiny_run(
    run_dir: Path, *, subjects: int = 6, per_class: int = 5, seed: int = 0, overrides: dict | None = None
) -> RunConfig:
    """Write manifest + faces/physio tables for a binary task; physio is informative, video weakly so."""
    rng = np.random.default_rng(seed)
    rows, faces, physio = [], [], []
    for s in range(subjects):
        for label in (0, 1):
            for i in range(per_class):
                sid = f"s{s}-c{label}-{i}"
                rows.append(
                    {
                        "sample_id": sid,
                        "subject_id": f"s{s}",
                        "label": label,
                        "class_name": ["BL1", "PA4"][label],
                        "video_path": f"/nonexistent/{sid}.mp4",
                        "physio_path": f"/nonexistent/{sid}.csv",
                        "partition": "",
                        "dataset": "biovid",
                    }
                )
                frames = rng.integers(0, 200, size=(4, 16, 16, 3)).astype(np.uint8)
                frames[:, 4:12, 4:12, :] = np.clip(
                    frames[:, 4:12, 4:12, :].astype(int) + 40 * label, 0, 255
                ).astype(np.uint8)
                faces.append(
                    {
                        "sample_id": sid,
                        **encode_tensor("frames", frames),
                        "face_found": 1.0,
                        "boxes": [0.0] * 16,
                        "lost_frames": 0,
                    }
                )
                spec = rng.normal(size=(3, 9, 12)).astype(np.float32) + 1.5 * label
                window = rng.normal(size=(3, 64)).astype(np.float32) + label
                physio.append(
                    {
                        "sample_id": sid,
                        **encode_tensor("window", window),
                        **encode_tensor("spectrogram", spec),
                        "channels": ["gsr", "ecg", "emg_trapezius"],
                        "eda_level": 0.0,
                        "eda_slope": 0.0,
                        "heart_rate": 60.0,
                        "emg_rms": 1.0,
                    }
                )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest_frame(rows), run_dir / "manifest.parquet")
    write_table_atomic(faces, FACES_SCHEMA, run_dir / "features" / "faces.parquet")
    write_table_atomic(physio, PHYSIO_SCHEMA, run_dir / "features" / "physio.parquet")
    over = {"run_dir": str(run_dir)}
    cfg = load_config(preset="demo", overrides=over)
    data = cfg.model_dump(mode="json")
    from pkdot.config import _deep_merge

    merged = _deep_merge(data, TINY)
    if overrides:
        merged = _deep_merge(merged, overrides)
    cfg = RunConfig.model_validate(merged)
    atomic_write_text(RunDir(run_dir).config, cfg.yaml_text())
    return cfg


@pytest.fixture
def tiny_run(tmp_path: Path) -> RunConfig:
    return make_tiny_run(tmp_path / "run")


def run_jobs_local(cfg: RunConfig, kind: str, jobs) -> None:
    """Run jobs in this process (one worker, no Ray), with the functions every Ray Train worker calls."""
    from pkdot.train.jobs import WorkerContext
    from pkdot.train.ray_runner import job_inputs, run_job

    samples, plan = job_inputs(cfg, kind)
    for job in jobs:
        if not job.is_done():
            run_job(cfg, kind, job, samples, plan, WorkerContext())


def jobs_in_process(monkeypatch) -> list[str]:
    """Make the stages run their training jobs with :func:`run_jobs_local` (no Ray Train run, no start-up);
    returns the kinds run so far, so a test can check the patch applied."""
    from pkdot.train import ray_runner

    ran: list[str] = []

    def run_here(cfg, kind, jobs, **kwargs):
        ran.append(kind)
        return jobs_here(cfg, kind, jobs, **kwargs)

    monkeypatch.setattr(ray_runner, "run_jobs_on_ray", run_here)
    return ran


def jobs_here(cfg: RunConfig, kind: str, jobs, *, callbacks=(), name=None, more=()) -> list:
    """:func:`pkdot.train.ray_runner.run_jobs_on_ray`'s call shape, every job run in this process."""
    for c, js in [(cfg, jobs), *more]:
        run_jobs_local(c, kind, js)
    return []


def registered_metrics(run_dir: str | Path, kind: str, run_name: str) -> dict:
    """The metrics of the newest checkpoint Ray Train's controller registered for the run ``run_name`` of
    ``kind`` (``teacher``/``student``) under ``<run_dir>/ray`` ({} when none yet). The controller registers a
    report when it next polls the worker, and its snapshot file is what a restarted worker group resumes from:
    a checkpoint folder on disk is not enough."""
    for snapshot in Path(run_dir, "ray").glob(f"{kind}-*/{run_name}/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # caught mid-write
            continue
        return dict(latest.get("metrics") or {})
    return {}


class FailOnce:
    """An epoch callback that raises once, at ``phase``/``epoch`` on worker ``rank`` (fault injection).

    A marker file makes it fire only once across restarts of the worker group, so Ray Train's recovery
    (``FailureConfig(max_failures)``) and the checkpoint resume can be exercised on purpose. With
    ``registered=(run_dir, kind, run_name)`` it first waits (up to 60 s) until the controller has registered this
    epoch's checkpoint, so the restarted group resumes from it and not from an earlier one.
    """

    def __init__(
        self,
        marker: str | Path,
        *,
        phase: str,
        epoch: int,
        rank: int = 0,
        registered: tuple[str, str, str] | None = None,
    ) -> None:
        self.marker, self.phase, self.epoch, self.rank = str(marker), phase, epoch, rank
        self.registered = registered

    def __call__(self, job_key: str, phase: str, epoch: int, rank: int) -> None:
        hit = (phase, epoch, rank) == (self.phase, self.epoch, self.rank)
        if hit and not Path(self.marker).exists():
            deadline = time.monotonic() + 60.0
            while self.registered and time.monotonic() < deadline:
                metrics = registered_metrics(*self.registered)
                if (metrics.get("phase"), metrics.get("epoch")) == (phase, float(epoch)):
                    break
                time.sleep(0.1)
            Path(self.marker).write_text(f"{job_key} {phase} epoch {epoch} rank {rank}\n")
            raise RuntimeError(f"injected worker failure in {job_key} {phase} after epoch {epoch}")
