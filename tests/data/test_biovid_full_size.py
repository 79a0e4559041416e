"""Biovid Part A at full size: 87 subjects x 100 windows (5 classes x 20) -> manifest -> 87 LOSO folds.

The layout is real (samples.csv, one placeholder .mp4 and one header-only biosignal CSV per window), so the
adapter does all of its per-file checks; nothing is decoded (extraction is timed in the benchmark, on a slice).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pkdot import pipeline
from pkdot.config import load_config
from pkdot.data.manifest import BIOVID_CLASSES, read_manifest
from pkdot.folds import load_folds

SUBJECTS = 87
PER_CLASS = 20


def _biovid_layout(root: Path) -> Path:
    lines = ["subject_id\tsubject_name\tclass_id\tclass_name\tsample_id\tsample_name"]
    n = 0
    for s in range(SUBJECTS):
        subject = f"0715{s:02d}_m_{20 + s % 45}"
        (root / "video" / subject).mkdir(parents=True)
        (root / "biosignals_filtered" / subject).mkdir(parents=True)
        for c, name in enumerate(BIOVID_CLASSES):
            for i in range(PER_CLASS):
                sample = f"{subject}-{name}-{i:03d}"
                lines.append(f"{s}\t{subject}\t{c}\t{name}\t{n}\t{sample}")
                (root / "video" / subject / f"{sample}.mp4").touch()
                (root / "biosignals_filtered" / subject / f"{sample}_bio.csv").write_text(
                    "time\tgsr\tecg\temg_trapezius\n"
                )
                n += 1
    (root / "samples.csv").write_text("\n".join(lines) + "\n")
    return root


def test_87_subject_manifest_builds_loso_folds(tmp_path: Path) -> None:
    root = _biovid_layout(tmp_path / "biovid")
    cfg = load_config(
        overrides=[
            f"data.root={root}",
            "data.task=multiclass",
            "train.folds=loso",
            "train.val_fraction=0.1",
            f"run_dir={tmp_path / 'run'}",
        ]
    )
    t0 = time.perf_counter()
    result = pipeline.run_stage("manifest", cfg)
    t_manifest = time.perf_counter() - t0
    assert result.details == {"samples": SUBJECTS * 5 * PER_CLASS, "skipped": 0, "subjects": SUBJECTS}

    manifest = read_manifest(Path(cfg.run_dir) / "manifest.parquet")
    t0 = time.perf_counter()
    from pkdot.folds import fold_plan, save_folds

    folds = fold_plan(manifest, cfg.train, cfg.seed)
    save_folds(folds, Path(cfg.run_dir) / "splits.json")
    folds = load_folds(Path(cfg.run_dir) / "splits.json")
    subject_of = manifest["subject_id"].to_numpy()
    masks = [
        {split: np.isin(subject_of, getattr(f, split)) for split in ("train", "val", "test")} for f in folds
    ]
    t_folds = time.perf_counter() - t0

    subjects = sorted(manifest["subject_id"].unique())
    assert len(folds) == SUBJECTS
    assert sorted(s for f in folds for s in f.test) == subjects  # each subject is tested exactly once
    for f, m in zip(folds, masks, strict=True):
        assert len(f.test) == 1 and len(f.val) == round(0.1 * (SUBJECTS - 1))
        assert len(f.train) + len(f.val) + 1 == SUBJECTS
        assert m["test"].sum() == 5 * PER_CLASS  # one subject's 100 windows
        assert not (m["train"] & m["test"]).any() and not (m["val"] & m["test"]).any()
        assert (m["train"] | m["val"] | m["test"]).all()
    assert len({f.val for f in folds}) > 1  # validation subjects are drawn per fold
    from pkdot.folds import describe_protocol

    assert describe_protocol("loso", Path(cfg.run_dir) / "splits.json").startswith(
        "leave-one-subject-out cross-validation (87 folds evaluated"
    )
    assert np.bincount(manifest["label"], minlength=5).tolist() == [SUBJECTS * PER_CLASS] * 5
    # wall time is printed, not asserted (CPU is shared in CI)
    print(json.dumps({"manifest_s": round(t_manifest, 2), "folds_s": round(t_folds, 2)}))
