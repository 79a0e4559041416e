"""By construction, on the synthetic Biovid set physio says more about pain than the face, and both say most.

At the default coupling (1) both modalities read one latent response, each with its own noise, so they remain
complementary; the face is visible enough for a video-only model to beat chance clearly.

Simple summaries read straight from the generated files (no pkdot feature code), logistic regression,
subject-wise cross-validation, BL1 vs PA4:

- video: expression energy, the mean absolute change of a 16x16 grey face crop (at the truth box) between the
  first 0.8 s (before any pain response) and the last 1.3 s, over the whole face, the brow/eye band and the
  mouth band;
- physio: heart-rate change (ECG R-peaks), EDA rise, log EMG RMS ratio late/early.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from scipy.signal import find_peaks
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pkdot.data.synthetic import BIOVID_FS, TRUTH_FILE, write_synthetic


@pytest.fixture(scope="module")
def informativeness_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(
        "biovid",
        tmp_path_factory.mktemp("info"),
        subjects=10,
        samples_per_class=4,
        frame_size=64,
        seed=0,
        progress=False,
    )


def _video_summary(root: Path, row: pd.Series) -> np.ndarray:
    cap = cv2.VideoCapture(str(root / row.video))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    boxes = np.asarray(row.boxes.tolist())

    def crop(i: int) -> np.ndarray:
        x, y, w, h = (int(round(v)) for v in boxes[i])
        return cv2.resize(frames[i][y : y + h, x : x + w], (16, 16), interpolation=cv2.INTER_AREA).astype(
            float
        )

    early = np.mean([crop(i) for i in range(0, 20, 4)], axis=0)
    late = np.mean([crop(i) for i in range(len(frames) - 33, len(frames), 4)], axis=0)
    change = np.abs(late - early)
    return np.array([change.mean(), change[4:8].mean(), change[10:14].mean()])


def _physio_summary(root: Path, row: pd.Series) -> np.ndarray:
    bio = pd.read_csv(root / "biosignals_filtered" / row.subject_id / f"{row.sample_id}_bio.csv", sep="\t")
    t = bio["time"].to_numpy() / 1e6
    peaks, _ = find_peaks(bio.ecg, height=0.5 * bio.ecg.max(), distance=int(0.3 * BIOVID_FS))
    beats = t[peaks]
    heart_rate = np.interp(t, (beats[1:] + beats[:-1]) / 2, 60.0 / np.diff(beats))
    eda = bio.gsr.to_numpy()
    emg = bio.emg_trapezius.to_numpy()
    return np.array(
        [
            heart_rate[t > 3.5].mean() - heart_rate[t < 1.5].mean(),
            eda[t > 3].max() - eda[t < 1].mean(),
            np.log(np.sqrt(np.mean(emg[t > 3] ** 2)) / np.sqrt(np.mean(emg[t < 1] ** 2))),
        ]
    )


def test_physio_beats_video_and_both_beat_either(informativeness_set: Path) -> None:
    root = informativeness_set
    truth = pd.read_parquet(root / TRUTH_FILE)
    truth = truth[truth.class_id.isin([0, 4])].reset_index(drop=True)
    video = np.array([_video_summary(root, r) for r in truth.itertuples()])
    physio = np.array([_physio_summary(root, r) for r in truth.itertuples()])
    y = (truth.class_id.to_numpy() == 4).astype(int)
    groups = truth.subject_id.to_numpy()
    assert len(y) == 80 and len(set(groups)) == 10

    def out_of_fold(features: np.ndarray) -> tuple[float, float]:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000))
        proba = cross_val_predict(
            model, features, y, groups=groups, cv=GroupKFold(5), method="predict_proba"
        )[:, 1]
        return roc_auc_score(y, proba), log_loss(y, proba)

    auc_v, loss_v = out_of_fold(video)
    auc_p, loss_p = out_of_fold(physio)
    auc_vp, loss_vp = out_of_fold(np.hstack([video, physio]))
    scores = {"video": (auc_v, loss_v), "physio": (auc_p, loss_p), "both": (auc_vp, loss_vp)}
    assert 0.6 < auc_v, scores  # the face carries information ...
    assert auc_p > auc_v + 0.05 and loss_p < loss_v - 0.05, scores  # ... physio more ...
    assert auc_p < 0.99, scores  # ... but is not perfect ...
    assert auc_vp >= auc_p and loss_vp < loss_p - 0.015, scores  # ... and the two are complementary.
