"""The synthetic Biovid feature table: the face AUs and the physio features follow one latent response at
coupling 1 and independent ones at 0 (given the class), the face view alone is informative at both, the draw
is deterministic, and the written file is a valid ``--dataset table`` root."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pkdot.config import DataConfig
from pkdot.data.synthetic_features import AU_NAMES, PHYSIO_NAMES, draw_feature_table, write_feature_table
from pkdot.data.tabular import build_table_manifest
from pkdot.errors import ConfigError


def _draw(coupling: float, task: str = "binary", seed: int = 0):
    return draw_feature_table(subjects=40, per_class=20, coupling=coupling, seed=seed, task=task)


@pytest.mark.parametrize(("coupling", "shared"), [(1.0, True), (0.0, False)])
def test_face_and_physio_features_share_the_response_given_the_class(coupling: float, shared: bool) -> None:
    d = _draw(coupling)
    pain = d["label"] == 1  # PA4
    # the truth: one response read twice at coupling 1
    r_truth = np.corrcoef(d["face_response"][pain], d["physio_response"][pain])[0, 1]
    # the observed features: brow lowering (AU04) against the skin-conductance response amplitude
    # within each subject (people differ in expressiveness and physiological gains: pooled over subjects a
    # handful of people would correlate the two by chance)
    subjects = np.asarray(d["subject_id"])[pain]
    au04 = d["face_au"][pain, AU_NAMES.index("AU04")].astype(float)
    scr = d["physio"][pain, PHYSIO_NAMES.index("scr_amplitude")].astype(float)
    for s in np.unique(subjects):
        mine = subjects == s
        au04[mine] -= au04[mine].mean()
        scr[mine] -= scr[mine].mean()
    r_features = np.corrcoef(au04, scr)[0, 1]
    if shared:
        assert r_truth > 0.7 and r_features > 0.15, (r_truth, r_features)
    else:
        assert abs(r_truth) < 0.15 and abs(r_features) < 0.08, (r_truth, r_features)


@pytest.mark.parametrize("coupling", [1.0, 0.0])
def test_each_view_alone_is_informative_and_physio_more(coupling: float) -> None:
    d = _draw(coupling)
    groups = np.asarray(d["subject_id"])
    scores = {}
    for view in ("face_au", "physio"):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        scores[view] = cross_val_score(model, d[view], d["label"], groups=groups, cv=GroupKFold(4)).mean()
    assert 0.7 < scores["face_au"] < scores["physio"], scores


def test_landmarks_are_mostly_nuisance_but_carry_the_pain_display() -> None:
    """The landmark view: 64 coordinates whose variance is mostly face shape and pose (per subject), yet a
    subject-wise linear probe finds the pain display in them; its own random stream leaves the AU and physio
    draws unchanged."""
    d = _draw(1.0)
    landmarks, groups = d["face_landmarks"], np.asarray(d["subject_id"])
    assert landmarks.shape == (len(d["label"]), 64)
    total = landmarks.var(0).sum()
    subject_means = np.stack([landmarks[groups == g].mean(0) for g in groups])
    class_means = np.stack([landmarks[d["label"] == c].mean(0) for c in d["label"]])
    assert subject_means.var(0).sum() > 0.3 * total  # who it is (face shape) ...
    assert class_means.var(0).sum() < 0.05 * total  # ... far more than what they feel
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    score = cross_val_score(model, landmarks, d["label"], groups=groups, cv=GroupKFold(4)).mean()
    assert 0.6 < score < 0.95, score


def test_draw_is_deterministic_and_the_physio_side_does_not_depend_on_coupling() -> None:
    a, b, zero = _draw(1.0), _draw(1.0), _draw(0.0)
    assert np.array_equal(a["face_au"], b["face_au"]) and np.array_equal(a["physio"], b["physio"])
    assert np.array_equal(a["physio"], zero["physio"])  # only the face's dependence on it changes
    assert not np.array_equal(a["face_au"], zero["face_au"])
    assert not np.array_equal(a["face_au"], _draw(1.0, seed=1)["face_au"])


def test_multiclass_labels_and_bad_arguments() -> None:
    d = _draw(1.0, task="multiclass")
    assert sorted(set(d["label"].tolist())) == [0, 1, 2, 3, 4]
    assert d["face_au"].shape == (40 * 20 * 5, len(AU_NAMES)) and np.isfinite(d["physio"]).all()
    with pytest.raises(ConfigError, match="coupling"):
        draw_feature_table(subjects=2, per_class=1, coupling=1.5, seed=0, task="binary")
    with pytest.raises(ConfigError, match="task"):
        draw_feature_table(subjects=2, per_class=1, coupling=1.0, seed=0, task="regression")  # type: ignore[arg-type]


def test_written_table_is_a_valid_table_root(tmp_path) -> None:
    path = write_feature_table(tmp_path / "biovid-features.parquet", subjects=6, per_class=3, coupling=1.0)
    data = DataConfig(
        dataset="table",
        task="binary",
        root=str(path),
        student_modalities=["face_landmarks"],
        privileged_modalities=["physio", "face_au"],
    )
    result = build_table_manifest(data, path)
    frame = result.frame
    assert len(frame) == 6 * 3 * 2 and frame["subject_id"].nunique() == 6
    assert set(frame["label"]) == {0, 1}
    assert not list(tmp_path.glob(".*.tmp"))
