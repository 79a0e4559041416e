"""Face crops from video clips: decode, sample TSN-style, detect, track, crop, resize.

For each clip (a whole Biovid sample video, or an Aff-Wild2 window ``start_frame .. start_frame+num_frames``)
``T = n_frames`` frames are sampled, one in the middle of each of ``T`` equal segments (TSN). On each sampled
frame, downscaled to ``detect_width``, the face detector (OpenCV Haar cascade, or YuNet
``cv2.FaceDetectorYN`` with an ONNX model file) proposes boxes and the largest is kept. Frames where no face
is found reuse the box of the nearest frame (in time) where it was found, and are counted as *lost*. The box
sequence ``b_t = (x, y, w, h)`` is then smoothed with an exponential moving average

    s_0 = b_0,    s_t = a * s_{t-1} + (1 - a) * b_t,    a = ``box_smoothing``,

enlarged by ``face_margin`` of its size on every side, made square (side ``max(w, h) * (1 + 2 * margin)``
around the box centre; pixels outside the frame are black) and resized to ``crop_size``. One video is decoded
once for all its clips in a shard; only the sampled frames of clips not yet finished are held in memory.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np

from pkdot.config import FeatureConfig
from pkdot.errors import ConfigError, FeatureError

logger = logging.getLogger(__name__)

#: Bumped when the face pipeline changes in a way that changes its output (invalidates cached shards).
FACES_VERSION = 1
#: A clip whose first sampled frame lies further than this many frames into the video is reached by seeking
#: (to the key frame before it) instead of decoding from the start.
SEEK_MIN_FRAMES = 250
HAAR_CASCADE = "haarcascade_frontalface_default.xml"

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ClipRequest:
    """One clip to extract from a video: frames ``start .. start+length`` (``length`` None = to the end)."""

    sample_id: str
    start: int = 0
    length: int | None = None


@dataclass
class FaceClip:
    """Face crops of one clip.

    Attributes
    ----------
    frames : uint8 array (T, S, S, 3), RGB face crops.
    boxes : float32 array (T, 4), the smoothed face boxes (x, y, w, h) in source pixels.
    detected : bool array (T,), whether the detector found the face on each sampled frame.
    frame_indices : int array (T,), the sampled frame numbers in the video.
    """

    sample_id: str
    frames: np.ndarray
    boxes: np.ndarray
    detected: np.ndarray
    frame_indices: np.ndarray

    @property
    def face_found(self) -> float:
        return float(self.detected.mean())

    @property
    def lost_frames(self) -> int:
        return int((~self.detected).sum())


@dataclass
class ClipFailure:
    """A clip that could not be extracted, with the reason (it goes to the quarantine)."""

    sample_id: str
    reason: str
    sampled_frames: int = 0  # frames decoded and run through the detector (0 if decoding failed)


@dataclass
class _PendingClip:
    request: ClipRequest
    indices: np.ndarray
    frames: dict[int, np.ndarray] = field(default_factory=dict)


def sample_indices(num_frames: int, n_frames: int, start: int = 0) -> np.ndarray:
    """TSN sampling: the middle frame of each of ``n_frames`` equal segments of ``[start, start+num_frames)``.

    Index ``i`` is ``start + floor((i + 0.5) * num_frames / n_frames)``, ``i = 0 .. n_frames-1``; a clip
    shorter than ``n_frames`` repeats frames. Returns an int64 array of shape ``(n_frames,)``.
    """
    if num_frames < 1:
        raise FeatureError(f"clip has {num_frames} frames; expected at least 1")
    if n_frames < 1:
        raise ConfigError(f"features.n_frames must be >= 1, got {n_frames}")
    offsets = np.floor((np.arange(n_frames) + 0.5) * num_frames / n_frames).astype(np.int64)
    return start + np.minimum(offsets, num_frames - 1)


# ---- detectors ----------------------------------------------------------------------------------------------
class FaceDetector:
    """Largest-face detector on a frame downscaled to ``detect_width`` pixels.

    ``detect(rgb)`` returns ``(x, y, w, h)`` in the source frame's pixels, or None when no face is found.
    """

    def __init__(self, features: FeatureConfig) -> None:
        self.detect_width = features.detect_width
        self.kind = features.detector
        if self.kind == "yunet":
            model = features.yunet_model
            if model is None or not Path(model).is_file():
                raise ConfigError(
                    f"features.yunet_model: detector 'yunet' needs an existing ONNX model file, got {model!r}"
                )
            try:
                self._yunet = cv2.FaceDetectorYN.create(
                    str(model), "", (features.detect_width, features.detect_width)
                )
            except cv2.error as exc:
                raise FeatureError(
                    f"features.yunet_model {model}: OpenCV could not load it as a YuNet model: {exc}"
                ) from exc
        else:
            self._cascade = _haar_cascade()

    def detect(self, rgb: np.ndarray) -> Box | None:
        height, width = rgb.shape[:2]
        scale = min(1.0, self.detect_width / width)
        small = (
            rgb
            if scale == 1.0
            else cv2.resize(rgb, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        )
        if self.kind == "yunet":
            bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
            self._yunet.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, faces = self._yunet.detect(bgr)
            boxes = np.zeros((0, 4)) if faces is None else np.asarray(faces)[:, :4]
        else:
            gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
            min_side = max(16, small.shape[1] // 12)
            found = self._cascade.detectMultiScale(
                gray, scaleFactor=1.1, minNeighbors=4, minSize=(min_side, min_side)
            )
            boxes = np.asarray(found, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            return None
        x, y, w, h = boxes[int(np.argmax(boxes[:, 2] * boxes[:, 3]))] / scale
        return float(x), float(y), float(w), float(h)


@functools.lru_cache(maxsize=1)
def _haar_cascade() -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / HAAR_CASCADE  # type: ignore[attr-defined]
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise FeatureError(
            f"OpenCV Haar cascade {path} could not be loaded (expected opencv-python-headless 4.x)"
        )
    return cascade


# ---- tracking and cropping ----------------------------------------------------------------------------------
def smooth_boxes(detections: Sequence[Box | None], smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """Fill lost frames with the nearest detected box, then smooth with an EMA.

    Parameters
    ----------
    detections : T boxes ``(x, y, w, h)`` or None where the face was not found (at least one box).
    smoothing : EMA factor ``a`` in [0, 1): ``s_t = a s_{t-1} + (1 - a) b_t``.

    Returns
    -------
    boxes : float32 array (T, 4), the smoothed boxes.
    detected : bool array (T,).
    """
    detected = np.array([d is not None for d in detections], dtype=bool)
    if not detected.any():
        raise FeatureError("no face box to track: the face was not found in any frame")
    good = np.flatnonzero(detected)
    raw = np.array(
        [detections[i] if detections[i] is not None else (0, 0, 0, 0) for i in range(len(detections))],
        dtype=np.float64,
    )
    for i in np.flatnonzero(~detected):
        raw[i] = raw[good[np.argmin(np.abs(good - i))]]
    smoothed = np.empty_like(raw)
    smoothed[0] = raw[0]
    for t in range(1, len(raw)):
        smoothed[t] = smoothing * smoothed[t - 1] + (1.0 - smoothing) * raw[t]
    return smoothed.astype(np.float32), detected


def crop_face(rgb: np.ndarray, box: Sequence[float], margin: float, size: int) -> np.ndarray:
    """Square crop around ``box`` enlarged by ``margin`` per side, resized to ``(size, size, 3)`` uint8.

    The square's side is ``max(w, h) * (1 + 2 * margin)``, centred on the box centre; what falls outside the
    frame is black, so the face stays centred in the crop.
    """
    x, y, w, h = (float(v) for v in box)
    side = max(w, h) * (1.0 + 2.0 * margin)
    side_px = max(2, int(round(side)))
    x0 = int(round(x + w / 2.0 - side_px / 2.0))
    y0 = int(round(y + h / 2.0 - side_px / 2.0))
    height, width = rgb.shape[:2]
    patch = np.zeros((side_px, side_px, 3), dtype=np.uint8)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side_px, width), min(y0 + side_px, height)
    if sx1 > sx0 and sy1 > sy0:
        patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    interp = cv2.INTER_AREA if side_px > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


def faces_from_frames(
    sample_id: str,
    frames: Sequence[np.ndarray],
    indices: np.ndarray,
    features: FeatureConfig,
    detector: FaceDetector,
    source: str = "clip",
) -> FaceClip | ClipFailure:
    """Detect, track and crop the face on a clip's sampled RGB frames (each (H, W, 3) uint8).

    ``source`` names the clip (its video) in the failure reason.
    """
    detections = [detector.detect(f) for f in frames]
    if all(d is None for d in detections):
        return ClipFailure(
            sample_id,
            f"{source}: no face found in any of the {len(frames)} sampled frames (detector {features.detector})",
            sampled_frames=len(frames),
        )
    boxes, detected = smooth_boxes(detections, features.box_smoothing)
    crops = np.stack(
        [
            crop_face(f, b, features.face_margin, features.crop_size)
            for f, b in zip(frames, boxes, strict=True)
        ]
    )
    return FaceClip(sample_id, crops, boxes, detected, np.asarray(indices, dtype=np.int64))


# ---- decoding ----------------------------------------------------------------------------------------------
def _video_frame_count(path: Path) -> int:
    """Frames in the first video stream: container metadata, else a demux-only count of packets."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        return sum(1 for p in container.demux(stream) if p.size > 0)


def extract_video_clips(
    video_path: str | Path,
    clips: Sequence[ClipRequest],
    features: FeatureConfig,
    detector: FaceDetector | None = None,
) -> Iterator[FaceClip | ClipFailure]:
    """Face crops for every clip of one video, decoding the video once (frames are numbered in decode order).

    Yields one :class:`FaceClip` or :class:`ClipFailure` per requested clip (in completion order). A file that
    cannot be opened or decoded, has no video stream, or ends before a clip's frames gives a ClipFailure
    naming the file and the reason; no exception escapes for bad media.
    """
    path = Path(video_path)
    detector = detector or FaceDetector(features)
    try:
        pending, total = _plan_clips(path, clips, features.n_frames)
    except (av.FFmpegError, OSError, IndexError) as exc:
        reason = _media_reason(path, exc)
        for clip in clips:
            yield ClipFailure(clip.sample_id, reason)
        return
    yield from (p for p in pending if isinstance(p, ClipFailure))
    todo = [p for p in pending if isinstance(p, _PendingClip)]
    if not todo:
        return
    wanted: dict[int, list[_PendingClip]] = {}
    for p in todo:
        for idx in set(p.indices.tolist()):
            wanted.setdefault(idx, []).append(p)
    last_needed = max(wanted)
    first_needed = min(wanted)
    decoded = 0
    error: str | None = None
    try:
        for index, frame in _decode_from(path, first_needed):
            decoded = index + 1
            if index in wanted:
                rgb = frame.to_ndarray(format="rgb24")
                for p in wanted.pop(index):
                    p.frames[index] = rgb
                    if len(p.frames) == len(set(p.indices.tolist())):
                        todo.remove(p)
                        yield faces_from_frames(
                            p.request.sample_id,
                            [p.frames[i] for i in p.indices],
                            p.indices,
                            features,
                            detector,
                            f"video {path}",
                        )
                        p.frames.clear()
            if index >= last_needed:
                break
    except (av.FFmpegError, OSError) as exc:
        error = f"{_media_reason(path, exc)} (after frame {decoded})"
    for p in todo:
        reason = error or (
            f"video {path} is truncated: decoding stopped after {decoded} frames of {total}, "
            f"clip needs frames up to {int(p.indices.max())}"
        )
        yield ClipFailure(p.request.sample_id, reason)


def _plan_clips(
    path: Path, clips: Sequence[ClipRequest], n_frames: int
) -> tuple[list[_PendingClip | ClipFailure], int]:
    if not path.is_file():
        raise FileNotFoundError(f"video {path} does not exist")
    total = _video_frame_count(path)
    plans: list[_PendingClip | ClipFailure] = []
    for clip in clips:
        length = total - clip.start if clip.length is None else clip.length
        if clip.start < 0 or length < 1:
            plans.append(
                ClipFailure(
                    clip.sample_id, f"video {path}: clip window start {clip.start}, length {length} is empty"
                )
            )
            continue
        if clip.start + length > total:
            plans.append(
                ClipFailure(
                    clip.sample_id,
                    f"video {path} has {total} frames; clip window {clip.start}..{clip.start + length} runs past its end",
                )
            )
            continue
        plans.append(_PendingClip(clip, sample_indices(length, n_frames, clip.start)))
    return plans, total


def _decode_from(path: Path, first_needed: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """Decoded frames with their index (decode order from frame 0).

    When ``first_needed`` is far into the video, seek to the key frame two seconds before it and number the
    frames from the first decoded frame's timestamp; if that lands past ``first_needed`` (or gives no
    timestamp), decode from the start instead.
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate
        if first_needed > SEEK_MIN_FRAMES and rate and stream.time_base:
            target_s = max(0.0, first_needed / float(rate) - 2.0)
            container.seek(
                int(target_s / float(stream.time_base)), stream=stream, backward=True, any_frame=False
            )
            start_time = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            frames = container.decode(stream)
            first = next(frames, None)
            if first is not None and first.pts is not None:
                index = int(round((float(first.pts * stream.time_base) - start_time) * float(rate)))
                if 0 <= index <= first_needed:
                    yield index, first
                    for frame in frames:
                        index += 1
                        yield index, frame
                    return
            logger.debug("seek in %s landed past frame %d; decoding from the start", path, first_needed)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for index, frame in enumerate(container.decode(stream)):
            yield index, frame


def _media_reason(path: Path, exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) or not path.exists():
        return f"video {path} does not exist"
    if isinstance(exc, IndexError):
        return f"file {path} has no video stream"
    return f"file {path} is not a readable video (truncated or corrupt?): {exc}"
