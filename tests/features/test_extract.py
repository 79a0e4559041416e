"""run_extract end to end on Ray: bad inputs quarantined, aligned tables, resume after a kill, synthetic sets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pkdot.config import load_config
from pkdot.data.manifest import manifest_frame
from pkdot.errors import DatasetError
from pkdot.features.extract import run_extract
from pkdot.features.faces import sample_indices
from pkdot.features.schema import read_sample_ids, read_tensors
from pkdot.rundir import RunDir

pytestmark = pytest.mark.usefixtures("ray_local")

DEMO = {
    "features.n_frames": 8,
    "features.crop_size": 48,
    "features.detect_width": 160,
    "features.shard_size": 3,
}


def _biovid_cfg(**extra):
    return load_config(preset="demo", overrides={**DEMO, **extra})


def _affwild_cfg(**extra):
    return load_config(
        preset="demo",
        overrides={
            **DEMO,
            "data.dataset": "affwild2",
            "data.task": "valence",
            "data.privileged_modalities": ["audio"],
            **extra,
        },
    )


@pytest.fixture(scope="module")
def biovid_like(tmp_path_factory, media):
    """Good samples plus one of each kind of bad input, sharing a few recordings."""
    root = tmp_path_factory.mktemp("biovid_like")
    videos = [media.face_video(root / f"good{i}.mp4", seed=i).path for i in range(3)]
    csvs = [media.write_bio_csv(root / f"good{i}_bio.csv", media.biosignals(seed=i)) for i in range(3)]
    truncated = root / "truncated.mp4"
    truncated.write_bytes(videos[0].read_bytes()[: videos[0].stat().st_size // 3])
    not_video = root / "notes.mp4"
    not_video.write_text("not a video\n" * 100)
    noface = media.face_video(root / "noface.mp4", face=False).path
    short_nan, long_nan = media.biosignals(seed=7), media.biosignals(seed=8)
    short_nan["ecg"][1500:1530] = np.nan
    long_nan["gsr"][1000:1400] = np.nan
    wrong_fs = media.write_bio_csv(root / "fs1000_bio.csv", media.biosignals(fs=1000.0), fs=1000.0)
    rows = [
        ("good0", videos[0], csvs[0]),
        ("truncated", truncated, csvs[1]),
        ("good1", videos[1], csvs[1]),
        ("noface", noface, csvs[2]),
        ("notvideo", not_video, csvs[0]),
        ("nan_short", videos[2], media.write_bio_csv(root / "short_nan_bio.csv", short_nan)),
        ("nan_long", videos[1], media.write_bio_csv(root / "long_nan_bio.csv", long_nan)),
        ("wrong_fs", videos[0], wrong_fs),
        ("good2", videos[2], csvs[2]),
    ]
    manifest = manifest_frame(
        [
            {
                "sample_id": sid,
                "subject_id": f"p{i % 3}",
                "label": i % 2,
                "video_path": str(v),
                "physio_path": str(c),
                "dataset": "biovid",
            }
            for i, (sid, v, c) in enumerate(rows)
        ]
    )
    return manifest


@pytest.fixture(scope="module")
def biovid_run(biovid_like, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run_biovid")
    report = run_extract(_biovid_cfg(), biovid_like, run_dir, workers=2, progress=False)
    return run_dir, report


EXPECTED_REASONS = {
    ("truncated", "video"): "not a readable video",
    ("noface", "video"): "no face found",
    ("notvideo", "video"): "not a readable video",
    ("nan_long", "physio"): "NaN run of",
    ("wrong_fs", "physio"): "sampling rate 1000 Hz, expected 512 Hz",
}
GOOD = ["good0", "good1", "nan_short", "good2"]


def test_bad_inputs_are_quarantined_with_reasons_and_good_samples_written(biovid_run):
    run_dir, report = biovid_run
    assert report["ray"] is True
    reasons = {(q["sample_id"], q["modality"]): q["reason"] for q in report["quarantined"]}
    assert set(reasons) == set(EXPECTED_REASONS)
    for key, expected in EXPECTED_REASONS.items():
        assert expected in reasons[key], (key, reasons[key])
    # The tables align on sample_id, in manifest order, and hold every good sample.
    assert read_sample_ids(run_dir / "features/faces.parquet") == GOOD
    assert read_sample_ids(run_dir / "features/physio.parquet") == GOOD
    assert report["n_written"] == 4 and {r["sample_id"] for r in report["not_written"]} == {
        k[0] for k in EXPECTED_REASONS
    }
    assert report["counts"] == {"video": {"ok": 6, "quarantined": 3}, "physio": {"ok": 7, "quarantined": 2}}
    ids, frames = read_tensors(run_dir / "features/faces.parquet", "frames", ["good2", "good0"])
    assert ids == ["good2", "good0"] and frames.shape == (2, 8, 48, 48, 3) and frames.dtype == np.uint8
    _, spec = read_tensors(run_dir / "features/physio.parquet", "spectrogram")
    assert spec.shape == (4, 3, 65, 127) and spec.dtype == np.float32
    # Face detection over every sampled frame (the no-face clip's 8 frames count as misses).
    assert report["sampled_frames"] == 7 * 8
    assert report["face_detection_rate"] == pytest.approx(
        report["detected_frames"] / report["sampled_frames"]
    )
    assert report["detected_frames"] >= 0.95 * 6 * 8
    assert report["physio_quality"]["per_sample"]["nan_short"]["ecg"]["interpolated"] == 30
    assert set(report["time_s"]) >= {"video", "physio", "total"}
    on_disk = json.loads(RunDir(run_dir).extract_report.read_text())
    assert on_disk["quarantined"] == report["quarantined"]
    assert report["shards_done"] == 6 and report["shards_skipped"] == 0


def test_rerun_skips_finished_shards_and_settings_changes_redo_only_their_modality(biovid_like, biovid_run):
    run_dir, first = biovid_run
    shards = sorted((run_dir / "features" / "shards").glob("*/*.parquet"))
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    again = run_extract(_biovid_cfg(), biovid_like, run_dir, workers=2, progress=False)
    assert again["shards_skipped"] == 6 and again["shards_done"] == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards} == stamps
    assert (
        again["quarantined"] == first["quarantined"]
        and again["face_detection_rate"] == first["face_detection_rate"]
    )
    assert read_sample_ids(run_dir / "features/faces.parquet") == GOOD
    # A new crop size redoes the video shards only, and the stale video shard files are removed.
    bigger = run_extract(
        _biovid_cfg(**{"features.crop_size": 32}), biovid_like, run_dir, workers=2, progress=False
    )
    assert bigger["shards"]["video"] == {"total": 3, "done": 3, "skipped": 0}
    assert bigger["shards"]["physio"] == {"total": 3, "done": 0, "skipped": 3}
    assert len(list((run_dir / "features/shards/video").glob("*.parquet"))) == 3
    _, frames = read_tensors(run_dir / "features/faces.parquet", "frames")
    assert frames.shape[2:] == (32, 32, 3)
    # Changing a recording redoes the shards that read it (a small file is identified by its content, so a
    # mere touch does not: see pkdot.rundir.file_identity).
    csv = Path(biovid_like.loc[biovid_like.sample_id == "good2", "physio_path"].iloc[0])
    os.utime(csv, ns=(time.time_ns(), time.time_ns()))
    untouched = run_extract(
        _biovid_cfg(**{"features.crop_size": 32}), biovid_like, run_dir, workers=2, progress=False
    )
    assert untouched["shards_done"] == 0
    csv.write_text(csv.read_text() + "\n")  # a trailing empty line: new content, same signals
    touched = run_extract(
        _biovid_cfg(**{"features.crop_size": 32}), biovid_like, run_dir, workers=2, progress=False
    )
    # good2's csv is also read by 'noface' (shard 1) and good2 is in shard 2.
    assert touched["shards"]["physio"] == {"total": 3, "done": 2, "skipped": 1}
    assert touched["shards"]["video"]["skipped"] == 3


def test_ensure_ray_reuses_the_running_ray():
    import ray

    from pkdot.ray_utils import ensure_ray

    assert ray.is_initialized()
    assert ensure_ray(num_cpus=1) is False  # already running: not started again, not to be shut down
    assert ray.cluster_resources()["CPU"] == 2


def test_the_private_rays_workers_get_ray_trains_short_poll_interval():
    import os

    import ray

    from pkdot.ray_utils import TRAIN_POLL_ENV, TRAIN_POLL_S

    # every Ray Train controller started on it reads the interval from its environment
    assert ray.get(ray.remote(lambda: os.environ.get(TRAIN_POLL_ENV)).remote()) == TRAIN_POLL_S


def test_manifest_problems_raise_before_any_work(biovid_like, tmp_path):
    with pytest.raises(DatasetError, match="appears more than once"):
        run_extract(_biovid_cfg(), pd.concat([biovid_like, biovid_like]), tmp_path, progress=False)
    with pytest.raises(DatasetError, match="physio_path"):
        run_extract(_biovid_cfg(), biovid_like.drop(columns=["physio_path"]), tmp_path, progress=False)
    assert not (tmp_path / "features" / "shards").exists()


@pytest.fixture(scope="module")
def affwild_like(tmp_path_factory, media):
    root = tmp_path_factory.mktemp("affwild_like")
    with_audio = [
        media.face_video(root / f"vid{i}.mp4", seconds=4.0, audio=True, seed=i).path for i in range(2)
    ]
    silent = media.write_video_cv2(root / "silent.mp4", media.face_frames(100)[0])
    rows = []
    for video in [*with_audio, silent]:
        for start in (0, 30, 60):
            rows.append(
                {
                    "sample_id": f"{video.stem}-{start}",
                    "subject_id": video.stem,
                    "label": -1,
                    "valence": 0.1,
                    "arousal": 0.2,
                    "video_path": str(video),
                    "start_frame": start,
                    "num_frames": 30,
                    "dataset": "affwild2",
                }
            )
    return manifest_frame(rows)


def test_affwild_like_clips_give_faces_and_stackable_audio(affwild_like, tmp_path):
    report = run_extract(
        _affwild_cfg(**{"features.shard_size": 4}), affwild_like, tmp_path, workers=2, progress=True
    )
    audio_q = [q for q in report["quarantined"] if q["modality"] == "audio"]
    assert {q["sample_id"] for q in audio_q} == {"silent-0", "silent-30", "silent-60"}
    assert all("no audio track" in q["reason"] for q in audio_q)
    good = [s for s in affwild_like.sample_id if not s.startswith("silent")]
    assert read_sample_ids(tmp_path / "features/faces.parquet") == good
    ids, logmel = read_tensors(tmp_path / "features/audio.parquet", "logmel")
    # 30 frames at 25 fps = 1.2 s at 16 kHz, hop 160 -> 1 + 19200 // 160 = 121 frames; n_mels 32 (demo).
    assert ids == good and logmel.shape == (6, 32, 121) and report["audio"]["frames"] == 121
    _, frames = read_tensors(tmp_path / "features/faces.parquet", "frames")
    assert frames.shape == (6, 8, 48, 48, 3)
    assert report["face_detection_rate"] >= 0.95


_KILL_SCRIPT = """
import sys
from pathlib import Path
import pandas as pd
from pkdot.config import load_config
from pkdot.features.extract import run_extract
cfg = load_config(preset="demo", overrides={overrides!r})
run_extract(cfg, pd.read_parquet(sys.argv[1]), Path(sys.argv[2]), workers=1, progress=False)
"""


def test_killed_extraction_resumes_without_redoing_finished_shards(biovid_like, tmp_path):
    good = biovid_like[biovid_like.sample_id.isin(["good0", "good1", "good2"])]
    many = pd.concat([good.assign(sample_id=good.sample_id + f"-{k}") for k in range(5)], ignore_index=True)
    manifest_path = tmp_path / "manifest.parquet"
    many.to_parquet(manifest_path)
    run_dir = tmp_path / "run"
    overrides = {**DEMO, "features.shard_size": 1}
    script = _KILL_SCRIPT.format(overrides=overrides)
    proc = subprocess.Popen([sys.executable, "-c", script, str(manifest_path), str(run_dir)])
    shards_dir = run_dir / "features" / "shards"
    deadline = time.monotonic() + 120
    try:
        while not list(shards_dir.glob("*/shard-*.parquet")):
            assert proc.poll() is None, "the extraction ended before writing a shard"
            assert time.monotonic() < deadline, "no shard file appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    done_before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards_dir.glob("*/shard-*.parquet")}
    assert 1 <= len(done_before) < 30  # killed half-way: some shards, not all
    assert not (run_dir / "features" / "faces.parquet").exists()  # never a half-written table
    report = run_extract(
        load_config(preset="demo", overrides=overrides), many, run_dir, workers=2, progress=False
    )
    assert report["shards_skipped"] == len(done_before)
    assert report["shards_done"] == 30 - len(done_before)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done_before} == done_before
    assert not list(run_dir.rglob("*.tmp-*"))
    assert read_sample_ids(run_dir / "features/faces.parquet") == many.sample_id.tolist()


# ---- the synthetic data sets of pkdot.data, through the real adapters -----------------------------------------
def _centre(boxes: np.ndarray) -> np.ndarray:
    return boxes[:, :2] + boxes[:, 2:] / 2


def _check_centred(
    run_dir: Path, truth_path: Path, windows: dict[str, tuple[str, int, int]], n_frames: int
) -> None:
    """Smoothed boxes are centred on the synthetic truth boxes of the sampled frames."""
    truth = pd.read_parquet(truth_path).set_index("sample_id")
    faces = pq.read_table(run_dir / "features/faces.parquet", columns=["sample_id", "boxes"]).to_pylist()
    assert faces
    for row in faces:
        video, start, length = windows[row["sample_id"]]
        truth_boxes = np.asarray(truth.loc[video, "boxes"].tolist(), dtype=np.float64)
        idx = sample_indices(length if length else len(truth_boxes), n_frames, start)
        ours = np.asarray(row["boxes"], dtype=np.float64).reshape(-1, 4)
        err = np.linalg.norm(_centre(ours) - _centre(truth_boxes[idx]), axis=1)
        assert np.all(err < 0.15 * truth_boxes[idx, 2]), (row["sample_id"], err)


def test_synthetic_biovid_extracts_faces_and_physio(tmp_path):
    from pkdot.data import build_manifest
    from pkdot.data.synthetic import write_synthetic

    root = write_synthetic("biovid", tmp_path / "biovid", subjects=3, samples_per_class=1, progress=False)
    cfg = _biovid_cfg(**{"data.root": str(root), "features.shard_size": 8})
    manifest = build_manifest(cfg.data, root).frame
    report = run_extract(cfg, manifest, tmp_path / "run", workers=2, progress=False)
    assert (tmp_path / "run/features/faces.parquet").is_file() and (
        tmp_path / "run/features/physio.parquet"
    ).is_file()
    assert RunDir(tmp_path / "run").extract_report.is_file()
    assert report["n_written"] == len(manifest) == 6 and not report["quarantined"]  # binary: BL1 and PA4
    assert report["face_detection_rate"] >= 0.95
    windows = {sid: (sid, 0, 0) for sid in manifest.sample_id}
    _check_centred(tmp_path / "run", root / "synthetic_truth.parquet", windows, cfg.features.n_frames)


def test_synthetic_affwild2_extracts_faces_and_audio(tmp_path):
    from pkdot.data import build_manifest
    from pkdot.data.synthetic import write_synthetic

    root = write_synthetic(
        "affwild2", tmp_path / "affwild2", subjects=2, seconds_per_video=4.0, progress=False
    )
    cfg = _affwild_cfg(**{"data.root": str(root), "features.shard_size": 8})
    manifest = build_manifest(cfg.data, root).frame
    report = run_extract(cfg, manifest, tmp_path / "run", workers=2, progress=False)
    assert report["n_written"] == len(manifest) > 0 and not report["quarantined"]
    assert report["face_detection_rate"] >= 0.95
    _, logmel = read_tensors(tmp_path / "run/features/audio.parquet", "logmel")
    assert logmel.shape[:2] == (len(manifest), cfg.features.n_mels)
    windows = {
        r.sample_id: (Path(r.video_path).stem, int(r.start_frame), int(r.num_frames))
        for r in manifest.itertuples()
    }
    _check_centred(tmp_path / "run", root / "synthetic_truth.parquet", windows, cfg.features.n_frames)
