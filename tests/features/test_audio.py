from __future__ import annotations

import numpy as np
import pytest

from pkdot.config import FeatureConfig
from pkdot.features import audio
from pkdot.features.audio import AudioClip, AudioFailure, AudioRequest

FEATURES = FeatureConfig(n_mels=32, hop_length=160, audio_sr=16000)


@pytest.fixture(scope="module")
def tone_videos(tmp_path_factory, media):
    root = tmp_path_factory.mktemp("audio")
    low = media.face_video(root / "low.mp4", seconds=4.0, audio=True, tone_hz=300.0)
    high = media.face_video(root / "high.mp4", seconds=4.0, audio=True, tone_hz=2000.0)
    silent = media.write_video_cv2(root / "silent.mp4", media.face_frames(50)[0])
    return low, high, silent


def _peak_band_hz(logmel: np.ndarray) -> float:
    import librosa

    centres = librosa.mel_frequencies(n_mels=logmel.shape[0] + 2, fmax=FEATURES.audio_sr / 2)[1:-1]
    return float(centres[int(np.argmax(logmel.mean(axis=1)))])


def test_logmel_shape_and_padding():
    y = np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    m = audio.logmel(y, 16000, n_mels=32, hop_length=160)
    assert m.shape == (32, 1 + 16000 // 160) and m.dtype == np.float32
    assert m.max() - m.min() <= audio.TOP_DB + 1e-3
    padded = audio.pad_logmel(m, 120)
    assert (
        padded.shape == (32, 120)
        and np.array_equal(padded[:, :101], m)
        and np.all(padded[:, 101:] == m.min())
    )
    assert audio.pad_logmel(m, 50).shape == (32, 50)


@pytest.mark.parametrize("sr, n_mels, hop", [(16000, 32, 160), (22050, 40, 512)])
def test_logmel_is_the_centred_hann_stft_through_slaney_mel_filters(sr, n_mels, hop):
    """The spectrogram against SciPy's STFT (windows centred on ``k * hop``, zeros outside the signal: librosa's
    ``center=True`` framing), the same filter bank and dB conversion: an independent route to the same numbers."""
    from librosa.filters import mel
    from scipy.signal import ShortTimeFFT, get_window

    rng = np.random.default_rng(1)
    t = np.arange(int(1.3 * sr)) / sr
    y = (0.3 * np.sin(2 * np.pi * 700 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    m = audio.logmel(y, sr, n_mels=n_mels, hop_length=hop)
    n_fft = max(hop, 2 ** int(np.ceil(np.log2(0.025 * sr))))
    sft = ShortTimeFFT(get_window("hann", n_fft), hop=hop, fs=sr, mfft=n_fft, fft_mode="onesided")
    power = np.abs(sft.stft(y.astype(np.float64), p0=0, p1=1 + y.size // hop)) ** 2
    db = 10 * np.log10(np.maximum(mel(sr=sr, n_fft=n_fft, n_mels=n_mels) @ power, 1e-10))
    expected = np.maximum(db, db.max() - audio.TOP_DB)
    assert m.shape == expected.shape == (n_mels, 1 + y.size // hop)
    np.testing.assert_allclose(m, expected, atol=1e-3)


def test_clip_windows_follow_the_video_timeline_and_the_tone(tone_videos):
    low, high, _ = tone_videos
    clips = [AudioRequest("a", 0, 50), AudioRequest("b", 50, 25), AudioRequest("whole")]
    res = {r.sample_id: r for r in audio.extract_audio_clips(low.path, clips, FEATURES)}
    assert all(isinstance(r, AudioClip) for r in res.values()), res
    # 50 frames at 25 fps = 2 s = 32000 samples -> 1 + 32000 // 160 frames.
    assert res["a"].logmel.shape == (32, 201)
    assert res["b"].logmel.shape == (32, 101)
    assert res["whole"].logmel.shape[1] == pytest.approx(1 + 4 * 16000 // 160, abs=3)
    (hi,) = audio.extract_audio_clips(high.path, [AudioRequest("h", 0, 50)], FEATURES)
    # The loudest mel band sits at the tone's frequency.
    assert _peak_band_hz(res["a"].logmel) == pytest.approx(300, rel=0.25)
    assert _peak_band_hz(hi.logmel) == pytest.approx(2000, rel=0.15)


def test_seeking_gives_the_same_spectrogram(tone_videos, monkeypatch):
    low, _, _ = tone_videos
    request = [AudioRequest("late", 60, 25)]
    (plain,) = audio.extract_audio_clips(low.path, request, FEATURES)
    monkeypatch.setattr(audio, "SEEK_MIN_S", 0.5)
    (seeked,) = audio.extract_audio_clips(low.path, request, FEATURES)
    assert plain.logmel.shape == seeked.logmel.shape
    assert np.median(np.abs(plain.logmel - seeked.logmel)) < 1.0  # dB


def test_missing_audio_and_windows_past_the_end(tone_videos, tmp_path):
    low, _, silent = tone_videos
    (none,) = audio.extract_audio_clips(silent, [AudioRequest("s", 0, 25)], FEATURES)
    assert isinstance(none, AudioFailure) and "no audio track" in none.reason and str(silent) in none.reason
    (past,) = audio.extract_audio_clips(low.path, [AudioRequest("p", 80, 50)], FEATURES)
    assert isinstance(past, AudioFailure) and "audio ends at" in past.reason
    text = tmp_path / "x.mp4"
    text.write_text("not media")
    (bad,) = audio.extract_audio_clips(text, [AudioRequest("t", 0, 25)], FEATURES)
    assert isinstance(bad, AudioFailure) and str(text) in bad.reason
