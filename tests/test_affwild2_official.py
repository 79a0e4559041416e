"""`pkdot run --dataset affwild2` on the synthetic set: the official partitions by default, said in the report.

Tiny on purpose (4 people, 4-s videos at 10 fps, 10-frame clips, one epoch per phase, one loss). It renders,
extracts (one worker: in this process) and trains; the training jobs run in this process too
(:func:`tests.train.conftest.jobs_in_process`: the job functions Ray Train calls), so no Ray Train run starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pkdot.cli import main
from pkdot.config import load_config
from pkdot.folds import load_folds
from tests.train.conftest import jobs_in_process

TINY = [
    "synth.subjects=4",
    "synth.seconds_per_video=4",
    "synth.fps=10",
    "synth.frame_size=96",
    "data.clip_frames=10",
    "data.clip_stride=10",
    "features.n_frames=4",
    "features.crop_size=16",
    "features.workers=1",
    "model.embed_dim=16",
    "model.video_width=4",
    "model.audio_width=4",
    "model.tnet_hidden=[8]",
    "train.batch_size=16",
    "train.teacher_batch_size=16",
    "train.epochs_unimodal=1",
    "train.epochs_teacher=1",
    "train.epochs_tnet=1",
    "train.epochs_student=1",
    "train.num_workers=1",
    "train.checkpoint_every_s=0",
    "distill.losses=[none]",
    "distill.pkdot.k=4",
    "tracking.register_model=false",
    "train.refit=false",
    "tracking.log_checkpoints=false",
]


def test_affwild2_run_uses_the_official_partitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran = jobs_in_process(monkeypatch)
    run = tmp_path / "run"
    args = ["run", "--dataset", "affwild2", "--no-prefect", "--run-dir", str(run)]
    args += [x for item in TINY for x in ("--set", item)]
    args += ["--set", f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(args) == 0
    assert ran == ["teacher", "student"]  # in this process (no Ray started)

    cfg = load_config(run / "config.yaml")
    assert cfg.train.folds == "official"  # the default for Aff-Wild2, nobody asked for it
    manifest = pd.read_parquet(run / "manifest.parquet")
    partition = dict(zip(manifest["subject_id"], manifest["partition"], strict=False))
    (fold,) = load_folds(run / "splits.json")
    assert {partition[s] for s in fold.test} == {"Validation_Set"}
    assert {partition[s] for s in (*fold.train, *fold.val)} == {"Train_Set"}
    assert set(fold.test) == {s for s, p in partition.items() if p == "Validation_Set"}

    report = (run / "report" / "report.md").read_text()
    assert "Protocol: official Aff-Wild2 partitions" in report
    assert "tested on `Validation_Set`" in report
    assert "Challenge-style test CCC (valence, per frame)" in report and "CCC here is per clip" in report
    challenge = pd.read_csv(run / "report" / "challenge_ccc.csv")
    assert set(challenge["model"]) >= {"teacher", "student-none"}
    n_val_frames = sum(
        sum(1 for line in p.read_text().splitlines()[1:] if not line.startswith("-5"))
        for p in (cfg.data.root / "annotations" / "VA_Estimation_Challenge" / "Validation_Set").glob("*.txt")
    )
    assert (challenge["frames"] == n_val_frames).all()  # every annotated Validation_Set frame is scored
    summary = json.loads((run / "report" / "summary.json").read_text())
    assert summary["protocol"].startswith("official")
