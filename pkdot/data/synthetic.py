"""Small synthetic data sets written *in the real layouts*, so the real adapters read them.

:func:`write_synthetic` writes a Biovid-like set (face videos, biosignal CSVs, ``samples.csv``) or an
Aff-Wild2-like set (videos with audio, per-frame valence/arousal), plus the truth ``synthetic_truth.parquet``
(latent responses, ``expressiveness``, ``coupling``, face ``boxes``). The modalities read one latent response,
each with its own gain and noise, the face less reliably (:func:`draw_biovid_responses`,
:func:`draw_affwild2_tracks`); Part B's corrugator EMG also follows the brow."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import cv2
import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
from scipy.ndimage import gaussian_filter1d
from scipy.signal import butter, sosfiltfilt

from pkdot.data.biovid import BIO_COLUMNS
from pkdot.data.faces_art import EXPRESSION_UNITS, FaceRenderer, blink_track, draw_subject_look, head_motion
from pkdot.data.manifest import BIOVID_CLASSES
from pkdot.errors import ConfigError
from pkdot.rundir import atomic_path, atomic_write_parquet, atomic_write_text

logger = logging.getLogger(__name__)

#: Biovid window length (seconds) and biosignal rate (Hz).
BIOVID_SECONDS = 5.5
BIOVID_FS = 512
#: Relative face / physio response of each Biovid class (BL1, PA1..PA4).
FACE_LEVEL = (0.0, 0.1, 0.3, 0.6, 1.0)
PHYSIO_LEVEL = (0.0, 0.3, 0.55, 0.8, 1.0)
#: Probability that a window of each class is a non-response (BL1: no stimulus, never a response).
NONRESPONSE = (1.0, 0.45, 0.3, 0.2, 0.12)
#: Log-sd of the latent response magnitude among responding windows.
RESPONSE_SIGMA = 0.45
#: Log-sd of each modality's reading of the latent response (the face is the noisier reader).
FACE_OBS_SIGMA = 0.35
PHYSIO_OBS_SIGMA = 0.12
#: Overall scale of the facial expression intensity (unit intensity = :data:`faces_art.UNIT_AMPLITUDE`).
FACE_GAIN = 2.0
#: Expression units of the pain display (AU4, AU6/7, AU9/10) and their weights.
PAIN_DISPLAY = {"brow_lower": 1.0, "eye_narrow": 0.8, "cheek_raise": 0.7, "lip_raise": 0.8}
#: Facial muscles saturate: the rendered intensity is ``FACE_MAX_INTENSITY * tanh(raw / FACE_MAX_INTENSITY)``
#: (it also keeps the face findable by a frontal-face detector: eyes squeezed shut defeat Haar cascades).
FACE_MAX_INTENSITY = 1.4
#: Version of the generators: part of the run's "synthetic set is up to date" marker.
GENERATOR_VERSION = 2
#: Audio sample rate of the Aff-Wild2-like videos.
AUDIO_SR = 16000
TRUTH_FILE = "synthetic_truth.parquet"
BIOVID_CHANNELS = {part: columns[1:] for part, columns in BIO_COLUMNS.items()}  # without "time"

_UNIT = {name: i for i, name in enumerate(EXPRESSION_UNITS)}


def write_synthetic(
    kind: Literal["biovid", "affwild2"],
    out: Path,
    *,
    subjects: int = 8,
    seed: int = 0,
    samples_per_class: int = 4,
    part: Literal["A", "B"] = "A",
    videos_per_subject: int = 1,
    seconds_per_video: float = 12.0,
    frame_size: int = 160,
    fps: int = 25,
    coupling: float = 1.0,
    progress: bool = True,
    classes: Sequence[str] | None = None,
    workers: int = 1,
) -> Path:
    """Write a synthetic data set in the real layout of ``kind`` under ``out`` (an empty directory); returns ``out``.
    The same ``seed`` gives byte-identical files, whatever the ``workers`` (processes writing Biovid subjects).
    ``videos_per_subject``: 1 (``video<N>``) or 2 (``video<N>_left`` / ``_right``); ``coupling`` in [0, 1]: how
    much the privileged modality and the face share one latent response (0 = independent given the label);
    ``classes``: the Biovid classes to write (each window's draws are its own: the same as in the full set)."""
    out = Path(out)
    if kind not in ("biovid", "affwild2"):
        raise ConfigError(f"synthetic kind must be 'biovid' or 'affwild2', got {kind!r}")
    if subjects < 1:
        raise ConfigError(f"synth.subjects must be >= 1, got {subjects}")
    if frame_size < 48:
        raise ConfigError(f"synth.frame_size must be >= 48 pixels, got {frame_size}")
    if fps < 1:
        raise ConfigError(f"synth.fps must be >= 1, got {fps}")
    if not 0.0 <= coupling <= 1.0:
        raise ConfigError(f"synth.coupling must be in [0, 1], got {coupling}")
    out.mkdir(parents=True, exist_ok=True)
    spec = _Synth(out, subjects, seed, frame_size, fps, coupling, progress)
    if kind == "biovid":
        if samples_per_class < 1:
            raise ConfigError(f"synth.samples_per_class must be >= 1, got {samples_per_class}")
        if part not in BIOVID_CHANNELS:
            raise ConfigError(f"data.part must be 'A' or 'B', got {part!r}")
        keep = tuple(BIOVID_CLASSES if classes is None else classes)
        if unknown := sorted(set(keep) - set(BIOVID_CLASSES)):
            raise ConfigError(f"synthetic Biovid classes {unknown}: expected some of {BIOVID_CLASSES}")
        _write_biovid(spec, samples_per_class, part, keep, workers)
    else:
        if classes is not None:
            raise ConfigError("synthetic Aff-Wild2 has no classes to choose (valence/arousal tracks)")
        if subjects < 2:
            raise ConfigError(
                f"synth.subjects must be >= 2 for Aff-Wild2 (train and validation), got {subjects}"
            )
        if videos_per_subject not in (1, 2):
            raise ConfigError(
                f"synth.videos_per_subject must be 1 or 2 for Aff-Wild2 (got {videos_per_subject}): Aff-Wild2 "
                "derives the subject from the video name, so only a _left/_right pair can share a subject"
            )
        if seconds_per_video * fps < 2:
            raise ConfigError(
                f"synth.seconds_per_video * fps must give >= 2 frames, got {seconds_per_video * fps}"
            )
        _write_affwild2(spec, videos_per_subject, seconds_per_video)
    return out


# ---- shared helpers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Synth:
    """The arguments of :func:`write_synthetic` that both layouts use."""

    out: Path
    subjects: int
    seed: int
    frame_size: int
    fps: int
    coupling: float
    progress: bool


@contextmanager
def _progress_bar(enabled: bool, total: int, description: str) -> Iterator:
    from rich import progress as rp

    columns = (
        rp.TextColumn("{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TimeRemainingColumn(),
    )
    with rp.Progress(*columns, disable=not enabled) as bar:
        task = bar.add_task(description, total=total)
        yield functools.partial(bar.advance, task)


def _spread(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """``n`` values spread evenly over [lo, hi] (one per stratum, shuffled): always some low and some high."""
    strata = (rng.permutation(n) + rng.uniform(0.0, 1.0, n)) / n
    return lo + (hi - lo) * strata


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _noise_bank(rng: np.random.Generator, frame_size: int, count: int = 24, sigma: float = 2.5) -> np.ndarray:
    return rng.normal(0.0, sigma, (count, frame_size, frame_size, 3)).astype(np.float32)


def _write_video_cv2(path: Path, frames: np.ndarray, fps: int) -> None:
    """Write RGB frames (T, H, W, 3) as MPEG-4 Part 2 (``mp4v``) with OpenCV, atomically."""
    h, w = frames.shape[1:3]
    with atomic_path(path) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter.fourcc(*"mp4v"), float(fps), (w, h))
        if not writer.isOpened():
            raise OSError(f"OpenCV could not open a mp4v VideoWriter for {tmp}")
        try:
            for frame in frames:
                writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        finally:
            writer.release()


def _write_video_av(path: Path, frames: np.ndarray, fps: int, audio: np.ndarray, sr: int) -> None:
    """Mux RGB frames (T, H, W, 3) as MPEG-4 video and mono float audio (N,) as AAC into an .mp4, atomically."""
    h, w = frames.shape[1:3]
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        vs = container.add_stream("mpeg4", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        vs.bit_rate = 2_000_000
        vs.codec_context.thread_count = 1
        aus = container.add_stream("aac", rate=sr)
        aus.layout = "mono"
        for frame in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        chunk = 1024
        for start in range(0, len(audio), chunk):
            block = np.ascontiguousarray(audio[start : start + chunk], np.float32)[None, :]
            af = av.AudioFrame.from_ndarray(block, format="fltp", layout="mono")
            af.sample_rate, af.pts, af.time_base = sr, start, Fraction(1, sr)
            for packet in aus.encode(af):
                container.mux(packet)
        for packet in aus.encode():
            container.mux(packet)


def _write_bio_csv(path: Path, time_us: np.ndarray, signals: dict[str, np.ndarray]) -> None:
    """A Biovid biosignal CSV: tab-separated, header ``time <channels>``, values rounded to 6 decimals."""
    table = pa.table({"time": time_us, **{ch: np.round(x, 6) for ch, x in signals.items()}})
    options = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(("\t".join(table.column_names) + "\n").encode())
        pcsv.write_csv(table, fh, options)


def _render(renderer: FaceRenderer, rng: np.random.Generator, expr: np.ndarray, fps: int, noise: np.ndarray):
    """Frames (T, F, F, 3) and face boxes (T, 4) of expression vectors ``expr`` (T, U) with head motion."""
    n_frames, size = len(expr), renderer.frame_size
    poses = head_motion(rng, n_frames, fps, renderer.look, size)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    boxes = np.empty((n_frames, 4), np.float64)
    picks = rng.integers(0, len(noise), n_frames)
    for i in range(n_frames):
        frames[i], boxes[i] = renderer.render(expr[i], poses[i], noise[picks[i]])
    return frames, boxes


# ---- Biovid ------------------------------------------------------------------------------------------------
def _mix(coupling: float, shared: np.ndarray, independent: np.ndarray) -> np.ndarray:
    """``k * shared + sqrt(1 - k^2) * independent``: a standard normal with correlation ``k`` to ``shared``."""
    return coupling * shared + np.sqrt(max(0.0, 1.0 - coupling**2)) * independent


def _response(class_ids: np.ndarray, gate: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """Latent response of windows: ``1[gate > Phi^-1(NONRESPONSE[c])] * exp(s z - s^2/2)`` (0 for BL1)."""
    from scipy.stats import norm

    threshold = norm.ppf(np.asarray(NONRESPONSE)[class_ids])  # +inf for BL1
    return np.where(gate > threshold, np.exp(RESPONSE_SIGMA * magnitude - RESPONSE_SIGMA**2 / 2.0), 0.0)


def draw_biovid_responses(
    rng: np.random.Generator, class_ids: np.ndarray, coupling: float
) -> dict[str, np.ndarray]:
    """Latent responses ``R = 1[responded] * exp(s z - s^2 / 2)`` of Biovid windows ``class_ids`` (N,) and each
    modality's noisy reading: (N,) ``shared_response``, ``face_latent``, ``face_response``, ``physio_response``.
    Physio reads ``R(g_s, z_s)``, the face ``R`` of the Gaussian-copula mix ``k g_s + sqrt(1 - k^2) g_i``
    (``k`` = ``coupling``: every marginal is the same at any ``k``, from the same six normals per window)."""
    if not 0.0 <= coupling <= 1.0:
        raise ConfigError(f"synth.coupling must be in [0, 1], got {coupling}")
    class_ids = np.asarray(class_ids, dtype=np.int64)
    if class_ids.ndim != 1 or (
        class_ids.size and (class_ids.min() < 0 or class_ids.max() >= len(NONRESPONSE))
    ):
        raise ConfigError(f"class_ids must be a 1-d array of Biovid class ids 0..4, got {class_ids!r}")
    n = len(class_ids)
    gate_s, mag_s, gate_i, mag_i, obs_face, obs_physio = rng.standard_normal((6, n))
    shared = _response(class_ids, gate_s, mag_s)
    face_latent = _response(class_ids, _mix(coupling, gate_s, gate_i), _mix(coupling, mag_s, mag_i))
    return {
        "shared_response": shared,
        "face_latent": face_latent,
        "face_response": face_latent * np.exp(FACE_OBS_SIGMA * obs_face - FACE_OBS_SIGMA**2 / 2.0),
        "physio_response": shared * np.exp(PHYSIO_OBS_SIGMA * obs_physio - PHYSIO_OBS_SIGMA**2 / 2.0),
    }


def _subject_names(rng: np.random.Generator, n: int) -> list[str]:
    """Biovid-style subject names ``MMDDYY_<m|w>_<age>`` (unique)."""
    names: list[str] = []
    while len(names) < n:
        month, day, year = int(rng.integers(1, 13)), int(rng.integers(1, 29)), int(rng.integers(9, 11))
        name = f"{month:02d}{day:02d}{year:02d}_{'mw'[int(rng.integers(2))]}_{int(rng.integers(18, 66))}"
        if name not in names:
            names.append(name)
    return names


def _biovid_physio(
    rng: np.random.Generator, subject: dict, level: float, onset: float, brow: np.ndarray, fps: int, part: str
) -> dict[str, np.ndarray]:
    """One 5.5 s window of biosignals at 512 Hz, ``{"gsr", "ecg", "emg_*"}``: ECG beats at a heart rate rising
    with ``level``, EDA with a stimulus-locked SCR of amplitude ``eda_gain * level``, EMG bursts."""
    fs, n = BIOVID_FS, int(round(BIOVID_SECONDS * BIOVID_FS))
    t = np.arange(n) / fs
    # ---- heart rate and ECG (beats on an extended grid so the edges have complete beats)
    pad = 1.5
    te = np.arange(int(round((BIOVID_SECONDS + 2 * pad) * fs))) / fs - pad
    drift = gaussian_filter1d(rng.normal(0.0, 1.0, len(te)), 1.0 * fs)
    hr = (
        subject["hr0"]
        + rng.normal(0.0, 3.0)
        + subject["hr_gain"] * level * _smoothstep((te - onset - 0.5) / 1.5)
        + 2.0 * np.sin(2 * np.pi * 0.25 * te + rng.uniform(0, 2 * np.pi))
        + 4.0 * drift / (drift.std() + 1e-9)
    )
    phase = rng.uniform(0, 1) + np.cumsum(hr / 60.0) / fs
    beats = te[np.flatnonzero(np.diff(np.floor(phase)) > 0) + 1]
    ecg = np.zeros(n)
    waves = (
        (-0.2, 0.12, 0.025),
        (-0.035, -0.1, 0.01),
        (0.0, 1.0, 0.012),
        (0.035, -0.22, 0.01),
        (0.26, 0.28, 0.045),
    )
    for tb in beats:
        for off, amp, width in waves:
            ecg += amp * np.exp(-0.5 * ((t - tb - off) / width) ** 2)
    ecg = (
        subject["ecg_amp"] * ecg
        + 0.05 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6.3))
        + rng.normal(0, 0.02, n)
    )

    # ---- EDA
    def scr(start: float, amplitude: float) -> np.ndarray:
        tau = np.clip(t - start, 0.0, None)
        shape = np.exp(-tau / 3.0) - np.exp(-tau / 0.7)
        return amplitude * shape / 0.4  # ~peak of the bi-exponential (t = 1.5 s) normalised to 1

    gsr = subject["eda0"] + rng.normal(0.0, 0.4) + rng.normal(0.0, 0.08) * t
    gsr = gsr + scr(onset + rng.uniform(1.0, 2.0), subject["eda_gain"] * level)
    for _ in range(int(rng.poisson(0.7))):
        gsr = gsr + scr(rng.uniform(-1.5, 4.5), rng.uniform(0.1, 0.45) * subject["eda_gain"])
    gsr = gsr + rng.normal(0.0, 0.004, n)
    # ---- EMG channels
    sos = butter(4, [20.0, 200.0], btype="bandpass", fs=fs, output="sos")
    emg_ramp = _smoothstep((t - onset) / 1.2)
    brow = np.interp(t, np.arange(len(brow)) / fps, brow)
    signals = {"gsr": gsr, "ecg": ecg}
    weight = {"emg_trapezius": 1.0, "emg_corrugator": 1.2, "emg_zygomaticus": 0.4}
    for ch in BIOVID_CHANNELS[part][2:]:
        bursts = np.clip(1.0 + 0.6 * gaussian_filter1d(rng.normal(0, 1, n), 40.0) / 0.084, 0.2, None)
        artefacts = np.zeros(n)
        for _ in range(int(rng.poisson(1.2))):
            size, centre = rng.uniform(0.3, 1.5), rng.uniform(0, BIOVID_SECONDS)
            artefacts += size * np.exp(-0.5 * ((t - centre) / 0.25) ** 2)
        drive = weight[ch] * subject["emg_gain"] * level * emg_ramp * bursts + artefacts
        if ch == "emg_corrugator":
            drive = drive + 2.0 * brow
        carrier = sosfiltfilt(sos, rng.normal(0.0, 1.0, n))
        signals[ch] = subject["emg0"] * carrier * (1.0 + drive) + rng.normal(0.0, 0.3, n)
    return signals


def _biovid_subject(
    spec: _Synth, per_class: int, part: str, noise: np.ndarray, keep: tuple[str, ...], job: tuple
) -> tuple[list[str], list[dict]]:
    """Write one subject's windows (``job``: index, name, expressiveness, reactivity); returns its
    ``samples.csv`` rows (``{id}`` left to fill) and truth rows. One job of the writer's process pool."""
    out, seed, fps, coupling = spec.out, spec.seed, spec.fps, spec.coupling
    s_idx, name, expressiveness, reactivity = job
    n_frames = int(round(BIOVID_SECONDS * fps))
    time_us = np.round(np.arange(int(round(BIOVID_SECONDS * BIOVID_FS))) * 1e6 / BIOVID_FS).astype(np.int64)
    channels = BIOVID_CHANNELS[part]
    srng = np.random.default_rng([seed, 2, s_idx])
    look = draw_subject_look(srng, expressiveness)
    renderer = FaceRenderer(look, spec.frame_size)
    subject = {
        "reactivity": reactivity,
        "hr0": srng.uniform(58, 85),
        "hr_gain": srng.uniform(5, 12),
        "ecg_amp": srng.uniform(0.6, 1.4),
        "eda0": srng.uniform(2.0, 12.0),
        "eda_gain": srng.uniform(0.4, 1.2),
        "emg0": srng.uniform(3.0, 10.0),
        "emg_gain": srng.uniform(0.5, 1.5),
    }
    session = [c for _ in range(per_class) for c in range(len(BIOVID_CLASSES))]  # class of each window
    order = srng.permutation(len(session))
    responses = draw_biovid_responses(np.random.default_rng([seed, 4, s_idx]), np.array(session), coupling)
    rows: list[str] = []
    truth: list[dict] = []
    for position, idx in enumerate(order):
        class_id = session[int(idx)]
        class_name = BIOVID_CLASSES[class_id]
        if class_name not in keep:  # its draws are its own (seeded by the sample): the others are unchanged
            continue
        sample_name = f"{name}-{class_name}-{position + 1:03d}"
        prng = np.random.default_rng([seed, 3, s_idx, int(idx)])
        onset = float(prng.uniform(0.8, 1.8))
        face_response = float(responses["face_response"][idx])
        physio_response = float(responses["physio_response"][idx])
        raw_intensity = FACE_GAIN * look.expressiveness * FACE_LEVEL[class_id] * face_response
        intensity = FACE_MAX_INTENSITY * float(np.tanh(raw_intensity / FACE_MAX_INTENSITY))
        level = PHYSIO_LEVEL[class_id] * subject["reactivity"] * physio_response
        t = np.arange(n_frames) / fps
        ramp = _smoothstep((t - onset) / float(prng.uniform(0.8, 1.5)))
        ramp = ramp * (1.0 + 0.08 * np.sin(2 * np.pi * 0.7 * t + prng.uniform(0, 6.3)))
        expr = np.zeros((n_frames, len(EXPRESSION_UNITS)), np.float32)
        for unit, weight in PAIN_DISPLAY.items():
            expr[:, _UNIT[unit]] = weight * intensity * ramp
        # label-free nuisances: a frown of concentration in some windows, small movements, blinks
        if prng.uniform() < 0.25:
            frown = look.expressiveness * prng.uniform(0.2, 0.5)
            bump = np.exp(-0.5 * ((t - prng.uniform(0.0, BIOVID_SECONDS)) / prng.uniform(0.4, 1.0)) ** 2)
            expr[:, _UNIT["brow_lower"]] += frown * bump
            expr[:, _UNIT["eye_narrow"]] += 0.6 * frown * bump
        for unit in ("mouth_corner_up", "brow_raise"):
            expr[:, _UNIT[unit]] += 0.2 * gaussian_filter1d(prng.normal(0, 1, n_frames), fps * 0.6) / 0.3
        expr[:, _UNIT["eye_narrow"]] = np.minimum(
            expr[:, _UNIT["eye_narrow"]] + 1.6 * blink_track(prng, n_frames, fps), 2.2
        )
        frames, boxes = _render(renderer, prng, expr, fps, noise)
        video_rel = Path("video") / name / f"{sample_name}.mp4"
        _write_video_cv2(out / video_rel, frames, fps)
        signals = _biovid_physio(prng, subject, level, onset, expr[:, _UNIT["brow_lower"]], fps, part)
        bio_path = out / "biosignals_filtered" / name / f"{sample_name}_bio.csv"
        _write_bio_csv(bio_path, time_us, {ch: signals[ch] for ch in channels})
        rows.append(f"{s_idx}\t{name}\t{class_id}\t{class_name}\t{{id}}\t{sample_name}")
        truth.append(
            {
                "sample_id": sample_name,
                "subject_id": name,
                "expressiveness": look.expressiveness,
                "reactivity": subject["reactivity"],
                "class_id": class_id,
                "coupling": float(coupling),
                "shared_response": float(responses["shared_response"][idx]),
                "face_response": face_response,
                "physio_response": physio_response,
                "face_intensity": intensity,
                "physio_level": level,
                "onset_s": onset,
                "video": video_rel.as_posix(),
                "boxes": boxes.tolist(),
            }
        )
    return rows, truth


def _write_biovid(spec: _Synth, per_class: int, part: str, classes: tuple[str, ...], workers: int) -> None:
    out, subjects = spec.out, spec.subjects
    rng = np.random.default_rng([spec.seed, 1])
    names = _subject_names(rng, subjects)
    expressiveness = 0.1 + 0.9 * _spread(rng, subjects, 0.0, 1.0) ** 1.5  # skewed low
    reactivity = _spread(rng, subjects, 0.4, 1.0)
    noise = _noise_bank(rng, spec.frame_size)
    jobs = [(s, name, float(expressiveness[s]), float(reactivity[s])) for s, name in enumerate(names)]
    draw = functools.partial(_biovid_subject, spec, per_class, part, noise, classes)
    sample_rows: list[str] = ["subject_id\tsubject_name\tclass_id\tclass_name\tsample_id\tsample_name"]
    truth: list[dict] = []
    per_subject = per_class * len(classes)
    with _progress_bar(spec.progress, subjects * per_subject, "synthetic Biovid") as advance:
        # every subject's draws are seeded by the subject: the files are the same whatever the worker count
        for rows, subject_truth in _map_subjects(draw, jobs, workers):
            for row in rows:
                sample_rows.append(row.replace("{id}", str(len(sample_rows) - 1)))
            truth.extend(subject_truth)
            advance(per_subject)
    atomic_write_text(out / "samples.csv", "\n".join(sample_rows) + "\n")
    atomic_write_parquet(pa.Table.from_pylist(truth), out / TRUTH_FILE)
    logger.info("synthetic Biovid part %s: %d subjects, %d samples -> %s", part, subjects, len(truth), out)


def _map_subjects(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterator[Any]:
    """``fn`` over ``jobs`` in order, in ``workers`` processes (spawned: the caller may hold threads) when > 1."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=spawn) as pool:
        yield from pool.map(fn, jobs)


# ---- Aff-Wild2 ---------------------------------------------------------------------------------------------
#: Smoothing (seconds) of the latent valence/arousal processes and of each modality's own noise.
VA_SMOOTH_S = 1.2
VA_NOISE_SMOOTH_S = 0.4
#: Amplitude of the face's / the voice's own slow noise on valence and arousal (the voice reads more cleanly).
FACE_VA_NOISE = 0.2
AUDIO_VA_NOISE = 0.1
#: Longest lag (seconds) of a modality behind the latent valence/arousal.
MAX_VA_LAG_S = 1.0


def _smooth_normal(rng: np.random.Generator, n: int, fps: int, sigma_s: float) -> np.ndarray:
    """(n,) Gaussian-smoothed white noise (sigma ``sigma_s`` seconds), standardised to mean 0 and sd 1."""
    pad = int(np.ceil(2 * sigma_s * fps))
    z = gaussian_filter1d(rng.normal(0.0, 1.0, n + 2 * pad), sigma_s * fps, mode="reflect")[pad : pad + n]
    return (z - z.mean()) / (z.std() + 1e-9)


def draw_affwild2_tracks(
    rng: np.random.Generator,
    n_frames: int,
    fps: int,
    coupling: float,
    *,
    mean_valence: float = 0.0,
    mean_arousal: float = 0.0,
    face_lag_s: float = 0.2,
    audio_lag_s: float = 0.35,
) -> dict[str, np.ndarray]:
    """Latent valence/arousal ``tanh(0.7 z + mean)`` of one video (the labels) and the face's (``face_lag_s``
    late) and the voice's (``audio_lag_s`` late, reading the ``coupling``-mix) noisy readings, clipped to
    [-1, 1]: (n_frames,) arrays ``valence``, ``arousal``, ``face_*``, ``audio_*``."""
    if not 0.0 <= coupling <= 1.0:
        raise ConfigError(f"synth.coupling must be in [0, 1], got {coupling}")
    for name, lag in (("face_lag_s", face_lag_s), ("audio_lag_s", audio_lag_s)):
        if not 0.0 <= lag <= MAX_VA_LAG_S:
            raise ConfigError(f"{name} must be in [0, {MAX_VA_LAG_S}] seconds, got {lag}")
    pad = int(np.ceil(MAX_VA_LAG_S * fps)) + 1
    n_ext = n_frames + pad
    # the first `pad` frames precede the video: lagged readings see them
    t_ext = (np.arange(n_ext) - pad) / fps
    t = np.arange(n_frames) / fps
    out: dict[str, np.ndarray] = {}
    for dim, mean in (("valence", mean_valence), ("arousal", mean_arousal)):
        z, z_independent = (_smooth_normal(rng, n_ext, fps, VA_SMOOTH_S) for _ in range(2))
        face_noise, audio_noise = (_smooth_normal(rng, n_frames, fps, VA_NOISE_SMOOTH_S) for _ in range(2))
        latent = np.tanh(0.7 * z + mean)
        voice_latent = np.tanh(0.7 * _mix(coupling, z, z_independent) + mean)
        out[dim] = np.interp(t, t_ext, latent)
        out[f"face_{dim}"] = np.clip(
            np.interp(t - face_lag_s, t_ext, latent) + FACE_VA_NOISE * face_noise, -1, 1
        )
        out[f"audio_{dim}"] = np.clip(
            np.interp(t - audio_lag_s, t_ext, voice_latent) + AUDIO_VA_NOISE * audio_noise, -1, 1
        )
    return out


def _voice(
    rng: np.random.Generator, valence: np.ndarray, arousal: np.ndarray, fps: int, f0: float
) -> np.ndarray:
    """Mono audio at :data:`AUDIO_SR`: a harmonic tone, pitch and loudness rising with arousal, tilt with valence."""
    n = int(round(len(arousal) / fps * AUDIO_SR))
    ta = np.arange(n) / AUDIO_SR
    tf = np.arange(len(arousal)) / fps
    a, v = np.interp(ta, tf, arousal), np.interp(ta, tf, valence)
    pitch = f0 * 2.0 ** (0.5 * a)
    phase = 2 * np.pi * np.cumsum(pitch) / AUDIO_SR
    tilt = 1.6 - 0.6 * v
    tone = sum(np.sin(k * phase) / k**tilt for k in range(1, 7))
    syllables = gaussian_filter1d((rng.uniform(0, 1, int(ta[-1] * 5) + 2) > 0.35).astype(float), 0.6)
    gate = np.interp(ta, np.arange(len(syllables)) / 5.0, syllables)
    loud = 0.04 + 0.22 * (a + 1.0) / 2.0
    audio = loud * gate * tone / 2.0 + rng.normal(0.0, 0.01, n)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def _write_affwild2(spec: _Synth, per_subject: int, seconds: float) -> None:
    out, subjects, seed, fps, coupling = spec.out, spec.subjects, spec.seed, spec.fps, spec.coupling
    rng = np.random.default_rng([seed, 11])
    expressiveness = _spread(rng, subjects, 0.0, 1.0)
    n_val = max(1, int(round(0.25 * subjects)))
    validation = set(rng.permutation(subjects)[:n_val].tolist())
    n_frames = int(round(seconds * fps))
    noise = _noise_bank(rng, spec.frame_size)
    ann_root = out / "annotations" / "VA_Estimation_Challenge"
    truth: list[dict] = []
    with _progress_bar(spec.progress, subjects * per_subject, "synthetic Aff-Wild2") as advance:
        for s_idx in range(subjects):
            srng = np.random.default_rng([seed, 12, s_idx])
            look = draw_subject_look(srng, float(expressiveness[s_idx]))
            renderer = FaceRenderer(look, spec.frame_size)
            f0 = float(srng.uniform(110, 230))
            mean_v, mean_a = float(srng.uniform(-0.3, 0.3)), float(srng.uniform(-0.3, 0.3))
            lags = {"face_lag_s": float(srng.uniform(0.1, 0.3)), "audio_lag_s": float(srng.uniform(0.2, 0.5))}
            subject_id = f"video{s_idx + 1}"
            stems = [subject_id] if per_subject == 1 else [f"{subject_id}_left", f"{subject_id}_right"]
            partition = "Validation_Set" if s_idx in validation else "Train_Set"
            for v_idx, stem in enumerate(stems):
                vrng = np.random.default_rng([seed, 13, s_idx, v_idx])
                tracks = draw_affwild2_tracks(
                    vrng, n_frames, fps, coupling, mean_valence=mean_v, mean_arousal=mean_a, **lags
                )
                face_v, face_a = tracks["face_valence"], tracks["face_arousal"]
                e = look.expressiveness
                expr = np.zeros((n_frames, len(EXPRESSION_UNITS)), np.float32)
                expr[:, _UNIT["mouth_corner_up"]] = 1.2 * e * face_v
                expr[:, _UNIT["brow_lower"]] = 0.6 * e * np.clip(-face_v, 0.0, None)
                expr[:, _UNIT["brow_raise"]] = 0.9 * e * face_a
                expr[:, _UNIT["eye_narrow"]] = np.minimum(
                    -0.6 * e * face_a + 1.6 * blink_track(vrng, n_frames, fps), 2.2
                )
                frames, boxes = _render(renderer, vrng, expr, fps, noise)
                audio = _voice(vrng, tracks["audio_valence"], tracks["audio_arousal"], fps, f0)
                video_rel = Path("videos") / f"{stem}.mp4"
                _write_video_av(out / video_rel, frames, fps, audio, AUDIO_SR)
                annotated = np.ones(n_frames, bool)
                for _ in range(int(vrng.integers(1, 3))):
                    length = int(vrng.integers(3, max(4, min(25, n_frames // 4))))
                    start = int(vrng.integers(0, max(1, n_frames - length)))
                    annotated[start : start + length] = False
                lines = ["valence,arousal"] + [
                    f"{va:.3f},{ar:.3f}" if ok else "-5,-5"
                    for va, ar, ok in zip(tracks["valence"], tracks["arousal"], annotated, strict=True)
                ]
                atomic_write_text(ann_root / partition / f"{stem}.txt", "\n".join(lines) + "\n")
                truth.append(
                    {
                        "sample_id": stem,
                        "subject_id": subject_id,
                        "expressiveness": e,
                        "partition": partition,
                        "video": video_rel.as_posix(),
                        "coupling": float(coupling),
                        **lags,
                        **{key: track.tolist() for key, track in tracks.items()},
                        "annotated": annotated.tolist(),
                        "boxes": boxes.tolist(),
                    }
                )
                advance()
    for partition in ("Train_Set", "Validation_Set"):
        (ann_root / partition).mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(pa.Table.from_pylist(truth), out / TRUTH_FILE)
    logger.info("synthetic Aff-Wild2: %d subjects x %d videos -> %s", subjects, per_subject, out)
