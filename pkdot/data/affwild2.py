"""Aff-Wild2 (valence-arousal track) -> manifest of fixed-length clips, and the challenge's per-frame scoring.

Layout: ``videos/**/<video>.mp4|.avi``, ``annotations/VA_Estimation_Challenge/{Train_Set,Validation_Set}/
<video>.txt`` (header ``valence,arousal``, one ``v,a`` line per frame in [-1, 1]; -5 = unannotated). Clips are
windows of ``data.clip_frames`` frames every ``data.clip_stride``, kept when ``data.min_annotated`` of their
frames are annotated (labels: the means over those); ``sample_id = f"{video}@{start_frame}"``, ``subject_id``
= the stem without ``_left`` / ``_right``. With ``cropped_aligned/<stem>/<frame:05d>.jpg`` (1-based) and
``data.faces`` None or ``'frames'``, a clip's ``video_path`` is that folder; ``audio_path`` is the video."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pkdot.config import DataConfig
from pkdot.data.manifest import BadSamples, ManifestResult, manifest_frame, use_face_crops
from pkdot.errors import DatasetError

logger = logging.getLogger(__name__)

PARTITIONS = ("Train_Set", "Validation_Set")
VIDEO_SUFFIXES = (".mp4", ".avi")
#: Folder of the organisers' face crops: ``cropped_aligned/<annotation stem>/<frame:05d>.jpg`` (1-based).
FRAMES_DIR = "cropped_aligned"
UNANNOTATED = -5.0
_SIDE = re.compile(r"_(left|right)$")


def subject_of(stem: str) -> str:
    """Aff-Wild2 subject of an annotation stem: the stem without a trailing ``_left`` / ``_right``."""
    return _SIDE.sub("", stem)


def read_va_annotation(path: Path) -> np.ndarray:
    """Parse one annotation file into an ``(n_frames, 2)`` float array (NaN rows = unannotated frames);
    :class:`DatasetError` names the file and line of a bad header, line or value."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not a UTF-8 text file ({exc})") from exc
    lines = text.splitlines()
    if not lines or [c.strip().lower() for c in lines[0].split(",")] != ["valence", "arousal"]:
        first = lines[0] if lines else ""
        raise DatasetError(f"{path}: header {first!r} (expected 'valence,arousal')")
    values: list[tuple[float, float]] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            if any(rest.strip() for rest in lines[number - 1 :]):
                raise DatasetError(f"{path}: line {number} is empty (expected 'valence,arousal' numbers)")
            break
        try:
            v, a = (float(part) for part in line.split(","))
        except ValueError:
            raise DatasetError(f"{path}: line {number} {line!r} is not two comma-separated numbers") from None
        if v == UNANNOTATED or a == UNANNOTATED:
            values.append((np.nan, np.nan))
        elif not (-1.0 <= v <= 1.0 and -1.0 <= a <= 1.0):
            raise DatasetError(
                f"{path}: line {number} {line!r} has a value outside [-1, 1] (or -5 = unannotated)"
            )
        else:
            values.append((v, a))
    if not values:
        raise DatasetError(f"{path}: no annotation lines after the header (expected one line per frame)")
    return np.array(values, np.float64)


def clip_windows(n_frames: int, clip_frames: int, clip_stride: int) -> list[int]:
    """Start frames of the full windows ``[s, s + clip_frames)`` inside ``n_frames``, every ``clip_stride``."""
    return list(range(0, n_frames - clip_frames + 1, clip_stride))


def build_affwild2_manifest(data: DataConfig, root: Path) -> ManifestResult:
    """Manifest of an Aff-Wild2 root; raises :class:`DatasetError` on bad input (a bad annotation file or a
    missing video is skipped and listed under ``data.skip_bad``; a missing directory still raises)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Aff-Wild2 root {root} is not a directory (expected videos/ and annotations/)")
    ann_root = root / "annotations" / "VA_Estimation_Challenge"
    videos_dir = root / "videos"
    # Face crops: the organisers' cropped_aligned/<video>/<frame:05d>.jpg folders, or the videos.
    faces_dir = root / FRAMES_DIR
    want_video = "video" in data.modalities
    want_audio = "audio" in data.modalities
    use_frames = use_face_crops(
        data, f"Aff-Wild2 root {root}", faces_dir, "cropped_aligned/<video>/<frame:05d>.jpg"
    )
    need_videos = want_audio or (want_video and not use_frames)
    if need_videos and not videos_dir.is_dir():
        raise DatasetError(
            f"Aff-Wild2 root {root}: {videos_dir} does not exist (expected the .mp4/.avi videos)"
        )
    if not (present := [p for p in PARTITIONS if (ann_root / p).is_dir()]):
        raise DatasetError(
            f"Aff-Wild2 root {root}: neither {ann_root / PARTITIONS[0]} nor {ann_root / PARTITIONS[1]} exists "
            "(expected the VA annotation files)"
        )
    for p in [p for p in PARTITIONS if p not in present]:
        logger.warning("Aff-Wild2: %s is missing; only %s are read", ann_root / p, present)
    videos: dict[str, list[Path]] = {}  # stem -> every .mp4/.avi of that name under videos/ (sorted)
    for path in sorted(videos_dir.rglob("*")) if videos_dir.is_dir() else []:
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            videos.setdefault(path.stem, []).append(path)
    bad = BadSamples(data.skip_bad)
    rows: list[dict] = []
    n_annotations = 0
    for partition in present:
        for ann in sorted((ann_root / partition).glob("*.txt")):
            n_annotations += 1
            stem = ann.stem
            frames_dir = faces_dir / stem
            if use_frames and not frames_dir.is_dir():
                bad.bad(ann, stem, f"no face-crop folder {frames_dir} (expected <frame:05d>.jpg files)")
                continue
            candidates = videos.get(stem) or videos.get(subject_of(stem)) or [None]
            if need_videos and candidates == [None]:
                bad.bad(
                    ann, stem, f"no video named {stem}.mp4/.avi (or {subject_of(stem)}.*) under {videos_dir}"
                )
                continue
            if len(candidates) > 1:
                bad.bad(ann, stem, f"several videos match this annotation: {[str(c) for c in candidates]}")
                continue
            video = None if candidates[0] is None else str(candidates[0].resolve())
            try:
                va = read_va_annotation(ann)
            except DatasetError as exc:
                bad.bad(ann, stem, str(exc).removeprefix(f"{ann}: "))
                continue
            annotated = ~np.isnan(va[:, 0])
            clip_video = (str(frames_dir.resolve()) if use_frames else video) if want_video else None
            before = len(rows)
            for start in clip_windows(len(va), data.clip_frames, data.clip_stride):
                window = slice(start, start + data.clip_frames)
                mask = annotated[window]
                if mask.mean() < data.min_annotated:
                    continue
                v, a = va[window][mask].mean(axis=0)
                rows.append(
                    {
                        "sample_id": f"{stem}@{start}",
                        "subject_id": subject_of(stem),
                        "label": -1,
                        "class_name": "",
                        "valence": float(v),
                        "arousal": float(a),
                        "video_path": clip_video,
                        "audio_path": video if want_audio else None,
                        "start_frame": start,
                        "num_frames": data.clip_frames,
                        "partition": partition,
                        "dataset": "affwild2",
                    }
                )
            if len(rows) == before:
                logger.info(
                    "Aff-Wild2 %s: no clip of %d frames with >= %.0f%% annotated frames (%d frames)",
                    ann,
                    data.clip_frames,
                    100 * data.min_annotated,
                    len(va),
                )
    if n_annotations == 0:
        raise DatasetError(f"Aff-Wild2 root {root}: no annotation files (*.txt) under {ann_root}")
    if not rows:
        raise DatasetError(
            f"Aff-Wild2 root {root}: no clip of {data.clip_frames} frames with >= {data.min_annotated:.0%} "
            f"annotated frames" + (f" ({len(bad.skipped)} files skipped)" if bad.skipped else "")
        )
    frame = manifest_frame(rows).astype({"start_frame": "int64", "num_frames": "int64"})
    return bad.result(frame, f"Aff-Wild2 ({n_annotations} annotation files; a sample is a clip)")


# ---- the challenge's evaluation: per-frame predictions over the whole partition -----------------------------
def frame_predictions(
    manifest: pd.DataFrame, clip_predictions: pd.DataFrame, root: Path, task: str
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Per-frame ``(y_true, y_pred, counts)`` of the videos one run's ``clip_predictions`` (``sample_id``,
    ``y_pred``) cover, as the challenge scores: ``(F,)`` arrays over every annotated frame, in video order, and
    ``{"videos", "frames", "filled_frames"}``. A clip's prediction goes to every frame of its window (overlaps
    averaged); an annotated frame no clip covers takes the nearest predicted frame's (``filled_frames``)."""
    if task not in ("valence", "arousal"):
        raise DatasetError(f"frame-level CCC is for task 'valence' or 'arousal', got {task!r}")
    column = 0 if task == "valence" else 1
    clips = manifest.set_index("sample_id")[["start_frame", "num_frames", "partition"]]
    if missing := sorted(set(clip_predictions["sample_id"]) - set(clips.index)):
        raise DatasetError(f"predictions name clips that are not in the manifest, e.g. {missing[:3]}")
    joined = clip_predictions[["sample_id", "y_pred"]].join(clips, on="sample_id")
    joined["stem"] = joined["sample_id"].str.rsplit("@", n=1).str[0]
    trues, preds = [], []
    filled = 0
    for stem, rows in joined.groupby("stem", sort=True):
        partitions = set(rows["partition"])
        if len(partitions) != 1:
            raise DatasetError(
                f"Aff-Wild2 video {stem!r} has clips in several partitions {sorted(partitions)}"
            )
        ann = Path(root) / "annotations" / "VA_Estimation_Challenge" / partitions.pop() / f"{stem}.txt"
        labels = read_va_annotation(ann)[:, column]
        total, count = np.zeros(len(labels)), np.zeros(len(labels))
        for start, length, value in zip(rows["start_frame"], rows["num_frames"], rows["y_pred"], strict=True):
            window = slice(int(start), min(int(start) + int(length), len(labels)))
            total[window] += float(value)
            count[window] += 1
        covered = np.flatnonzero(count > 0)
        per_frame = np.divide(total, count, out=np.full(len(labels), np.nan), where=count > 0)
        annotated = np.flatnonzero(~np.isnan(labels))
        if (gaps := annotated[count[annotated] == 0]).size:
            nearest = np.clip(np.searchsorted(covered, gaps), 0, len(covered) - 1)
            left = np.clip(nearest - 1, 0, len(covered) - 1)
            left_closer = np.abs(covered[left] - gaps) <= np.abs(covered[nearest] - gaps)
            per_frame[gaps] = per_frame[np.where(left_closer, covered[left], covered[nearest])]
            filled += int(gaps.size)
        trues.append(labels[annotated])
        preds.append(per_frame[annotated])
    y_true, y_pred = (np.concatenate(ys) if ys else np.empty(0) for ys in (trues, preds))
    return y_true, y_pred, {"videos": len(trues), "frames": int(y_true.size), "filled_frames": filled}


def challenge_scores(
    manifest: pd.DataFrame, predictions: pd.DataFrame, root: Path, task: str, split: str = "test"
) -> pd.DataFrame:
    """Challenge-style CCC (Lin 1989) of every (model, fold, seed) run of ``predictions`` (rows of
    ``predictions.parquet`` files): per frame, concatenated over the test partition. One row per run: ``model``,
    ``fold``, ``seed``, ``frame_ccc``, ``videos``, ``frames``, ``filled_frames``."""
    from pkdot.metrics import ccc

    rows = []
    test = predictions[predictions["split"] == split]
    for (model, fold, seed), run in test.groupby(["model", "fold", "seed"], sort=True):
        y_true, y_pred, counts = frame_predictions(manifest, run, root, task)
        score = ccc(y_true, y_pred) if y_true.size >= 2 else float("nan")
        rows.append({"model": model, "fold": int(fold), "seed": int(seed), "frame_ccc": score, **counts})
    return pd.DataFrame(
        rows, columns=["model", "fold", "seed", "frame_ccc", "videos", "frames", "filled_frames"]
    )


def challenge_markdown(scores: pd.DataFrame, task: str) -> list[str]:
    """Report lines (Markdown) for :func:`challenge_scores`: per model, the mean per-frame CCC over runs."""
    lines = [
        f"## Challenge-style test CCC ({task}, per frame)",
        "",
        "Each clip's prediction is assigned to its annotated frames (overlaps averaged; annotated frames no clip "
        "covers take the nearest clip's prediction), and one CCC is computed over every annotated frame of the "
        "test partition, concatenated — the Aff-Wild2 challenge's way. The table above is per clip (clip "
        "predictions vs clip-mean labels, concatenated over the test subjects).",
        "",
    ]
    if scores.empty:
        return [*lines, "No test predictions to score.", ""]
    lines += [
        "| model | per-frame CCC (mean over runs) | runs | videos | frames | frames filled |",
        "|---|---|---|---|---|---|",
    ]
    for model, g in scores.groupby("model", sort=False):
        mean = float(np.nanmean(g["frame_ccc"])) if g["frame_ccc"].notna().any() else float("nan")
        lines.append(
            f"| `{model}` | {'n/a' if np.isnan(mean) else f'{mean:.3f}'} | {len(g)} | {int(g['videos'].iloc[0])} "
            f"| {int(g['frames'].iloc[0])} | {int(g['filled_frames'].iloc[0])} |"
        )
    return [*lines, ""]
