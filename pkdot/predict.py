"""``pkdot predict``: a registered student on raw videos (faces extracted with the stage-1 code)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkdot.config import load_config
from pkdot.data.manifest import BIOVID_CLASSES
from pkdot.errors import ConfigError, FeatureError, PkdotError
from pkdot.tracking.registry import load_student, model_config_path, model_version, require_existing_store


def resolve_registry_uri(tracking_uri: str | None = None) -> str:
    """The existing MLflow store ``pkdot predict`` reads from: ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``; no
    default (MLflow's own, ``sqlite:///mlflow.db`` in the working directory, would create an empty store)."""
    if not (uri := tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ConfigError(
            "pkdot predict: no MLflow store to read the model from; pass --tracking-uri (e.g. "
            "sqlite:///runs/biovid-demo/mlflow.db for a local run, http://HOST:5000 for a server) or set "
            "MLFLOW_TRACKING_URI"
        )
    return require_existing_store(uri)


def describe_model(model_uri: str, tracking_uri: str | None = None) -> str:
    """The one-line summary of a registered student's model card (the first line of its description)."""
    mv = model_version(model_uri, resolve_registry_uri(tracking_uri))
    if not (lines := (mv.description or "").strip().splitlines()):
        raise PkdotError(
            f"{model_uri} (version {mv.version}) has no model card (registered by an older pkdot)"
        )
    return f"{model_uri} (version {mv.version}): {lines[0].lstrip('# ').strip()}"


def predict_videos(
    model_uri: str, videos: Sequence[Path], tracking_uri: str | None = None
) -> list[dict[str, Any]]:
    """One prediction per video: the pain class and its probabilities, or the valence/arousal value, by
    ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` of the store :func:`resolve_registry_uri`."""
    from pkdot.features.faces import ClipRequest, FaceClip, FaceDetector, extract_faces

    uri = resolve_registry_uri(tracking_uri)
    for video in videos:  # before anything is downloaded
        if not Path(video).is_file():
            raise PkdotError(f"video {video} does not exist")
    config_file = model_config_path(model_uri, tracking_uri=uri)
    try:
        cfg = load_config(config_file)
    finally:
        shutil.rmtree(config_file.parent, ignore_errors=True)  # a temporary download folder
    # the registered student is a torch.export program, exported in eval mode (it has no .eval())
    model = load_student(model_uri, tracking_uri=uri)
    detector = FaceDetector(cfg.features)
    classes = {"binary": [BIOVID_CLASSES[0], BIOVID_CLASSES[-1]], "multiclass": BIOVID_CLASSES}
    names = dict(enumerate(classes.get(cfg.data.task, ())))
    rows: list[dict[str, Any]] = []
    requests = [(video, [ClipRequest(sample_id=video.name)]) for video in map(Path, videos)]
    for video, clip in extract_faces(requests, cfg.features, detector):  # one clip per video, in order
        if not isinstance(clip, FaceClip):
            raise FeatureError(f"{video}: {clip.reason}")
        with torch.no_grad():
            out = model(torch.from_numpy(clip.frames[None]))
        # ModelOutput (pkdot's student), a dict of outputs (another dataclass), or the logits themselves
        logits = out["logits"] if isinstance(out, Mapping) else getattr(out, "logits", out)
        row: dict[str, Any] = {"video": str(video)}
        if cfg.data.is_regression:
            row[cfg.data.task] = float(logits[0, 0])
        else:
            probs = torch.softmax(logits[0], dim=0).numpy()
            k = int(np.argmax(probs))
            row["prediction"] = names.get(k, k)
            row["probabilities"] = {names.get(i, str(i)): round(float(p), 4) for i, p in enumerate(probs)}
        rows.append(row | {"face_found": clip.face_found})
    return rows
