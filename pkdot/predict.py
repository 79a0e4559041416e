"""``pkdot predict``: a registered student on raw videos (faces extracted with the stage-1 code)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pkdot.config import load_config
from pkdot.data.manifest import BIOVID_CLASSES
from pkdot.errors import FeatureError, PkdotError


def class_names(task: str) -> list[str]:
    if task == "binary":
        return [BIOVID_CLASSES[0], BIOVID_CLASSES[-1]]
    if task == "multiclass":
        return list(BIOVID_CLASSES)
    return []


def predict_videos(model_uri: str, videos: Sequence[Path]) -> list[dict[str, Any]]:
    """One prediction per video: the pain class and its probabilities, or the valence/arousal value."""
    from pkdot.features.faces import ClipRequest, FaceClip, FaceDetector, extract_video_clips
    from pkdot.tracking import load_student, model_config_path

    cfg = load_config(model_config_path(model_uri))
    # the registered student is a torch.export program, exported in eval mode (it has no .eval())
    model = load_student(model_uri)
    detector = FaceDetector(cfg.features)
    names = class_names(cfg.data.task)
    rows: list[dict[str, Any]] = []
    for video in videos:
        video = Path(video)
        if not video.is_file():
            raise PkdotError(f"video {video} does not exist")
        (clip,) = list(
            extract_video_clips(video, [ClipRequest(sample_id=video.name)], cfg.features, detector)
        )
        if not isinstance(clip, FaceClip):
            raise FeatureError(f"{video}: {clip.reason}")
        with torch.no_grad():
            out = model(torch.from_numpy(clip.frames[None]))
        logits = out.logits if hasattr(out, "logits") else out
        if cfg.data.is_regression:
            rows.append(
                {"video": str(video), cfg.data.task: float(logits[0, 0]), "face_found": clip.face_found}
            )
        else:
            probs = torch.softmax(logits[0], dim=0).numpy()
            k = int(np.argmax(probs))
            rows.append(
                {
                    "video": str(video),
                    "prediction": names[k] if k < len(names) else k,
                    "probabilities": {
                        names[i] if i < len(names) else str(i): round(float(p), 4)
                        for i, p in enumerate(probs)
                    },
                    "face_found": clip.face_found,
                }
            )
    return rows
