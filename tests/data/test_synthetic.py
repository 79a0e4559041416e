"""The synthetic data sets: real layouts, readable recordings, faces Haar finds, labels that show, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
import pytest
from scipy.signal import find_peaks

from pkdot.data.faces_art import haar_cascade
from pkdot.data.manifest import BIOVID_CLASSES
from pkdot.data.synthetic import AUDIO_SR, BIOVID_FS, TRUTH_FILE, write_synthetic
from pkdot.errors import ConfigError


def _frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _crop(frame: np.ndarray, box: np.ndarray, size: int = 48) -> np.ndarray:
    x, y, w, h = (int(round(v)) for v in box)
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    return cv2.resize(gray[y : y + h, x : x + w], (size, size), interpolation=cv2.INTER_AREA).astype(
        np.float64
    )


# ---- Biovid ------------------------------------------------------------------------------------------------
def test_biovid_layout_samples_and_truth(biovid_a: Path) -> None:
    samples = pd.read_csv(biovid_a / "samples.csv", sep="\t", dtype=str)
    assert list(samples.columns) == [
        "subject_id",
        "subject_name",
        "class_id",
        "class_name",
        "sample_id",
        "sample_name",
    ]
    assert len(samples) == 4 * 5 * 2
    assert (samples.groupby("subject_name").size() == 10).all()
    assert all(BIOVID_CLASSES[int(c)] == n for c, n in zip(samples.class_id, samples.class_name, strict=True))
    assert samples.sample_id.is_unique and samples.sample_name.is_unique
    truth = pd.read_parquet(biovid_a / TRUTH_FILE).set_index("sample_id")
    assert set(truth.index) == set(samples.sample_name)
    expressiveness = truth.groupby("subject_id").expressiveness.first()
    assert expressiveness.between(0, 1).all() and expressiveness.min() < 0.25 and expressiveness.max() > 0.5
    for row in samples.iloc[::9].itertuples():
        video = biovid_a / "video" / row.subject_name / f"{row.sample_name}.mp4"
        frames = _frames(video)
        assert len(frames) == len(truth.loc[row.sample_name, "boxes"]) == round(5.5 * 25)
        assert frames[0].shape == (160, 160, 3)


def test_biovid_biosignal_csvs(biovid_a: Path, biovid_b: Path) -> None:
    for root, columns in (
        (biovid_a, ["gsr", "ecg", "emg_trapezius"]),
        (biovid_b, ["gsr", "ecg", "emg_trapezius", "emg_corrugator", "emg_zygomaticus"]),
    ):
        csvs = sorted((root / "biosignals_filtered").rglob("*_bio.csv"))
        assert len(csvs) == len(pd.read_csv(root / "samples.csv", sep="\t"))
        for path in csvs[::4]:
            assert path.read_text().splitlines()[0] == "\t".join(["time", *columns])
            bio = pd.read_csv(path, sep="\t")
            assert len(bio) == 2816 and bio["time"].dtype == np.int64
            assert np.isfinite(bio[columns].to_numpy()).all()
            rate = 1e6 / np.diff(bio["time"].to_numpy()).mean()
            assert rate == pytest.approx(BIOVID_FS, rel=1e-3)
            # ECG: R peaks at a human heart rate
            peaks, _ = find_peaks(bio.ecg, height=0.5 * bio.ecg.max(), distance=int(0.3 * BIOVID_FS))
            heart_rate = 60.0 / np.diff(peaks / BIOVID_FS).mean()
            assert 40 < heart_rate < 150
            assert bio.gsr.between(0.5, 30).all()  # skin conductance in microsiemens


def test_biovid_faces_found_by_haar_cascade(biovid_a: Path) -> None:
    truth = pd.read_parquet(biovid_a / TRUTH_FILE)
    cascade = haar_cascade()
    found = total = 0
    for row in truth.iloc[::5].itertuples():
        boxes = np.asarray(row.boxes.tolist())
        for i, frame in enumerate(_frames(biovid_a / row.video)):
            if i % 9:
                continue
            gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(30, 30))
            total += 1
            found += any(_iou(np.asarray(f, float), boxes[i]) > 0.4 for f in faces)
    assert total >= 100
    assert found / total >= 0.95


def test_pain_is_visible_on_a_48px_face_crop(biovid_a: Path) -> None:
    """Expressive subject: BL1 vs a responding PA4 window, late-window crops differ much more than two BL1
    windows do (non-responding PA4 windows, which the truth table marks, show nothing by design)."""
    truth = pd.read_parquet(biovid_a / TRUTH_FILE)
    subject = truth.loc[truth.expressiveness.idxmax(), "subject_id"]
    mine = truth[truth.subject_id == subject]

    def late_crop(row: pd.Series) -> np.ndarray:
        frames = _frames(biovid_a / row.video)
        boxes = np.asarray(row.boxes.tolist())
        return np.mean([_crop(frames[i], boxes[i]) for i in range(110, len(frames), 3)], axis=0)

    bl1 = [late_crop(r) for _, r in mine[mine.class_id == 0].iterrows()]
    responding = mine[(mine.class_id == 4) & (mine.face_response > 0)]
    assert len(responding) >= 1
    pa4 = [late_crop(r) for _, r in responding.iterrows()]
    within = np.abs(bl1[0] - bl1[1]).mean()
    between = min(np.abs(b - p).mean() for b in bl1 for p in pa4)
    assert between > 2.0 * within, (between, within)


# ---- Aff-Wild2 ---------------------------------------------------------------------------------------------
def test_affwild2_layout_video_audio_annotations(affwild2: Path) -> None:
    truth = pd.read_parquet(affwild2 / TRUTH_FILE)
    assert len(truth) == 8
    assert set(truth.sample_id) == {f"video{i}_{side}" for i in range(1, 5) for side in ("left", "right")}
    assert set(truth.partition) == {"Train_Set", "Validation_Set"}
    assert (truth.groupby("subject_id").partition.nunique() == 1).all()
    loudness, arousal = [], []
    for row in truth.itertuples():
        n = len(row.boxes)
        assert n == 100
        ann = (
            affwild2 / "annotations/VA_Estimation_Challenge" / row.partition / f"{row.sample_id}.txt"
        ).read_text()
        lines = ann.splitlines()
        assert lines[0] == "valence,arousal" and len(lines) == n + 1
        unannotated = [i for i, line in enumerate(lines[1:]) if line == "-5,-5"]
        assert 0 < len(unannotated) < n // 2
        assert unannotated == np.flatnonzero(~np.asarray(row.annotated)).tolist()
        values = np.array([[float(x) for x in line.split(",")] for line in lines[1:] if line != "-5,-5"])
        assert np.abs(values).max() <= 1.0
        with av.open(str(affwild2 / row.video)) as container:
            assert container.streams.video and container.streams.audio
            assert container.streams.audio[0].rate == AUDIO_SR
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        with av.open(str(affwild2 / row.video)) as container:
            audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
        assert len(frames) == n and frames[0].shape == (96, 96, 3)
        assert len(audio) >= n / 25 * AUDIO_SR
        hop = AUDIO_SR // 25
        rms = np.sqrt([np.mean(audio[i * hop : (i + 1) * hop] ** 2) for i in range(n)])
        smooth = np.convolve(rms, np.ones(9) / 9, mode="same")
        loudness.extend(smooth[5:-5])
        arousal.extend(np.asarray(row.arousal)[5:-5])
    assert np.corrcoef(loudness, arousal)[0, 1] > 0.5


# ---- determinism and arguments -----------------------------------------------------------------------------
def _digest(root: Path, pattern: str) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob(pattern))
    }


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    kwargs = {"subjects": 2, "samples_per_class": 1, "frame_size": 64, "progress": False}
    a = write_synthetic("biovid", tmp_path / "a", seed=11, **kwargs)
    b = write_synthetic("biovid", tmp_path / "b", seed=11, **kwargs)
    c = write_synthetic("biovid", tmp_path / "c", seed=12, **kwargs)
    digests = _digest(a, "*.csv")
    assert len(digests) == 1 + 10 and "samples.csv" in digests
    assert digests == _digest(b, "*.csv")
    assert _digest(c, "*.csv") != digests
    assert pd.read_parquet(a / TRUTH_FILE).equals(pd.read_parquet(b / TRUTH_FILE))
    for video in sorted(a.rglob("*.mp4"))[:3]:
        fa, fb = _frames(video), _frames(b / video.relative_to(a))
        assert len(fa) == len(fb) and all(np.array_equal(x, y) for x, y in zip(fa, fb, strict=True))
    assert not list(a.rglob(".*tmp*"))
    kwargs = {"subjects": 2, "seconds_per_video": 1.0, "frame_size": 64, "progress": False}
    a = write_synthetic("affwild2", tmp_path / "aw_a", seed=4, **kwargs)
    b = write_synthetic("affwild2", tmp_path / "aw_b", seed=4, **kwargs)
    assert _digest(a, "*.txt") == _digest(b, "*.txt") and len(_digest(a, "*.txt")) == 2


def test_processes_and_a_class_subset_write_the_same_windows(tmp_path: Path) -> None:
    """Two writer processes give the same files as one; a class subset writes exactly those windows of the
    full set (each window's draws are its own), numbered anew in samples.csv."""
    kwargs = {"subjects": 2, "samples_per_class": 1, "frame_size": 64, "fps": 10, "progress": False}
    full = write_synthetic("biovid", tmp_path / "full", seed=3, **kwargs)
    two = write_synthetic("biovid", tmp_path / "two", seed=3, workers=2, **kwargs)
    assert _digest(two, "*.csv") == _digest(full, "*.csv")
    assert pd.read_parquet(two / TRUTH_FILE).equals(pd.read_parquet(full / TRUTH_FILE))
    part = write_synthetic("biovid", tmp_path / "part", seed=3, classes=["BL1", "PA4"], **kwargs)
    samples = pd.read_csv(part / "samples.csv", sep="\t")
    assert sorted(samples["class_name"].unique()) == ["BL1", "PA4"] and len(samples) == 2 * 2
    assert samples["sample_id"].tolist() == list(range(4))
    for video in sorted(part.rglob("*.mp4")):
        fa, fb = _frames(video), _frames(full / video.relative_to(part))
        assert len(fa) == len(fb) and all(np.array_equal(x, y) for x, y in zip(fa, fb, strict=True))
    csvs = {k: v for k, v in _digest(part, "*.csv").items() if k != "samples.csv"}
    assert csvs and all(_digest(full, "*.csv")[k] == v for k, v in csvs.items())
    with pytest.raises(ConfigError, match="PA9"):
        write_synthetic("biovid", tmp_path / "bad", classes=["PA9"], **kwargs)


@pytest.mark.parametrize(
    ("kind", "kwargs", "field"),
    [
        ("faces", {}, "kind"),
        ("affwild2", {"videos_per_subject": 3}, "videos_per_subject"),
        ("affwild2", {"subjects": 1}, "subjects"),
        ("biovid", {"samples_per_class": 0}, "samples_per_class"),
        ("biovid", {"frame_size": 20}, "frame_size"),
        ("biovid", {"coupling": 1.5}, "coupling"),
        ("affwild2", {"coupling": -0.5}, "coupling"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kind: str, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        write_synthetic(kind, tmp_path / "x", progress=False, **kwargs)  # type: ignore[arg-type]
