"""Issue 24 case 2: recordings that decode but are wrong are quarantined at extraction, never used as "ok".

Each test breaks one sample of the tiny synthetic Biovid set (6 samples: BL1 and PA4 of 3 subjects) the way the
issue describes and checks that exactly that sample is quarantined, with a reason naming what is wrong (both
durations for a duration check), and the 5 others are written (so the generator's correct data passes every
check).
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from tests.reliability.conftest import extract, tiny_cfg


def _first_sample(root: Path) -> tuple[str, Path, Path]:
    """The first BL1 sample of the set (in the binary task's manifest): name, video, biosignal CSV."""
    samples = pd.read_csv(root / "samples.csv", sep="\t", dtype=str)
    row = samples[samples["class_name"] == "BL1"].iloc[0]
    subject, name = row["subject_name"], row["sample_name"]
    return (
        name,
        root / "video" / subject / f"{name}.mp4",
        root / "biosignals_filtered" / subject / f"{name}_bio.csv",
    )


def _read_frames(video: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(video))
    frames = []
    ok, frame = capture.read()
    while ok:
        frames.append(frame)
        ok, frame = capture.read()
    capture.release()
    return frames


def _rewrite(video: Path, frames: list[np.ndarray], fps: float = 25.0) -> None:
    """Replace ``video`` by ``frames`` (BGR), written with OpenCV's mp4v writer as the issue did."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(frame)
    writer.release()


def _quarantined(root: Path, tmp_path: Path) -> tuple[dict, list[dict]]:
    run = tmp_path / "run"
    extract(tiny_cfg(root, run))
    report = json.loads((run / "features" / "extract_report.json").read_text())
    return report, report["quarantined"]


def test_a_3_frame_video_for_a_5_5_s_window_names_both_durations(tiny_biovid: Path, tmp_path: Path) -> None:
    name, video, _ = _first_sample(tiny_biovid)
    frames = _read_frames(video)
    assert len(frames) == 138  # 5.52 s at 25 fps
    _rewrite(video, [frames[0], frames[60], frames[120]])  # 0.12 s, three different frames
    report, quarantined = _quarantined(tiny_biovid, tmp_path)
    assert [(q["sample_id"], q["modality"]) for q in quarantined] == [(name, "video")]
    reason = quarantined[0]["reason"]
    assert f"video {video.resolve()} lasts 0.12 s" in reason and "5.5 s window" in reason, reason
    assert report["n_written"] == 5


def test_a_video_and_biosignal_file_of_different_durations(tiny_biovid: Path, tmp_path: Path) -> None:
    name, video, bio = _first_sample(tiny_biovid)
    frames = _read_frames(video)
    _rewrite(video, frames + frames[::-1])  # 11.04 s of video; the biosignal file covers 5.5 s
    report, quarantined = _quarantined(tiny_biovid, tmp_path)
    assert [(q["sample_id"], q["modality"]) for q in quarantined] == [(name, "video")]
    reason = quarantined[0]["reason"]
    assert f"lasts 11 s but biosignal file {bio.resolve()} lasts 5.5 s" in reason, reason
    assert "features.duration_tolerance_s 0.5 s" in reason
    assert report["n_written"] == 5


def test_a_frozen_video_is_quarantined(tiny_biovid: Path, tmp_path: Path) -> None:
    name, video, _ = _first_sample(tiny_biovid)
    frames = _read_frames(video)
    _rewrite(video, [frames[40]] * len(frames))  # the right duration, one picture
    report, quarantined = _quarantined(tiny_biovid, tmp_path)
    assert [(q["sample_id"], q["modality"]) for q in quarantined] == [(name, "video")]
    assert quarantined[0]["reason"].startswith(f"video {video.resolve()} is frozen: the 4 sampled frames")
    assert report["n_written"] == 5


def test_a_black_video_is_quarantined_as_blank(tiny_biovid: Path, tmp_path: Path) -> None:
    name, video, _ = _first_sample(tiny_biovid)
    frames = _read_frames(video)
    _rewrite(video, [np.zeros_like(f) for f in frames])
    report, quarantined = _quarantined(tiny_biovid, tmp_path)
    assert [(q["sample_id"], q["modality"]) for q in quarantined] == [(name, "video")]
    assert quarantined[0]["reason"].startswith(
        f"video {video.resolve()} is blank: every one of the 4 sampled frames is one flat colour"
    )
    assert report["n_written"] == 5


def test_a_constant_biosignal_channel_is_quarantined(tiny_biovid: Path, tmp_path: Path) -> None:
    """Already caught before issue 24 (features/physio.py's channel quality); kept here for the README row."""
    name, _, bio = _first_sample(tiny_biovid)
    table = pd.read_csv(bio, sep="\t")
    table["ecg"] = 0.5
    table.to_csv(bio, sep="\t", index=False)
    report, quarantined = _quarantined(tiny_biovid, tmp_path)
    assert quarantined == [
        {
            "sample_id": name,
            "modality": "physio",
            "reason": f"biosignal file {bio.resolve()}: channel ecg is flat (constant or empty)",
        }
    ]
    assert report["n_written"] == 5
