"""Face-crop folders as the face source: Aff-Wild2 ``cropped_aligned`` and Biovid per-sample frame folders."""

from __future__ import annotations

import time
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pytest

from pkdot.config import DataConfig, FeatureConfig, load_config
from pkdot.data.affwild2 import build_affwild2_manifest
from pkdot.data.biovid import build_biovid_manifest
from pkdot.errors import DatasetError
from pkdot.features import faces
from pkdot.features.faces import ClipFailure, ClipRequest, FaceClip
from tests.features.conftest import face_clips
from tests.train.conftest import jobs_in_process

FEATURES = FeatureConfig(n_frames=8, crop_size=32, min_face_px=24)
MISSING_EVERY = 7  # every 7th crop is missing (frames where the organisers' detector found no face)


def _write_cropped_aligned(root: Path, crop: int = 48) -> None:
    """``cropped_aligned/<video>/<frame:05d>.jpg`` from a synthetic set's videos and true face boxes."""
    truth = pd.read_parquet(root / "synthetic_truth.parquet")
    for row in truth.itertuples():
        folder = root / "cropped_aligned" / row.sample_id
        folder.mkdir(parents=True)
        with av.open(str(root / row.video)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if (i + 1) % MISSING_EVERY == 0:
                    continue
                rgb = frame.to_ndarray(format="rgb24")
                face = faces.crop_face(rgb, row.boxes[i], 0.1, crop)
                cv2.imwrite(str(folder / f"{i + 1:05d}.jpg"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def affwild2_with_crops(tmp_path_factory):
    from pkdot.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("aw") / "affwild2"
    write_synthetic(
        "affwild2", root, subjects=4, seed=0, seconds_per_video=4.0, frame_size=96, progress=False
    )
    _write_cropped_aligned(root)
    return root


def _aw_data(root: Path, **kw) -> DataConfig:
    return DataConfig(
        **{
            "dataset": "affwild2",
            "task": "valence",
            "root": root,
            "clip_frames": 25,
            "clip_stride": 25,
            "privileged_modalities": ["audio"],
            **kw,
        }
    )


def test_affwild2_manifest_uses_the_crop_folders_when_they_are_there(affwild2_with_crops):
    root = affwild2_with_crops
    frame = build_affwild2_manifest(_aw_data(root), root).frame
    paths = frame["video_path"].map(Path)
    assert paths.map(lambda p: p.is_dir() and p.parent.name == "cropped_aligned").all()
    assert (paths.map(lambda p: p.name) == frame["sample_id"].str.rsplit("@", n=1).str[0]).all()
    assert frame["audio_path"].str.endswith(".mp4").all()  # audio still comes from the videos
    videos = build_affwild2_manifest(_aw_data(root, faces="video"), root).frame
    assert videos["video_path"].str.endswith(".mp4").all()
    assert videos["sample_id"].tolist() == frame["sample_id"].tolist()


def test_affwild2_frames_mode_needs_the_folders(tmp_path, affwild2_with_crops):
    import shutil

    root = tmp_path / "aw"
    shutil.copytree(affwild2_with_crops, root)
    shutil.rmtree(root / "cropped_aligned" / "video2")
    with pytest.raises(DatasetError, match="video2.*face-crop folder|face-crop folder.*video2"):
        build_affwild2_manifest(_aw_data(root), root)
    skipped = build_affwild2_manifest(_aw_data(root, skip_bad=True), root)
    assert not skipped.frame["sample_id"].str.startswith("video2@").any() and len(skipped.skipped) == 1
    shutil.rmtree(root / "cropped_aligned")
    with pytest.raises(DatasetError, match="cropped_aligned"):
        build_affwild2_manifest(_aw_data(root, faces="frames"), root)
    # Without audio, crops alone are enough: no videos/ needed.
    shutil.copytree(affwild2_with_crops / "cropped_aligned", root / "cropped_aligned")
    shutil.rmtree(root / "videos")
    only_crops = build_affwild2_manifest(_aw_data(root, privileged_modalities=["physio"]), root).frame
    assert len(only_crops) > 0 and only_crops["video_path"].map(lambda p: Path(p).is_dir()).all()


def test_biovid_manifest_reads_per_sample_frame_folders(tmp_path):
    root = tmp_path / "biovid"
    lines = ["subject_id\tsubject_name\tclass_id\tclass_name\tsample_id\tsample_name"]
    for i, (cls, name) in enumerate([(0, "BL1"), (4, "PA4")]):
        sample = f"071309_w_21-{name}-{i:03d}"
        lines.append(f"1\t071309_w_21\t{cls}\t{name}\t{i}\t{sample}")
        folder = root / "frames" / "071309_w_21" / sample
        folder.mkdir(parents=True)
        cv2.imwrite(str(folder / "00001.jpg"), np.full((40, 40, 3), 128, np.uint8))
        bio = root / "biosignals_filtered" / "071309_w_21" / f"{sample}_bio.csv"
        bio.parent.mkdir(parents=True, exist_ok=True)
        bio.write_text("time\tgsr\tecg\temg_trapezius\n")
    (root / "samples.csv").write_text("\n".join(lines) + "\n")
    frame = build_biovid_manifest(DataConfig(root=root), root).frame  # no video/ at all
    assert (
        frame["video_path"].map(lambda p: Path(p).is_dir() and Path(p).parent.parent.name == "frames").all()
    )
    with pytest.raises(DatasetError, match="does not exist"):
        build_biovid_manifest(DataConfig(root=root, faces="video"), root)


def _numbered_folder(folder: Path, numbers: list[int], size: int = 40) -> None:
    """Images whose grey level encodes their file number (2 * number)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        cv2.imwrite(str(folder / f"{n:05d}.png"), np.full((size, size + 4, 3), 2 * n, np.uint8))


def test_folder_frames_are_one_based_and_missing_files_count_as_lost(tmp_path):
    folder = tmp_path / "vid"
    _numbered_folder(folder, [n for n in range(1, 101) if n not in (36, 50)])
    clip, window = list(
        faces.extract_folder_clips(folder, [ClipRequest("whole"), ClipRequest("w", 30, 10)], FEATURES)
    )
    assert isinstance(clip, FaceClip) and clip.frames.shape == (8, 32, 32, 3)
    assert clip.frame_indices.tolist() == faces.sample_indices(100, 8).tolist()
    # Frame i (0-based) is file i + 1: grey level 2 * (i + 1).
    assert clip.face_found == 1.0
    assert np.all(clip.frames[:, 16, 16, 0] == 2 * (clip.frame_indices + 1))
    assert np.allclose(clip.boxes, [0, 0, 44, 40])
    # Window 30..39 samples frames 30, 31, 33, 34, 35, 36, 38, 39 -> 35 (file 36) is missing: nearest present.
    assert window.frame_indices.tolist() == faces.sample_indices(10, 8, 30).tolist()
    lost = window.frame_indices[~window.detected].tolist()
    assert lost == [35] and window.lost_frames == 1
    k = window.frame_indices.tolist().index(35)
    assert window.frames[k, 0, 0, 0] in (2 * 35, 2 * 37)  # file 35 or 37


def test_folder_failures_name_the_folder_and_reason(tmp_path):
    gap = tmp_path / "gap"
    _numbered_folder(gap, [1, 2, 100])
    (all_missing,) = list(faces.extract_folder_clips(gap, [ClipRequest("s", 20, 40)], FEATURES))
    assert isinstance(all_missing, ClipFailure) and "no face image" in all_missing.reason
    assert str(gap) in all_missing.reason and all_missing.sampled_frames == 8
    broken = tmp_path / "broken"
    _numbered_folder(broken, list(range(1, 11)))
    (broken / "00005.png").write_bytes(b"not an image")
    (bad,) = list(faces.extract_folder_clips(broken, [ClipRequest("s")], FEATURES))
    assert isinstance(bad, ClipFailure) and "00005.png is not a readable image" in bad.reason
    for folder, expected in (
        (tmp_path / "absent", "does not exist"),
        (tmp_path / "empty", "no frame images"),
    ):
        (tmp_path / "empty").mkdir(exist_ok=True)
        (failure,) = list(faces.extract_folder_clips(folder, [ClipRequest("s")], FEATURES))
        assert isinstance(failure, ClipFailure) and expected in failure.reason


def test_crop_folders_are_faster_than_video_for_the_same_clips(affwild2_with_crops):
    root = affwild2_with_crops
    frames = build_affwild2_manifest(_aw_data(root), root).frame
    videos = build_affwild2_manifest(_aw_data(root, faces="video"), root).frame
    features = FeatureConfig(n_frames=8, crop_size=32, min_face_px=24)
    timings = {}
    for name, manifest in (("frames", frames), ("video", videos)):
        t0 = time.perf_counter()
        for path, rows in manifest.groupby("video_path", sort=False):
            clips = [
                ClipRequest(r.sample_id, int(r.start_frame), int(r.num_frames)) for r in rows.itertuples()
            ]
            source = face_clips(path, clips, features)  # a folder or a video
            failures = [c.reason for c in source if isinstance(c, ClipFailure)]
            # The crops never fail; Haar misses one synthetic 96-px subject in some windows (as before).
            assert name == "video" or not failures, failures
        timings[name] = time.perf_counter() - t0
    print(
        f"face crops of {len(frames)} clips: frames {timings['frames']:.3f} s, video {timings['video']:.3f} s"
    )
    assert timings["frames"] < timings["video"]


@pytest.mark.integration
def test_cropped_aligned_runs_manifest_extract_train_evaluate(tmp_path, affwild2_with_crops, monkeypatch):
    from pkdot import pipeline

    ran = jobs_in_process(monkeypatch)  # the subject is the frames source, not Ray Train

    cfg = load_config(
        preset="demo",
        overrides={
            "run_dir": str(tmp_path / "run"),
            "data.dataset": "affwild2",
            "data.task": "valence",
            "data.root": str(affwild2_with_crops),
            "data.privileged_modalities": ["audio"],
            "data.clip_frames": 25,
            "data.clip_stride": 25,
            "features.n_frames": 4,
            "features.crop_size": 16,
            "features.workers": 1,
            "model.embed_dim": 16,
            "model.video_width": 4,
            "model.audio_width": 4,
            "model.tnet_hidden": [8, 8],
            "train.folds": 2,
            "train.max_folds": 1,
            "train.epochs_unimodal": 1,
            "train.epochs_teacher": 1,
            "train.epochs_tnet": 1,
            "train.epochs_student": 1,
            "train.num_workers": 1,
            "distill.losses": ["none"],
            "train.refit": False,
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        },
    )
    cfg = pipeline.prepare_run(cfg)
    upstream = ""
    results = {}
    for name in [s.name for s in pipeline.STAGES]:
        results[name] = pipeline.run_stage(name, cfg, upstream)
        upstream = results[name].fingerprint
    assert ran == ["teacher", "student"]
    manifest = pd.read_parquet(Path(cfg.run_dir) / "manifest.parquet")
    assert manifest["video_path"].map(lambda p: Path(p).parent.name == "cropped_aligned").all()
    import json

    report = json.loads((Path(cfg.run_dir) / "features" / "extract_report.json").read_text())
    assert report["n_written"] == len(manifest)
    # Every 7th crop is missing: some sampled frames are lost, none of the clips fails.
    assert 0.7 < report["face_detection_rate"] < 1.0 and report["lost_frames"]["total"] > 0
    assert (Path(cfg.run_dir) / "report" / "report.md").is_file()
