"""Tiny media fixtures for the feature tests: face videos (with or without audio) and biosignal CSVs.

The face is the public-domain NASA portrait ``skimage.data.astronaut()`` (ships offline), pasted at a known
place on a textured background, so tests know where the face is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import av
import cv2
import numpy as np
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# The astronaut portrait region we paste (rows 20:230, cols 120:300 of the 512x512 image) and, inside it,
# the face box OpenCV's frontal Haar cascade finds on the full image: (177, 66, 95, 95) -> offset (57, 46).
_REGION = (20, 230, 120, 300)
_FACE_IN_REGION = (57.0, 46.0, 95.0, 95.0)


@dataclass
class FaceVideo:
    path: Path
    fps: int
    n_frames: int
    boxes: np.ndarray  # (n_frames, 4) where the face is, x y w h in frame pixels


def astronaut_region() -> np.ndarray:
    from skimage import data

    r0, r1, c0, c1 = _REGION
    return data.astronaut()[r0:r1, c0:c1]


def background(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = cv2.resize(
        rng.integers(40, 200, (8, 8, 3), dtype=np.uint8), (size, size), interpolation=cv2.INTER_CUBIC
    )
    return base


def face_frames(
    n_frames: int, size: int = 160, face_width: int = 80, drift: float = 0.2, seed: int = 0, face: bool = True
):
    """Frames (n, size, size, 3) RGB with the astronaut pasted, drifting right by ``drift`` px/frame."""
    region = astronaut_region()
    scale = face_width / region.shape[1]
    patch = cv2.resize(
        region, (face_width, int(round(region.shape[0] * scale))), interpolation=cv2.INTER_AREA
    )
    bg = background(size, seed)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    boxes = np.zeros((n_frames, 4), np.float64)
    for i in range(n_frames):
        frame = bg.copy()
        x = int(round((size - face_width) / 2 - 10 + drift * i))
        y = max(0, (size - patch.shape[0]) // 2 - 5)
        if face:
            h = min(patch.shape[0], size - y)
            frame[y : y + h, x : x + face_width] = patch[:h]
        frames[i] = frame
        fx, fy, fw, fh = _FACE_IN_REGION
        boxes[i] = (x + fx * scale, y + fy * scale, fw * scale, fh * scale)
    return frames, boxes


def write_video(
    path: Path, frames: np.ndarray, fps: int = 25, audio: np.ndarray | None = None, sr: int = 16000
) -> Path:
    """An MP4 (MPEG-4 part 2) with PyAV; ``audio`` (channels, samples) float32 adds an AAC track."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        vs = container.add_stream("mpeg4", rate=fps)
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "yuv420p"
        vs.options = {"qscale": "3"}
        aus = None
        if audio is not None:
            aus = container.add_stream("aac", rate=sr)
            aus.layout = "stereo" if audio.shape[0] == 2 else "mono"
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(p)
        for p in vs.encode():
            container.mux(p)
        if aus is not None:
            pts = 0
            for k in range(0, audio.shape[1], 1024):
                chunk = np.ascontiguousarray(audio[:, k : k + 1024], dtype=np.float32)
                fr = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=aus.layout.name)
                fr.sample_rate, fr.pts = sr, pts
                pts += chunk.shape[1]
                for p in aus.encode(fr):
                    container.mux(p)
            for p in aus.encode():
                container.mux(p)
    return path


def write_video_cv2(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    """A silent MP4 with OpenCV's VideoWriter ('mp4v'), as the issue describes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(
        str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1])
    )
    for f in frames:
        writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def face_video(
    path: Path,
    seconds: float = 5.5,
    fps: int = 25,
    size: int = 160,
    audio: bool = False,
    face: bool = True,
    seed: int = 0,
    tone_hz: float = 440.0,
) -> FaceVideo:
    n = int(round(seconds * fps))
    frames, boxes = face_frames(n, size=size, seed=seed, face=face)
    track = None
    if audio:
        sr = 16000
        t = np.arange(int(seconds * sr)) / sr
        y = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
        track = np.stack([y, 0.5 * y])
    write_video(path, frames, fps=fps, audio=track)
    return FaceVideo(path, fps, n, boxes)


def biosignals(
    fs: float = 512.0, seconds: float = 5.5, heart_bpm: float = 72.0, seed: int = 0, part: str = "A"
) -> dict[str, np.ndarray]:
    """Plausible GSR (slow rise), ECG (R-peak train), EMG (noise bursts) channels."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fs))
    t = np.arange(n) / fs
    gsr = 5.0 + 0.2 * t + 0.02 * rng.standard_normal(n)
    ecg = 0.02 * rng.standard_normal(n)
    for beat in np.arange(0.3, seconds, 60.0 / heart_bpm):
        ecg += 1.0 * np.exp(-0.5 * ((t - beat) / 0.012) ** 2) - 0.15 * np.exp(
            -0.5 * ((t - beat - 0.25) / 0.04) ** 2
        )
    out = {
        "gsr": gsr,
        "ecg": ecg,
        "emg_trapezius": 0.05 * rng.standard_normal(n) * (1 + (np.sin(2 * np.pi * 0.7 * t) > 0)),
    }
    if part == "B":
        out["emg_corrugator"] = 0.03 * rng.standard_normal(n)
        out["emg_zygomaticus"] = 0.03 * rng.standard_normal(n)
    return out


def write_bio_csv(
    path: Path, signals: dict[str, np.ndarray], fs: float = 512.0, unit: str = "us", sep: str = "\t"
) -> Path:
    """A Biovid-like biosignal CSV: integer ``time`` (us), then the channels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(signals.values())))
    scale = {"us": 1e6, "ms": 1e3, "s": 1.0}[unit]
    time = np.arange(n) / fs * scale
    time = np.round(time).astype(np.int64) if unit == "us" else time
    cols = {"time": time, **signals}
    lines = [sep.join(cols)]
    for i in range(n):
        lines.append(
            sep.join(
                "" if (not isinstance(v[i], np.integer) and np.isnan(v[i])) else str(v[i])
                for v in cols.values()
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def media() -> SimpleNamespace:
    """The helpers above, for tests (the importlib import mode keeps test modules from importing each other)."""
    return SimpleNamespace(
        face_frames=face_frames,
        write_video=write_video,
        write_video_cv2=write_video_cv2,
        face_video=face_video,
        biosignals=biosignals,
        write_bio_csv=write_bio_csv,
        astronaut_region=astronaut_region,
    )


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray (2 CPUs) shared by the tests of a module."""
    import ray

    from pkdot.ray_utils import ensure_ray

    started = ensure_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def face_clips(path, clips, features) -> list:
    """The clips of one video or face-crop folder, as :func:`pkdot.features.faces.extract_faces` gives them."""
    from pkdot.features import faces

    return [clip for _, clip in faces.extract_faces([(path, clips)], features, faces.FaceDetector(features))]
