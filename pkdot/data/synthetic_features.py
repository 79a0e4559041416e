"""A synthetic Biovid *feature table* (``pkdot run --dataset table``) from the *same* generative process as
the synthetic videos (:func:`pkdot.data.synthetic.draw_biovid_responses`), cheap at Biovid's real size. Views:
``face_au`` (student): 12 OpenFace-style AU intensities (0-5), the pain display spread over AU04, AU06/07,
AU09/10 plus per-person nuisances; ``face_landmarks`` (student): mostly face shape, pose and jitter, a few
points moved by the pain display (the regime where privileged information helps: Vapnik & Izmailov 2015);
``physio`` (privileged): 8 window features scaling with ``PHYSIO_LEVEL[c] * reactivity * R_physio``.
The constants were set from the physiology before any distillation result was seen; they are not tuned."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from pkdot.data import synthetic
from pkdot.data.manifest import BIOVID_CLASSES
from pkdot.data.synthetic import FACE_GAIN, FACE_LEVEL, FACE_MAX_INTENSITY, draw_biovid_responses
from pkdot.data.tabular import write_view_table
from pkdot.errors import ConfigError

#: OpenFace action units of the ``face_au`` view, in column order.
AU_NAMES = ("AU01", "AU02", "AU04", "AU06", "AU07", "AU09", "AU10", "AU12", "AU15", "AU17", "AU25", "AU45")
#: The pain display: unit -> mean weight (brow lowering strongest, then orbit tightening and the levator).
PAIN_UNITS = {"AU04": 1.0, "AU06": 0.7, "AU07": 0.8, "AU09": 0.5, "AU10": 0.8}
#: Standard deviation of the analyser's measurement noise on each AU intensity.
AU_NOISE = 0.2
#: Columns of the ``physio`` view.
PHYSIO_NAMES = tuple(
    "hr_rise hr_mean scr_amplitude eda_tonic eda_slope emg_rms emg_peak nonspecific_scrs".split()
)
#: Landmarks of the ``face_landmarks`` view (x and y each): 10 brow, 12 eye, 4 nose, 6 mouth points.
N_LANDMARKS = 32
#: Which landmark coordinates the pain display moves, and how far per unit of intensity (face-size units x 10):
#: brow points' y down (and inner brows together), eyelid points' y closing, upper-lip and nose-wing y up.
_BROW, _EYE, _NOSE, _MOUTH = range(0, 10), range(10, 22), range(22, 26), range(26, 32)
#: Per-window nuisance of the landmarks: tracker jitter and head pose (sd, same units).
LANDMARK_JITTER = 0.5
#: Binary task: BL1 (label 0) vs PA4 (label 1), as Biovid's usual binary protocol.
BINARY_CLASSES = (0, 4)
TABLE_TASKS = ("binary", "multiclass")
_AU = {name: i for i, name in enumerate(AU_NAMES)}


def _landmark_display(rng: np.random.Generator) -> np.ndarray:
    """(2 * N_LANDMARKS,) displacement per unit of pain-display intensity, x then y per landmark; the
    direction is the same for everyone, the amount per person (log-normal)."""
    move = np.zeros((N_LANDMARKS, 2))
    move[list(_BROW), 1] = 0.8  # brows down
    move[[3, 4, 5, 6], 0] = [0.3, 0.3, -0.3, -0.3]  # inner brows together
    move[list(_EYE), 1] = np.tile([0.5, 0.5, 0.5, -0.5, -0.5, -0.5], 2)  # lids close
    move[list(_NOSE), 1] = -0.4  # nose wings up
    move[[26, 27, 28], 1] = -0.5  # upper lip up
    return move.reshape(-1) * float(np.exp(rng.normal(0.0, 0.3)))


#: What a small head rotation does to the normalised landmarks: a fixed linear map of (yaw, pitch, roll).
_POSE_BASIS = np.random.default_rng(20261203).normal(0.0, 0.6, (3, 2 * N_LANDMARKS))


def draw_feature_table(
    *, subjects: int, per_class: int, coupling: float, seed: int, task: Literal["binary", "multiclass"]
) -> dict[str, np.ndarray | list[str]]:
    """Draw the table's columns: ``sample_id``, ``subject_id`` (lists of str), ``label`` (N,) int,
    ``face_au`` (N, 12), ``face_landmarks`` (N, 64), ``physio`` (N, 8), and the truth ``face_response``,
    ``physio_response`` (N,)."""
    if task not in TABLE_TASKS:
        raise ConfigError(f"synthetic feature table: task must be one of {TABLE_TASKS}, got {task!r}")
    if subjects < 1 or per_class < 1:
        raise ConfigError(
            f"synthetic feature table: subjects and per_class must be >= 1, got {subjects}, {per_class}"
        )
    classes = BINARY_CLASSES if task == "binary" else tuple(range(len(BIOVID_CLASSES)))
    rng = np.random.default_rng([seed, 11])
    names = synthetic._subject_names(rng, subjects)
    expressiveness = 0.1 + 0.9 * synthetic._spread(rng, subjects, 0.0, 1.0) ** 1.5  # skewed low
    reactivity = synthetic._spread(rng, subjects, 0.4, 1.0)
    # sample_id, subject_id, label, face_au, face_landmarks, physio, face/physio response
    rows: list[tuple] = []
    for s, name in enumerate(names):
        srng = np.random.default_rng([seed, 12, s])
        e, r = float(expressiveness[s]), float(reactivity[s])
        neutral = np.abs(srng.normal(0.0, 0.25, len(AU_NAMES)))  # the analyser's per-person bias
        lrng = np.random.default_rng([seed, 15, s])
        shape = lrng.normal(0.0, 1.0, 2 * N_LANDMARKS)  # this person's face shape (x, y per landmark)
        display = _landmark_display(lrng)  # how this face's landmarks move with the pain display
        weights = {u: w * float(np.exp(srng.normal(0.0, 0.3))) for u, w in PAIN_UNITS.items()}
        hr0, hr_gain = srng.uniform(58, 85), srng.uniform(5, 12)
        eda0, eda_gain = srng.uniform(2.0, 12.0), srng.uniform(0.4, 1.2)
        emg0, emg_gain = srng.uniform(3.0, 10.0), srng.uniform(0.5, 1.5)
        class_ids = np.repeat(np.asarray(classes), per_class)
        resp = draw_biovid_responses(np.random.default_rng([seed, 13, s]), class_ids, coupling)
        wrng = np.random.default_rng([seed, 14, s])
        for i, c in enumerate(class_ids):
            c = int(c)
            raw = FACE_GAIN * e * FACE_LEVEL[c] * float(resp["face_response"][i])
            intensity = FACE_MAX_INTENSITY * np.tanh(raw / FACE_MAX_INTENSITY)
            au = neutral.copy()
            for unit, w in weights.items():
                au[_AU[unit]] += w * intensity
            if wrng.uniform() < 0.25:  # a frown of concentration
                frown = e * wrng.uniform(0.2, 0.5)
                au[_AU["AU04"]] += frown
                au[_AU["AU07"]] += 0.6 * frown
            au[_AU["AU12"]] += abs(wrng.normal(0.0, 0.3))  # smiles
            au[_AU["AU25"]] += abs(wrng.normal(0.0, 0.3))  # talking
            au[_AU["AU45"]] += wrng.uniform(0.0, 1.0)  # blinks
            au = np.clip(au + wrng.normal(0.0, AU_NOISE, len(AU_NAMES)), 0.0, 5.0)
            # (own random stream: the AU and physio draws are the same with or without this view)
            pose = lrng.normal(0.0, 1.0, 3)  # yaw, pitch, roll: a smooth, low-rank distortion of every point
            jitter = lrng.normal(0.0, LANDMARK_JITTER, 2 * N_LANDMARKS)
            landmarks = shape + display * intensity + pose @ _POSE_BASIS + jitter

            level = synthetic.PHYSIO_LEVEL[c] * r * float(resp["physio_response"][i])
            hr_rise = hr_gain * level + wrng.normal(0.0, 2.5)  # drift, respiratory sinus arrhythmia
            nonspecific = int(wrng.poisson(0.7))
            scr = eda_gain * level + sum(wrng.uniform(0.1, 0.45) * eda_gain for _ in range(nonspecific))
            artefacts = sum(wrng.uniform(0.3, 1.5) for _ in range(int(wrng.poisson(1.2))))
            emg = emg0 * (1.0 + 0.6 * emg_gain * level + 0.25 * artefacts)
            physio = [
                hr_rise,
                hr0 + wrng.normal(0.0, 3.0) + 0.5 * hr_rise,
                scr + wrng.normal(0.0, 0.02),
                eda0 + wrng.normal(0.0, 0.4),
                wrng.normal(0.0, 0.08) + 0.2 * scr,
                emg + wrng.normal(0.0, 0.3),
                emg * wrng.uniform(1.5, 2.5) + wrng.normal(0.0, 0.5),
                float(nonspecific),
            ]
            label = classes.index(c) if task == "binary" else c
            responses = float(resp["face_response"][i]), float(resp["physio_response"][i])
            rows.append(
                (f"{name}-{BIOVID_CLASSES[c]}-{i + 1:03d}", name, label, au, landmarks, physio, *responses)
            )
    sample_ids, subject_ids, *arrays = zip(*rows, strict=True)
    dtypes = {"label": np.int64, "face_au": np.float32, "face_landmarks": np.float32, "physio": np.float32}
    columns = (*dtypes, "face_response", "physio_response")
    return {"sample_id": list(sample_ids), "subject_id": list(subject_ids)} | {
        key: np.asarray(column, dtype=dtypes.get(key)) for key, column in zip(columns, arrays, strict=True)
    }


def write_feature_table(
    path: str | Path,
    *,
    subjects: int = 87,
    per_class: int = 20,
    coupling: float = 1.0,
    seed: int = 0,
    task: Literal["binary", "multiclass"] = "binary",
) -> Path:
    """Write the table (``sample_id``, ``subject_id``, ``label``, ``face_au``, ``face_landmarks``, ``physio``)
    atomically in :mod:`pkdot.data.tabular`'s layout; the defaults are Biovid Part A's size. Returns ``path``."""
    cols = draw_feature_table(subjects=subjects, per_class=per_class, coupling=coupling, seed=seed, task=task)
    views = {view: cols[view] for view in ("face_au", "face_landmarks", "physio")}
    return write_view_table(path, cols["sample_id"], cols["subject_id"], cols["label"], views)
