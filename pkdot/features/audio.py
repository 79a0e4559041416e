"""Log-mel spectrograms of the audio track of video clips (Aff-Wild2).

The first audio stream is decoded with PyAV, mixed to mono and resampled to ``features.audio_sr``. A clip covers
``start_frame / fps .. (start_frame + num_frames) / fps`` seconds (the whole track when the window is null); its
``(n_mels, T)`` log-mel power spectrogram (librosa's conventions, ``top_db`` 80) is padded to a common ``T`` when the table
is merged (:func:`pad_logmel`). A file is decoded once per shard for all its clips."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from pkdot.config import FeatureConfig
from pkdot.errors import FeatureError

#: Audio that ends at most this many seconds before a clip's end is zero-padded (tracks are often a few
#: milliseconds shorter than the video); a longer shortfall quarantines the clip.
MAX_SHORTFALL_S = 0.25
#: Seek (instead of decoding from the start) when a shard's first clip starts later than this (seconds).
SEEK_MIN_S = 10.0
TOP_DB = 80.0


@dataclass(frozen=True)
class AudioRequest:
    """One clip of the audio timeline: frames ``start .. start+length`` of the video (None = whole track)."""

    sample_id: str
    start: int | None = None
    length: int | None = None


@dataclass
class AudioClip:
    """``logmel`` float32 (n_mels, T) of one clip; ``padded_s`` seconds of missing audio zero-filled."""

    sample_id: str
    logmel: np.ndarray
    padded_s: float = 0.0
    silent: bool = False


@dataclass
class AudioFailure:
    sample_id: str
    reason: str


def logmel(y: np.ndarray, sr: int, n_mels: int, hop_length: int) -> np.ndarray:
    """Log-mel power spectrogram (dB) of a mono signal ``y`` (n,) -> float32 ``(n_mels, 1 + n // hop_length)``;
    FFT size: the power of two >= 25 ms at ``sr``, at least ``hop_length``. librosa's ``melspectrogram`` +
    ``power_to_db`` (within 2e-4 dB) by NumPy's FFT: librosa's STFT modules compile numba kernels on import, ~20 s
    per fresh environment; its filter bank does not."""
    from librosa.filters import mel as mel_filters

    n_fft = max(hop_length, 2 ** math.ceil(math.log2(0.025 * sr)))
    padded = np.pad(np.asarray(y, np.float32), n_fft // 2)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop_length]
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)  # periodic Hann (scipy's get_window("hann"))
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # (T, 1 + n_fft // 2)
    mel = mel_filters(sr=sr, n_fft=n_fft, n_mels=n_mels) @ power.T.astype(np.float32)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    return np.maximum(db, db.max() - TOP_DB).astype(np.float32)


def pad_logmel(m: np.ndarray, frames: int) -> np.ndarray:
    """Crop or pad ``m`` (n_mels, T) on the right to ``frames`` columns, padding with its minimum (silence)."""
    if m.shape[1] >= frames:
        return np.ascontiguousarray(m[:, :frames])
    fill = float(m.min()) if m.size else -TOP_DB
    return np.concatenate([m, np.full((m.shape[0], frames - m.shape[1]), fill, dtype=m.dtype)], axis=1)


def video_fps(path: str | Path) -> float:
    """Average frame rate of the first video stream of ``path``."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise FeatureError(f"file {path} has no video stream to convert clip frames to seconds")
        if not (rate := container.streams.video[0].average_rate):
            raise FeatureError(f"video {path} has no frame rate")
        return float(rate)


def _decode_mono(path: Path, sr: int, start_s: float, end_s: float | None) -> tuple[np.ndarray, float]:
    """Mono float32 samples at ``sr`` covering at least ``[start_s, end_s)`` and the time of the first one."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise FeatureError(f"file {path}: no audio track")
        stream = container.streams.audio[0]
        time_base = float(stream.time_base) if stream.time_base else 1.0 / float(stream.rate or sr)
        if start_s > SEEK_MIN_S:
            container.seek(int((start_s - 1.0) / time_base), stream=stream, backward=True)
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=sr)
        stream_start = stream.start_time * time_base if stream.start_time is not None else 0.0
        chunks: list[np.ndarray] = []
        first_time: float | None = None
        have = 0
        for frame in container.decode(stream):
            if first_time is None:
                first_time = (float(frame.time) - stream_start) if frame.time is not None else 0.0
            new = [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
            chunks += new
            have += sum(len(chunk) for chunk in new)
            if end_s is not None and first_time + have / sr >= end_s + 0.1:
                break
        else:  # the end of the stream: flush the resampler
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return samples, first_time or 0.0


def extract_audio_clips(
    media_path: str | Path, clips: Sequence[AudioRequest], features: FeatureConfig, fps: float | None = None
) -> list[AudioClip | AudioFailure]:
    """Log-mel spectrograms of the clips of one audio-bearing file, decoding it once; ``fps`` converts clip
    frames to seconds (default: the file's video frame rate). Bad media gives :class:`AudioFailure`s."""
    path = Path(media_path)
    sr = features.audio_sr
    try:
        if not path.is_file():
            raise FeatureError(f"media file {path} does not exist")
        if fps is None and any(c.start is not None and c.length is not None for c in clips):
            fps = video_fps(path)
        windows: list[tuple[float, float | None]] = [
            (0.0, None)
            if c.start is None or c.length is None
            else (c.start / fps, (c.start + c.length) / fps)
            for c in clips
        ]
        first = min(w[0] for w in windows)
        last = None if any(w[1] is None for w in windows) else max(w[1] for w in windows)  # type: ignore[type-var]
        samples, t0 = _decode_mono(path, sr, first, last)
    except FeatureError as exc:
        return [AudioFailure(c.sample_id, str(exc)) for c in clips]
    except (av.FFmpegError, OSError) as exc:
        reason = f"file {path} is not readable media (truncated or corrupt?): {exc}"
        return [AudioFailure(c.sample_id, reason) for c in clips]
    if samples.size == 0:
        return [AudioFailure(c.sample_id, f"file {path}: the audio track has no samples") for c in clips]
    track_end = t0 + samples.size / sr
    results: list[AudioClip | AudioFailure] = []
    for clip, (start_s, end_s) in zip(clips, windows, strict=True):
        if end_s is None:
            y = samples[max(0, int(round((start_s - t0) * sr))) :]
            padded = 0.0
        else:
            n = int(round((end_s - start_s) * sr))
            i0 = int(round((start_s - t0) * sr))
            problem = None
            if i0 < 0:
                problem = f"file {path}: audio starts at {t0:.3f} s, after the clip start {start_s:.3f} s"
            elif end_s - track_end > MAX_SHORTFALL_S:
                problem = f"file {path}: audio ends at {track_end:.3f} s, the clip needs {start_s:.3f}-{end_s:.3f} s"
            if problem:
                results.append(AudioFailure(clip.sample_id, problem))
                continue
            y = samples[i0 : i0 + n]
            padded = (n - len(y)) / sr
            y = np.pad(y, (0, n - len(y)))
        silent = bool(np.max(np.abs(y)) < 1e-6) if y.size else True
        mel = logmel(y, sr, features.n_mels, features.hop_length)
        results.append(AudioClip(clip.sample_id, mel, padded, silent))
    return results
