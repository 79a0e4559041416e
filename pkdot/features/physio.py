"""Physiological windows of Biovid samples: read, check quality, filter, cut, spectrogram, descriptors.

A ``<sample>_bio.csv`` has ``time`` (us, ms or s, from the step), ``gsr``, ``ecg``, ``emg_trapezius`` (part B
also ``emg_corrugator``, ``emg_zygomaticus``). The rate must be within 2 % of ``features.physio_fs``; NaN runs
up to ``max_nan_gap_s`` are interpolated, longer ones or a flat channel quarantine the sample; zero-phase
Butterworth filters; the ``physio_window`` is z-scored per channel (``window`` (C, L)), ``spectrogram``
(C, F, T) = ``log(S + 1e-10)``; descriptors from the filtered window (NaN without their channel)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import signal

from pkdot.config import FeatureConfig
from pkdot.errors import ConfigError, FeatureError
from pkdot.tables import sniff_delimiter

CHANNELS_BY_PART: dict[str, list[str]] = {
    "A": ["gsr", "ecg", "emg_trapezius"],
    "B": ["gsr", "ecg", "emg_trapezius", "emg_corrugator", "emg_zygomaticus"],
}
#: Channel -> signal kind (decides the filter and the descriptor it feeds).
CHANNEL_KIND: dict[str, str] = {"gsr": "eda", "ecg": "ecg"} | dict.fromkeys(CHANNELS_BY_PART["B"][2:], "emg")
RATE_TOLERANCE = 0.02
#: A channel is flagged as clipped when more than this fraction of its samples sit at its min or max.
CLIP_FRACTION = 0.01
#: Runs of identical consecutive values longer than this (seconds) are flagged as a flat stretch.
FLAT_RUN_S = 0.5
LOG_EPS = 1e-10


@dataclass
class ChannelQuality:
    """Quality measurements of one channel of a recording (before interpolation)."""

    nan_runs: int = 0
    longest_nan_run_s: float = 0.0
    nan_fraction: float = 0.0
    interpolated: int = 0
    flat: bool = False
    longest_flat_run_s: float = 0.0
    clipped_fraction: float = 0.0

    @property
    def flags(self) -> list[str]:
        checks = {
            "nan": self.nan_runs > 0,
            "flat": self.flat,
            "flat_run": not self.flat and self.longest_flat_run_s > FLAT_RUN_S,
            "clipped": self.clipped_fraction > CLIP_FRACTION,
        }
        return [flag for flag, on in checks.items() if on]

    def as_dict(self) -> dict[str, Any]:
        """The flags and every field (fractions rounded to 6 decimals, seconds to 4)."""
        fields = {
            k: round(v, 6 if k.endswith("fraction") else 4) if isinstance(v, float) else v
            for k, v in dataclasses.asdict(self).items()
        }
        return {"flags": self.flags, **fields}


@dataclass
class PhysioFeatures:
    """The physio row of one sample: ``window`` (C, L) and ``spectrogram`` (C, F, T) float32, descriptors."""

    sample_id: str
    window: np.ndarray
    spectrogram: np.ndarray
    channels: list[str]
    eda_level: float
    eda_slope: float
    heart_rate: float
    emg_rms: float


@dataclass
class PhysioOutcome:
    """Features, or the reason the sample is quarantined; quality flags in both cases."""

    sample_id: str
    features: PhysioFeatures | None = None
    reason: str | None = None
    quality: dict[str, ChannelQuality] = field(default_factory=dict)
    fs: float | None = None
    seconds: float | None = None  # the recording's duration: rows / rate


def resolve_channels(features: FeatureConfig, part: str) -> list[str]:
    """``features.physio_channels`` or every channel of the Biovid ``part``; unknown names raise ConfigError."""
    channels = list(features.physio_channels) if features.physio_channels else list(CHANNELS_BY_PART[part])
    if unknown := [c for c in channels if c not in CHANNEL_KIND]:
        raise ConfigError(
            f"features.physio_channels: unknown channels {unknown} (expected some of {list(CHANNEL_KIND)})"
        )
    if len(set(channels)) != len(channels):
        raise ConfigError(f"features.physio_channels has duplicates: {channels}")
    return channels


def window_length(features: FeatureConfig) -> int:
    """Samples ``L`` of the analysis window (fixed, so rows stack)."""
    lo, hi = features.physio_window
    return int(round((hi - lo) * features.physio_fs))


def check_settings(features: FeatureConfig, part: str) -> None:
    """Fail before any work on settings that cannot produce a spectrogram or a valid filter."""
    resolve_channels(features, part)
    if (length := window_length(features)) < features.spec_nperseg:
        raise ConfigError(
            f"features.physio_window {features.physio_window} gives {length} samples at {features.physio_fs} Hz, "
            f"fewer than features.spec_nperseg ({features.spec_nperseg})"
        )
    if features.physio_fs / 2 <= 40.0:
        raise ConfigError(
            f"features.physio_fs {features.physio_fs} Hz is too low for the ECG band (0.5-40 Hz)"
        )


# ---- reading -----------------------------------------------------------------------------------------------
def read_biosignals(path: str | Path) -> pd.DataFrame:
    """Read a biosignal CSV (tab, comma, semicolon or whitespace separated); column names lower-cased."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"biosignal file {path} does not exist")
    try:
        with open(path, newline="") as fh:
            header = fh.readline()
    except UnicodeDecodeError as exc:
        raise FeatureError(f"biosignal file {path} is not a text CSV ({exc})") from exc
    if not header.strip():
        raise FeatureError(f"biosignal file {path} is empty (expected a header line 'time gsr ecg ...')")
    if (delimiter := sniff_delimiter(header, "\t,; ")) is None:
        raise FeatureError(
            f"biosignal file {path}: cannot tell the delimiter of the header {header.strip()!r}"
        )
    sep = r"\s+" if delimiter == " " else delimiter
    try:
        frame = pd.read_csv(path, sep=sep, engine="c" if sep != r"\s+" else "python")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise FeatureError(f"biosignal file {path} is not a readable CSV: {exc}") from exc
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if "time" not in frame.columns:
        raise FeatureError(f"biosignal file {path}: no 'time' column (columns: {list(frame.columns)})")
    return frame


def non_numeric_cell(frame: pd.DataFrame, columns: list[str]) -> str | None:
    """Where a text value sits in a numeric column (``"line L, column 'c': 'x' is not a number"``, L 1-based
    with the header), or None. Empty cells and pandas' NA tokens are missing values (NaN runs), not errors."""
    found: list[tuple[int, str, str]] = []
    total = 0
    for name in columns:
        raw = frame[name]
        if raw.dtype != object:
            continue
        bad = pd.to_numeric(raw, errors="coerce").isna() & raw.notna()
        if bad.any():
            total += int(bad.sum())
            i = int(np.flatnonzero(bad.to_numpy())[0])
            found.append((i + 2, name, str(raw.iloc[i])))
    if not found:
        return None
    line, name, value = min(found)
    more = f" ({total} non-numeric cells in all)" if total > 1 else ""
    return f"line {line}, column {name!r}: {value!r} is not a number{more}"


def infer_time_unit(step: float) -> tuple[str, float]:
    """The unit of a time column from its median step: ``("us", 1e-6)`` for steps >= 50 (rates up to 20 kHz),
    ``("ms", 1e-3)`` for steps in [0.05, 50), else ``("s", 1.0)``."""
    if step >= 50:
        return "us", 1e-6
    if step >= 0.05:
        return "ms", 1e-3
    return "s", 1.0


def sampling_rate(time: np.ndarray) -> float:
    """Hz from a timestamp column (unit inferred by :func:`infer_time_unit`)."""
    t = np.asarray(time, dtype=np.float64)
    if len(t) < 2 or not np.isfinite(t).all():
        raise FeatureError("time column has fewer than two samples or non-finite values")
    steps = np.diff(t)
    if (steps <= 0).any():
        raise FeatureError(
            f"time column is not strictly increasing (first bad step at row {int(np.argmax(steps <= 0)) + 1})"
        )
    step = float(np.median(steps))
    return 1.0 / (step * infer_time_unit(step)[1])


# ---- quality -----------------------------------------------------------------------------------------------
def _runs(mask: np.ndarray) -> np.ndarray:
    """Lengths of the runs of True in a boolean array."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges[1::2] - edges[::2]


def channel_quality(x: np.ndarray, fs: float) -> ChannelQuality:
    """NaN runs, flatness and clipping of one channel (samples ``x``, rate ``fs``)."""
    nan = ~np.isfinite(x)
    runs = _runs(nan)
    q = ChannelQuality(len(runs), float(runs.max() / fs) if len(runs) else 0.0, float(nan.mean()))
    finite = x[~nan]
    if len(finite) < 2 or float(np.ptp(finite)) == 0.0:
        q.flat = True
        q.longest_flat_run_s = len(x) / fs
        return q
    same = np.concatenate([[False], np.diff(finite) == 0])
    flat_runs = _runs(same)
    q.longest_flat_run_s = float((flat_runs.max() + 1) / fs) if len(flat_runs) else 0.0
    q.clipped_fraction = float(((finite == finite.min()) | (finite == finite.max())).mean())
    return q


# ---- filtering and features ---------------------------------------------------------------------------------
def design_filter(kind: str, fs: float) -> np.ndarray:
    """Second-order sections of the Butterworth filter for a signal kind (``eda``, ``ecg``, ``emg``) at ``fs``."""
    nyquist = fs / 2.0
    if kind == "eda":
        return signal.butter(4, min(2.0, 0.9 * nyquist), btype="lowpass", fs=fs, output="sos")
    if kind == "ecg":
        return signal.butter(4, [0.5, min(40.0, 0.9 * nyquist)], btype="bandpass", fs=fs, output="sos")
    if kind == "emg":
        high = min(250.0, 0.9 * nyquist)
        if high <= 20.0:
            raise ConfigError(f"features.physio_fs {fs} Hz is too low for the EMG band (20-250 Hz)")
        return signal.butter(4, [20.0, high], btype="bandpass", fs=fs, output="sos")
    raise ConfigError(f"unknown physiological signal kind {kind!r} (expected eda, ecg or emg)")


def heart_rate(ecg: np.ndarray, fs: float) -> float:
    """Beats per minute from R peaks of a filtered ECG: ``60 / median(RR)``; NaN with fewer than two peaks.
    R peaks are the largest deviations (either polarity), >= 0.3 s apart, with a prominence of at least half
    the 99.5th-percentile excursion."""
    x = ecg - np.median(ecg)
    if abs(np.percentile(x, 0.5)) > abs(np.percentile(x, 99.5)):
        x = -x
    top = float(np.percentile(x, 99.5))
    if top <= 0:
        return float("nan")
    peaks, _ = signal.find_peaks(x, distance=max(1, int(0.3 * fs)), prominence=0.5 * top)
    return float(60.0 / np.median(np.diff(peaks) / fs)) if len(peaks) >= 2 else float("nan")


def extract_physio(
    sample_id: str, path: str | Path, features: FeatureConfig, part: str = "A"
) -> PhysioOutcome:
    """Read, check, filter and window one biosignal file; never raises for a bad recording (see ``reason``)."""
    path = Path(path)
    channels = resolve_channels(features, part)
    fs = features.physio_fs
    outcome = PhysioOutcome(sample_id)
    try:
        frame = read_biosignals(path)
        if missing := [c for c in channels if c not in frame.columns]:
            raise FeatureError(
                f"biosignal file {path}: missing channels {missing} (columns: {list(frame.columns)})"
            )
        if not_numeric := non_numeric_cell(frame, ["time", *channels]):
            raise FeatureError(f"biosignal file {path}: {not_numeric}")
        try:
            outcome.fs = sampling_rate(frame["time"].to_numpy(dtype=np.float64))
        except FeatureError as exc:
            raise FeatureError(f"biosignal file {path}: {exc}") from None
    except FeatureError as exc:
        outcome.reason = str(exc)
        return outcome
    except (ValueError, TypeError) as exc:  # non-numeric time column
        outcome.reason = f"biosignal file {path}: time column is not numeric ({exc})"
        return outcome
    if abs(outcome.fs - fs) > RATE_TOLERANCE * fs:
        outcome.reason = f"biosignal file {path}: sampling rate {outcome.fs:.4g} Hz, expected {fs:.4g} Hz"
        return outcome
    time_s = frame["time"].to_numpy(dtype=np.float64)
    time_s = (time_s - time_s[0]) * infer_time_unit(float(np.median(np.diff(time_s))))[1]
    outcome.seconds = len(time_s) / outcome.fs

    signals: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for name in channels:
        x = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64)
        q = outcome.quality[name] = channel_quality(x, fs)
        if q.flat:
            problems.append(f"channel {name} is flat (constant or empty)")
        elif q.longest_nan_run_s > features.max_nan_gap_s:
            problems.append(
                f"channel {name} has a NaN run of {q.longest_nan_run_s:.3g} s (max_nan_gap_s {features.max_nan_gap_s} s)"
            )
        else:  # linear interpolation over the NaN samples (constant at the edges)
            nan = ~np.isfinite(x)
            q.interpolated = int(nan.sum())
            signals[name] = np.where(nan, np.interp(np.arange(len(x)), np.flatnonzero(~nan), x[~nan]), x)
    if problems:
        outcome.reason = f"biosignal file {path}: " + "; ".join(problems)
        return outcome

    lo, hi = features.physio_window
    length = window_length(features)
    start = int(np.searchsorted(time_s, lo - 0.5 / fs))
    if start + length > len(time_s):
        outcome.reason = (
            f"biosignal file {path} is {len(time_s) / fs:.3g} s long; physio_window {lo}-{hi} s needs "
            f"{start + length} samples, it has {len(time_s)}"
        )
        return outcome

    filtered = {
        c: signal.sosfiltfilt(design_filter(CHANNEL_KIND[c], fs), signals[c])[start : start + length]
        for c in channels
    }
    window = np.stack([filtered[c] for c in channels])
    std = window.std(axis=1, keepdims=True)
    tiny = 1e-12 * max(1.0, float(np.abs(window).max()))
    if flat_in_window := [c for c, s in zip(channels, std[:, 0], strict=True) if s <= tiny]:
        outcome.reason = (
            f"biosignal file {path}: channels {flat_in_window} are flat within physio_window {lo}-{hi} s"
        )
        return outcome
    z = ((window - window.mean(axis=1, keepdims=True)) / std).astype(np.float32)
    _, _, power = signal.spectrogram(
        z, fs=fs, nperseg=features.spec_nperseg, noverlap=features.spec_noverlap, nfft=features.spec_nfft
    )
    spectrogram = np.log(power + LOG_EPS).astype(np.float32)

    t = np.arange(length) / fs
    eda, ecg, emg = ([filtered[c] for c in channels if CHANNEL_KIND[c] == k] for k in ("eda", "ecg", "emg"))
    outcome.features = PhysioFeatures(
        sample_id=sample_id,
        window=z,
        spectrogram=spectrogram,
        channels=channels,
        eda_level=float(np.mean(eda[0])) if eda else float("nan"),
        eda_slope=float(np.polyfit(t, eda[0], 1)[0]) if eda else float("nan"),
        heart_rate=heart_rate(ecg[0], fs) if ecg else float("nan"),
        emg_rms=float(np.mean([np.sqrt(np.mean(e**2)) for e in emg])) if emg else float("nan"),
    )
    return outcome
