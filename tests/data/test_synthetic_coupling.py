"""``synth.coupling``: face and privileged modality share one latent response at 1, are independent at 0.

The latent draws are pure functions (:func:`draw_biovid_responses`, :func:`draw_affwild2_tracks`), tested on
many windows without rendering video; two tiny end-to-end writes check that the files follow them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pkdot.data.synthetic import (
    FACE_GAIN,
    FACE_LEVEL,
    FACE_MAX_INTENSITY,
    NONRESPONSE,
    PHYSIO_LEVEL,
    TRUTH_FILE,
    draw_affwild2_tracks,
    draw_biovid_responses,
    write_synthetic,
)
from pkdot.errors import ConfigError

PER_CLASS = 500


def _biovid(coupling: float, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    class_ids = np.repeat(np.arange(5), PER_CLASS)
    return class_ids, draw_biovid_responses(np.random.default_rng(seed), class_ids, coupling)


@pytest.mark.parametrize(("coupling", "shared"), [(1.0, True), (0.0, False)])
def test_biovid_face_and_physio_share_the_response_given_the_class(coupling: float, shared: bool) -> None:
    class_ids, responses = _biovid(coupling)
    for c in range(1, 5):
        mine = class_ids == c
        r = np.corrcoef(responses["face_response"][mine], responses["physio_response"][mine])[0, 1]
        if shared:
            assert r > 0.5, (c, r)
        else:
            assert abs(r) < 0.2, (c, r)


def test_biovid_coupling_changes_only_the_dependence() -> None:
    """Physio is identical at every coupling; the face's distribution per class does not move."""
    class_ids, one = _biovid(1.0)
    _, zero = _biovid(0.0)
    _, half = _biovid(0.5)
    for key in ("shared_response", "physio_response"):
        assert np.array_equal(one[key], zero[key]) and np.array_equal(one[key], half[key])
    assert np.array_equal(one["face_latent"], one["shared_response"])  # one response at coupling 1
    assert not np.array_equal(zero["face_latent"], zero["shared_response"])
    for c in range(5):
        mine = class_ids == c
        for other in (zero, half):
            a, b = one["face_response"][mine], other["face_response"][mine]
            assert abs((a == 0).mean() - (b == 0).mean()) < 0.06, c  # same share of non-responses
            if c:
                assert np.median(a[a > 0]) == pytest.approx(np.median(b[b > 0]), rel=0.15), c


def test_biovid_non_responses_and_noise() -> None:
    class_ids, responses = _biovid(1.0)
    for c, p in enumerate(NONRESPONSE):
        mine = class_ids == c
        silent = responses["shared_response"][mine] == 0
        assert silent.mean() == pytest.approx(p, abs=0.05), c
        # a non-response is silent in every modality that reads it
        assert (responses["physio_response"][mine][silent] == 0).all()
    responded = responses["shared_response"] > 0
    face_noise = np.log(responses["face_response"][responded] / responses["shared_response"][responded])
    physio_noise = np.log(responses["physio_response"][responded] / responses["shared_response"][responded])
    assert physio_noise.std() < 0.5 * face_noise.std()  # physio reads the response more reliably


def test_biovid_responses_reject_bad_input() -> None:
    with pytest.raises(ConfigError, match="coupling"):
        draw_biovid_responses(np.random.default_rng(0), np.array([0, 4]), 1.5)
    with pytest.raises(ConfigError, match="class_ids"):
        draw_biovid_responses(np.random.default_rng(0), np.array([0, 5]), 1.0)


def _affwild2(coupling: float, videos: int = 30) -> dict[str, np.ndarray]:
    tracks = [
        draw_affwild2_tracks(np.random.default_rng(i), 250, 25, coupling, face_lag_s=0.2, audio_lag_s=0.4)
        for i in range(videos)
    ]
    return {key: np.concatenate([t[key] for t in tracks]) for key in tracks[0]}


@pytest.mark.parametrize(("coupling", "shared"), [(1.0, True), (0.0, False)])
def test_affwild2_face_and_audio_follow_one_latent(coupling: float, shared: bool) -> None:
    tracks = _affwild2(coupling)
    for dim in ("valence", "arousal"):
        r_face_audio = np.corrcoef(tracks[f"face_{dim}"], tracks[f"audio_{dim}"])[0, 1]
        r_audio_label = np.corrcoef(tracks[dim], tracks[f"audio_{dim}"])[0, 1]
        assert np.corrcoef(tracks[dim], tracks[f"face_{dim}"])[0, 1] > 0.7  # the face shows the label
        if shared:
            assert r_face_audio > 0.5 and r_audio_label > 0.5, (dim, r_face_audio, r_audio_label)
        else:
            assert abs(r_face_audio) < 0.2 and abs(r_audio_label) < 0.2, (dim, r_face_audio, r_audio_label)


def test_affwild2_readings_lag_the_latent() -> None:
    """The face reads the latent 0.2 s late: the reading matches the label best 5 frames earlier."""
    tracks = draw_affwild2_tracks(np.random.default_rng(0), 2000, 25, 1.0, face_lag_s=0.2, audio_lag_s=0.4)
    label, face, audio = tracks["arousal"], tracks["face_arousal"], tracks["audio_arousal"]

    def best_lag(reading: np.ndarray) -> int:
        errors = [np.mean((reading[lag:] - label[: len(label) - lag]) ** 2) for lag in range(20)]
        return int(np.argmin(errors))

    assert best_lag(face) == 5 and best_lag(audio) == 10
    with pytest.raises(ConfigError, match="audio_lag_s"):
        draw_affwild2_tracks(np.random.default_rng(0), 10, 25, 1.0, audio_lag_s=3.0)


# ---- end to end: the written files follow the latents -------------------------------------------------------
def _digest(root: Path, pattern: str) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob(pattern))
    }


def test_written_biovid_follows_the_coupling(tmp_path: Path) -> None:
    kwargs = {"subjects": 2, "samples_per_class": 2, "frame_size": 64, "seed": 7, "progress": False}
    one = write_synthetic("biovid", tmp_path / "one", coupling=1.0, **kwargs)
    zero = write_synthetic("biovid", tmp_path / "zero", coupling=0.0, **kwargs)
    t1 = pd.read_parquet(one / TRUTH_FILE).set_index("sample_id")
    t0 = pd.read_parquet(zero / TRUTH_FILE).set_index("sample_id").loc[t1.index]
    assert (t1.coupling == 1.0).all() and (t0.coupling == 0.0).all()
    # physio reads the shared response whatever the coupling: identical biosignal files
    assert _digest(one, "*_bio.csv") == _digest(zero, "*_bio.csv")
    assert np.allclose(t1.physio_response, t0.physio_response)
    # coupling 1: the face responds exactly when physio does; coupling 0: not always
    assert ((t1.face_response > 0) == (t1.physio_response > 0)).all()
    assert not np.allclose(t1.face_response, t0.face_response)
    for truth in (t1, t0):  # each modality shows its reading through its own per-subject gain
        face_level = truth.class_id.map(dict(enumerate(FACE_LEVEL)))
        physio_level = truth.class_id.map(dict(enumerate(PHYSIO_LEVEL)))
        raw = FACE_GAIN * truth.expressiveness * face_level * truth.face_response
        assert np.allclose(truth.face_intensity, FACE_MAX_INTENSITY * np.tanh(raw / FACE_MAX_INTENSITY))
        assert np.allclose(truth.physio_level, physio_level * truth.reactivity * truth.physio_response)
    assert _digest(one, "*.mp4") != _digest(zero, "*.mp4")  # the face moves differently


def test_written_affwild2_follows_the_coupling(tmp_path: Path) -> None:
    kwargs = {"subjects": 2, "seconds_per_video": 2.0, "frame_size": 64, "seed": 3, "progress": False}
    one = write_synthetic("affwild2", tmp_path / "one", coupling=1.0, **kwargs)
    zero = write_synthetic("affwild2", tmp_path / "zero", coupling=0.0, **kwargs)
    assert _digest(one, "*.txt") == _digest(zero, "*.txt")  # the labels do not depend on the coupling
    t1, t0 = pd.read_parquet(one / TRUTH_FILE), pd.read_parquet(zero / TRUTH_FILE)
    for a, b in zip(t1.itertuples(), t0.itertuples(), strict=True):
        assert np.array_equal(a.face_valence, b.face_valence)
        assert not np.allclose(a.audio_valence, b.audio_valence)
        assert np.corrcoef(a.face_arousal, a.audio_arousal)[0, 1] > 0.5
        annotated = np.asarray(a.annotated)
        written = np.asarray(a.valence)[annotated]
        assert np.abs(written - np.asarray(b.valence)[annotated]).max() == 0.0


def test_write_synthetic_rejects_coupling_outside_0_1(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="coupling"):
        write_synthetic("biovid", tmp_path / "x", coupling=-0.1, progress=False)


def test_run_regenerates_its_synthetic_set_when_the_coupling_changes(tmp_path: Path) -> None:
    """``synth.coupling`` is part of what decides that a run's synthetic set is up to date."""
    from pkdot.config import load_config
    from pkdot.pipeline import prepare_run

    def prepared(coupling: float) -> pd.DataFrame:
        overrides = {
            "run_dir": str(tmp_path / "run"),
            "synth.subjects": 2,
            "synth.samples_per_class": 1,
            "synth.frame_size": 64,
            "synth.coupling": coupling,
        }
        cfg = prepare_run(load_config(preset="demo", overrides=overrides))
        return pd.read_parquet(Path(cfg.data.root) / TRUTH_FILE)

    assert (prepared(1.0).coupling == 1.0).all()
    truth = prepared(0.0)
    # 2 subjects x 1 window of each class the (binary) task reads: BL1 and PA4
    assert (truth.coupling == 0.0).all() and len(truth) == 4
    assert set(truth.class_id) == {0, 4}
