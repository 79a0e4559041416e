from __future__ import annotations

import numpy as np
import pytest
from scipy import signal

from pkdot.config import FeatureConfig
from pkdot.errors import ConfigError, FeatureError
from pkdot.features import physio

FEATURES = FeatureConfig()  # 512 Hz, window 2-5 s, nperseg 16, noverlap 4, nfft 128


@pytest.fixture(scope="module")
def good_csv(tmp_path_factory, media):
    return media.write_bio_csv(tmp_path_factory.mktemp("bio") / "good_bio.csv", media.biosignals(seed=1))


def test_time_unit_and_sampling_rate_are_inferred_from_the_step():
    assert physio.infer_time_unit(1953.0)[0] == "us"
    assert physio.infer_time_unit(1.953)[0] == "ms"
    assert physio.infer_time_unit(0.001953)[0] == "s"
    for scale in (1e6, 1e3, 1.0):
        t = np.arange(2816) / 512.0 * scale
        assert physio.sampling_rate(np.round(t) if scale == 1e6 else t) == pytest.approx(512.0, rel=1e-3)
    with pytest.raises(FeatureError, match="strictly increasing"):
        physio.sampling_rate(np.array([0.0, 2.0, 1.0]))


def test_good_recording_gives_windows_spectrograms_and_descriptors(good_csv):
    out = physio.extract_physio("s", good_csv, FEATURES)
    assert out.reason is None, out.reason
    f = out.features
    length = 3 * 512
    assert f.channels == ["gsr", "ecg", "emg_trapezius"]
    assert f.window.shape == (3, length) and f.window.dtype == np.float32
    assert np.allclose(f.window.mean(axis=1), 0, atol=1e-4) and np.allclose(
        f.window.std(axis=1), 1, atol=1e-3
    )
    n_segments = (length - FEATURES.spec_noverlap) // (FEATURES.spec_nperseg - FEATURES.spec_noverlap)
    assert (
        f.spectrogram.shape == (3, FEATURES.spec_nfft // 2 + 1, n_segments)
        and f.spectrogram.dtype == np.float32
    )
    assert np.isfinite(f.spectrogram).all()
    assert f.heart_rate == pytest.approx(72.0, abs=2.0)
    # The synthetic GSR is 5 + 0.2 t: its mean over 2-5 s is 5.7 and its slope 0.2 per second.
    assert f.eda_level == pytest.approx(5.7, abs=0.02) and f.eda_slope == pytest.approx(0.2, abs=0.02)
    assert f.emg_rms > 0
    assert out.fs == pytest.approx(512.0, rel=1e-3)


@pytest.mark.parametrize(("sep", "unit"), [(",", "us"), (";", "ms"), (" ", "s")])
def test_delimiter_and_time_unit_do_not_change_the_features(tmp_path, media, good_csv, sep, unit):
    other = media.write_bio_csv(tmp_path / "other.csv", media.biosignals(seed=1), unit=unit, sep=sep)
    a = physio.extract_physio("s", good_csv, FEATURES).features
    b = physio.extract_physio("s", other, FEATURES).features
    assert b is not None
    assert np.allclose(a.window, b.window, atol=1e-4)
    assert a.heart_rate == pytest.approx(b.heart_rate)


def test_filters_pass_their_band_and_reject_the_rest():
    fs = 512.0
    for kind, inside, outside in [
        ("eda", 0.5, 20.0),
        ("ecg", 10.0, 0.05),
        ("ecg", 10.0, 120.0),
        ("emg", 80.0, 3.0),
    ]:
        sos = physio.design_filter(kind, fs)
        _, h = signal.sosfreqz(sos, worN=[inside, outside], fs=fs)
        assert abs(h[0]) > 0.9 and abs(h[1]) < 0.1, (kind, np.abs(h))
    # Zero phase: a filtered ECG keeps its R peaks where they were.
    t = np.arange(4096) / fs
    ecg = np.exp(-0.5 * ((t[:, None] - np.arange(0.5, 8, 1.0)) / 0.012) ** 2).sum(axis=1) + 3 * t
    filtered = signal.sosfiltfilt(physio.design_filter("ecg", fs), ecg)
    peaks, _ = signal.find_peaks(filtered, distance=200, height=0.3)
    assert np.allclose(peaks / fs, np.arange(0.5, 8, 1.0), atol=2 / fs)


def test_heart_rate_ignores_polarity_and_baseline_wander():
    fs = 512.0
    t = np.arange(int(4 * fs)) / fs
    beats = np.exp(-0.5 * ((t[:, None] - np.arange(0.2, 4, 0.75)) / 0.01) ** 2).sum(axis=1)  # 80 bpm
    assert physio.heart_rate(beats + 0.3 * np.sin(2 * np.pi * 0.2 * t), fs) == pytest.approx(80, abs=1)
    assert physio.heart_rate(-beats, fs) == pytest.approx(80, abs=1)
    assert np.isnan(physio.heart_rate(np.zeros_like(t), fs))


def test_short_nan_runs_are_interpolated_and_reported(tmp_path, media):
    sig = media.biosignals(seed=2)
    sig["ecg"][1200:1220] = np.nan  # 20 samples = 0.039 s < 0.1 s
    out = physio.extract_physio("s", media.write_bio_csv(tmp_path / "nan.csv", sig), FEATURES)
    assert out.features is not None, out.reason
    q = out.quality["ecg"]
    assert q.nan_runs == 1 and q.interpolated == 20 and "nan" in q.flags
    assert q.longest_nan_run_s == pytest.approx(20 / 512)
    assert np.isfinite(out.features.window).all()


def test_long_nan_runs_quarantine_with_the_reason(tmp_path, media):
    sig = media.biosignals(seed=3)
    sig["gsr"][500:756] = np.nan  # 0.5 s
    path = media.write_bio_csv(tmp_path / "longnan.csv", sig)
    out = physio.extract_physio("s", path, FEATURES)
    assert out.features is None
    assert "gsr" in out.reason and "NaN run of 0.5 s" in out.reason and str(path) in out.reason


def test_wrong_sampling_rate_is_quarantined(tmp_path, media):
    path = media.write_bio_csv(tmp_path / "fs256.csv", media.biosignals(fs=256.0), fs=256.0)
    out = physio.extract_physio("s", path, FEATURES)
    assert out.features is None and "sampling rate 256 Hz, expected 512 Hz" in out.reason


def test_flat_and_clipped_channels(tmp_path, media):
    flat = media.biosignals(seed=4)
    flat["emg_trapezius"][:] = 0.25
    out = physio.extract_physio("s", media.write_bio_csv(tmp_path / "flat.csv", flat), FEATURES)
    assert (
        out.features is None and "emg_trapezius is flat" in out.reason and out.quality["emg_trapezius"].flat
    )
    clipped = media.biosignals(seed=5)
    clipped["ecg"] = np.clip(clipped["ecg"], -0.05, 0.05)
    out = physio.extract_physio("s", media.write_bio_csv(tmp_path / "clip.csv", clipped), FEATURES)
    assert out.features is not None  # clipping is reported, not quarantined
    assert "clipped" in out.quality["ecg"].flags and out.quality["ecg"].clipped_fraction > 0.01
    assert "clipped" not in out.quality["gsr"].flags


def test_bad_files_give_reasons(tmp_path, media):
    short = media.write_bio_csv(tmp_path / "short.csv", media.biosignals(seconds=3.0))
    assert "physio_window" in physio.extract_physio("s", short, FEATURES).reason
    missing = media.biosignals()
    del missing["ecg"]
    assert (
        "missing channels ['ecg']"
        in physio.extract_physio("s", media.write_bio_csv(tmp_path / "m.csv", missing), FEATURES).reason
    )
    junk = tmp_path / "junk.csv"
    junk.write_bytes(bytes(range(256)) * 20)
    reason = physio.extract_physio("s", junk, FEATURES).reason
    assert str(junk) in reason and "not a text CSV" in reason
    assert "does not exist" in physio.extract_physio("s", tmp_path / "absent.csv", FEATURES).reason


def test_channel_selection_and_part_b(tmp_path, media):
    path = media.write_bio_csv(tmp_path / "b.csv", media.biosignals(part="B"))
    out = physio.extract_physio("s", path, FEATURES, part="B")
    assert out.features.channels == physio.CHANNELS_BY_PART["B"] and out.features.window.shape[0] == 5
    only = FeatureConfig(physio_channels=["emg_corrugator"])
    f = physio.extract_physio("s", path, only, part="B").features
    assert f.window.shape == (1, 1536) and np.isnan(f.heart_rate) and np.isnan(f.eda_level) and f.emg_rms > 0
    with pytest.raises(ConfigError, match="physio_channels"):
        physio.resolve_channels(FeatureConfig(physio_channels=["eeg"]), "A")
    with pytest.raises(ConfigError, match="spec_nperseg"):
        physio.check_settings(FeatureConfig(physio_window=(0.0, 0.01), spec_nperseg=16), "A")
