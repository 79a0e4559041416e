"""Face crops from video clips or face-crop folders: decode, sample TSN-style, detect, track, crop, resize.

A clip gives ``T = n_frames`` frames, the middle one of each of ``T`` equal segments, the only ones decoded. The
detector (Haar or YuNet) searches the frame downscaled so a ``features.min_face_px`` face spans its smallest
window, then tracks the face; boxes are filled, smoothed and cropped square. Face-crop folders need no
detection: sampled frame ``i`` is file ``i + 1``. A thread decodes ahead of the detector (our own read-ahead, a
one-thread executor: at 1388 x 1038 it brought extraction from 1.55-1.62x to 1.19-1.24x the decode-only time)."""

from __future__ import annotations

import bisect
import functools
import logging
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from pkdot.config import FeatureConfig
from pkdot.errors import ConfigError, FeatureError

logger = logging.getLogger(__name__)

#: PyAV decoder threading: none. The decoder has its own thread beside the detector, a seek drains frame threads,
#: and at 1388 x 1038 ``"AUTO"`` cost 1.4x the CPU time for no gain (``benchmarks/results/extract.md``).
DECODE_THREAD_TYPE = "NONE"
#: Frames :func:`extract_faces` decodes ahead of the detector in a thread (PyAV and OpenCV release the GIL, so
#: decoding overlaps detection); bounds what the read-ahead holds (one 1388 x 1038 frame is 2.2 MB).
READ_AHEAD_FRAMES = 16
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
#: Smallest face (pixels, on the frame the detector sees) each detector finds: the Haar cascade's window is
#: 24 x 24; YuNet's smallest anchors are ~10 px, 20 px keeps its recall.
DETECTOR_MIN_PX: dict[str, int] = {"haar": 24, "yunet": 20}
#: Tracking window: the search region around the last box is this many box widths per side.
TRACK_PAD = 0.75
#: Tracking accepts faces from ``TRACK_MIN_SCALE`` to ``TRACK_MAX_SCALE`` times the last box width.
TRACK_MIN_SCALE, TRACK_MAX_SCALE = 0.75, 1.33
#: Template tracking: the face patch is matched at this width (pixels), and a match needs this correlation.
TEMPLATE_PX, TEMPLATE_MIN_SCORE = 32, 0.6
#: A clip is *blank* when every sampled frame's grey levels have a standard deviation below ``BLANK_SD``, and
#: *frozen* when every sampled frame differs from the first by less than ``FROZEN_DIFF`` grey levels on average
#: (a re-encoded still image differs by ~0.02; a face moving 3 px between samples by ~20).
BLANK_SD, FROZEN_DIFF = 2.0, 0.5
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_SIDE = re.compile(r"_(left|right)$")

Box = tuple[float, float, float, float]


class YuvFrame:
    """A decoded ``yuv420p`` frame kept as its planes: the detector reads luma as grey, :func:`image_rgb`
    converts only the region it is asked for."""

    __slots__ = ("_frame", "y", "u", "v")

    def __init__(self, frame: av.VideoFrame) -> None:
        height, width = frame.height, frame.width
        chroma = ((height + 1) // 2, (width + 1) // 2)
        self._frame = frame  # the planes are views of its buffers (no copy): keep it alive with them
        self.y = _plane(frame.planes[0], height, width)
        self.u, self.v = (_plane(frame.planes[k], *chroma) for k in (1, 2))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.y.shape[0], self.y.shape[1], 3)


def _plane(plane: av.video.plane.VideoPlane, height: int, width: int) -> np.ndarray:
    view = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:height, :width]
    view.flags.writeable = False
    return view


#: A frame: an RGB array (H, W, 3) uint8 or a :class:`YuvFrame`.
Image = np.ndarray | YuvFrame


def as_image(frame: av.VideoFrame) -> Image:
    """A decoded frame as a :class:`YuvFrame` (``yuv420p``) or, for any other pixel format, an RGB array."""
    if frame.format.name == "yuv420p" and frame.width >= 2 and frame.height >= 2:
        return YuvFrame(frame)
    return frame.to_ndarray(format="rgb24")


def shrink(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Downscale to ``size`` (width, height) by area averaging; beyond 4x, first keep every ``k = floor(ratio /
    2)``-th pixel (>= 2 x 2 source pixels per output pixel, ``1 / k^2`` of the cost; RGB pixels copied as one
    item each, 2x faster than OpenCV reads a strided view)."""
    height, width = image.shape[:2]
    k = int(min(width / size[0], height / size[1]) / 2)
    if k >= 2 and image.ndim == 3 and image.dtype == np.uint8 and image.strides[1:] == (image.shape[2], 1):
        image = np.ascontiguousarray(image.view(np.dtype((np.void, image.shape[2])))[::k, ::k]).view(np.uint8)
    elif k >= 2:
        image = image[::k, ::k]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def image_gray(image: Image, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Grey (luma) pixels ``[y0:y1, x0:x1]`` of a frame, uint8 (y1 - y0, x1 - x0)."""
    if isinstance(image, YuvFrame):
        return image.y[y0:y1, x0:x1]
    return cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)


def image_rgb(image: Image, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """RGB pixels ``[y0:y1, x0:x1]`` of a frame (for a :class:`YuvFrame`, that region widened to even bounds,
    converted with OpenCV's I420 -> RGB, and cut)."""
    if not isinstance(image, YuvFrame):
        return image[y0:y1, x0:x1]
    ex0, ey0 = x0 - x0 % 2, y0 - y0 % 2
    w = x1 - ex0 + (x1 - ex0) % 2
    h = y1 - ey0
    h += (-h) % 4
    buf = np.empty((h * 3 // 2, w), np.uint8)
    luma = image.y[ey0 : ey0 + h, ex0 : ex0 + w]
    if luma.shape != (h, w):  # the widened region leaves the frame: black (Y 16, U V 128) outside
        buf[:h] = 16
    buf[: luma.shape[0], : luma.shape[1]] = luma
    for k, chroma_plane in enumerate((image.u, image.v)):
        c = chroma_plane[ey0 // 2 : ey0 // 2 + h // 2, ex0 // 2 : ex0 // 2 + w // 2]
        dest = buf[h + k * h // 4 : h + (k + 1) * h // 4].reshape(h // 2, w // 2)
        if c.shape != dest.shape:
            dest[:] = 128
        dest[: c.shape[0], : c.shape[1]] = c
    rgb = cv2.cvtColor(buf, cv2.COLOR_YUV2RGB_I420)
    return rgb[y0 - ey0 : y1 - ey0, x0 - ex0 : x1 - ex0]


@dataclass(frozen=True)
class ClipRequest:
    """One clip to extract: frames ``start .. start+length`` (None = to the end); ``side`` picks the face in that
    half of the frame (two-person videos)."""

    sample_id: str
    start: int = 0
    length: int | None = None
    side: str | None = None


@dataclass
class FaceClip:
    """Face crops of one clip: ``frames`` (T, S, S, 3) uint8 RGB, ``boxes`` (T, 4) smoothed (x, y, w, h) in
    source pixels, ``detected`` (T,), ``frame_indices`` (T,), ``video_seconds`` (None for a face-crop folder)."""

    sample_id: str
    frames: np.ndarray
    boxes: np.ndarray
    detected: np.ndarray
    frame_indices: np.ndarray
    video_seconds: float | None = None

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
    """TSN sampling: the middle frame of each of ``n_frames`` equal segments of ``[start, start+num_frames)``
    (int64 ``(n_frames,)``; a shorter clip repeats frames)."""
    if num_frames < 1:
        raise FeatureError(f"clip has {num_frames} frames; expected at least 1")
    offsets = np.floor((np.arange(n_frames) + 0.5) * num_frames / n_frames).astype(np.int64)
    return start + np.minimum(offsets, num_frames - 1)


def frames_problem(grey: Sequence[np.ndarray], indices: np.ndarray) -> str | None:
    """Why a clip's sampled grey frames hold no usable face (:data:`BLANK_SD`, :data:`FROZEN_DIFF`), or None
    (each test stops at the first frame that passes it: a usable clip costs one sd and one difference)."""
    small = [np.asarray(g)[::4, ::4] for g in grey]
    sd = lambda g: float(g.astype(np.float32).std())  # noqa: E731
    change = lambda g: float(np.abs(g.astype(np.float32) - small[0]).mean())  # noqa: E731
    if not any(sd(g) >= BLANK_SD for g in small):
        return (
            f"blank: every one of the {len(small)} sampled frames is one flat colour "
            f"(grey-level sd {max(map(sd, small)):.2g} < {BLANK_SD})"
        )
    distinct = sorted(set(np.asarray(indices).tolist()))
    if len(distinct) > 1 and not any(change(g) >= FROZEN_DIFF for g in small[1:]):
        return (
            f"frozen: the {len(distinct)} sampled frames {distinct[0]}..{distinct[-1]} are identical "
            f"(mean grey-level change {max(map(change, small[1:])):.2g} < {FROZEN_DIFF})"
        )
    return None


def face_side(sample_id: str, source: str | Path) -> str | None:
    """The person of a two-person Aff-Wild2 clip ``<video>_left|right@<start>``: ``"left"``, ``"right"``, or None
    when the ``source`` is named after the annotation (it holds one person)."""
    stem = str(sample_id).rsplit("@", 1)[0]
    match = _SIDE.search(stem)
    return None if match is None or stem in (Path(source).stem, Path(source).name) else match.group(1)


# ---- detectors ----------------------------------------------------------------------------------------------
class FaceDetector:
    """Face detector on frames downscaled so that a ``min_face_px``-wide face spans the detector's minimum;
    ``full_searches`` / ``local_searches`` / ``template_tracks`` count the calls."""

    def __init__(self, features: FeatureConfig) -> None:
        self.kind = features.detector
        self.min_face_px = features.min_face_px
        self.detect_width = features.detect_width
        self.min_px = DETECTOR_MIN_PX[self.kind]
        self.full_searches = self.local_searches = self.template_tracks = 0
        self._warned_widths: set[int] = set()
        if self.kind == "yunet":
            model = features.yunet_model
            if model is None or not Path(model).is_file():
                raise ConfigError(
                    f"features.yunet_model: detector 'yunet' needs an existing ONNX model file, got {model!r}"
                )
            try:
                self._yunet = cv2.FaceDetectorYN.create(str(model), "", (320, 320))
            except cv2.error as exc:
                raise FeatureError(
                    f"features.yunet_model {model}: OpenCV could not load it as a YuNet model: {exc}"
                ) from exc
        else:
            self._cascade = _haar_cascade()

    def scale_for(self, width: int) -> float:
        """Detection scale for a frame ``width`` pixels wide: ``min(1, m / min_face_px[, detect_width / width])``."""
        scale = min(1.0, self.min_px / self.min_face_px)
        if self.detect_width is not None and self.detect_width / width < scale:
            scale = self.detect_width / width
            if width not in self._warned_widths:
                self._warned_widths.add(width)
                logger.warning(
                    "features.detect_width %d caps detection on %d-px frames: the smallest face found is %.0f px, "
                    "not features.min_face_px %d",
                    self.detect_width,
                    width,
                    self.min_px / scale,
                    self.min_face_px,
                )
        return scale

    def smallest_face(self, width: int) -> float:
        """Width in source pixels of the smallest face found on a frame ``width`` pixels wide."""
        return self.min_px / self.scale_for(width)

    def _search(
        self, image: Image, region: tuple[int, ...], scale: float, max_side: int = 0, coarse: bool = False
    ) -> np.ndarray:
        """Boxes (K, 4) in source pixels found in ``region`` resized by ``scale``, ``min_px`` to ``max_side`` (0:
        any) wide on it (``coarse``: a faster pyramid)."""
        x0, y0, x1, y1 = region
        size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
        if self.kind == "yunet":
            rgb = image_rgb(image, x0, y0, x1, y1)
            small = rgb if scale == 1.0 else cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            bgr = cv2.cvtColor(small, cv2.COLOR_RGB2BGR)
            self._yunet.setInputSize((bgr.shape[1], bgr.shape[0]))
            _, faces = self._yunet.detect(bgr)
            boxes = np.zeros((0, 4)) if faces is None else np.asarray(faces, np.float64)[:, :4]
            boxes = boxes[(boxes[:, 2] >= self.min_px) & (boxes[:, 2] <= (max_side or np.inf))]
        else:
            gray = image_gray(image, x0, y0, x1, y1)
            gray = gray if scale == 1.0 else shrink(gray, size)
            if min(gray.shape) < self.min_px:
                return np.zeros((0, 4))
            found = self._cascade.detectMultiScale(
                gray,
                scaleFactor=1.2 if coarse else 1.1,
                minNeighbors=3 if coarse else 4,
                minSize=(self.min_px, self.min_px),
                maxSize=(max_side, max_side) if max_side else (0, 0),
            )
            boxes = np.asarray(found, dtype=np.float64).reshape(-1, 4)
        return boxes / scale + (x0, y0, 0, 0)

    def detect_all(self, rgb: Image, wanted: Callable[[np.ndarray], object] | None = None) -> np.ndarray:
        """Faces on the whole frame, (K, 4) source pixels: large faces at half the detection scale first, then
        (when none is found or passes ``wanted``) the smaller ones at the full scale."""
        self.full_searches += 1
        height, width = rgb.shape[:2]
        scale = self.scale_for(width)
        region = (0, 0, width, height)
        large = self._search(rgb, region, scale / 2.0, coarse=True)
        if len(large) and (wanted is None or wanted(large)):
            return large
        small = self._search(rgb, region, scale, 2 * self.min_px + 2, coarse=True)
        return np.concatenate([large.reshape(-1, 4), small.reshape(-1, 4)])

    def detect_near(self, rgb: Image, box: Sequence[float]) -> np.ndarray:
        """Faces in the tracking window of ``box``, 0.6-1.6 times its width: (K, 4) source pixels."""
        self.local_searches += 1
        side = max(float(box[2]), float(box[3]))
        x0, y0, x1, y1 = _track_window(rgb, box)
        if x1 - x0 < self.min_px or y1 - y0 < self.min_px:
            return np.zeros((0, 4))
        scale = min(1.0, self.min_px / (TRACK_MIN_SCALE * side))
        max_side = max(self.min_px + 1, int(np.ceil(TRACK_MAX_SCALE * side * scale)))
        return self._search(rgb, (x0, y0, x1, y1), scale, max_side)

    def _template_scale(self, box: Sequence[float]) -> float:
        return min(1.0, TEMPLATE_PX / max(float(box[2]), float(box[3]), 1.0))

    def face_template(self, image: Image, box: Sequence[float]) -> np.ndarray | None:
        """The grey face patch of ``box``, downscaled to ~``TEMPLATE_PX`` wide (None if it leaves the frame)."""
        x, y, w, h = (int(round(float(v))) for v in box)
        height, width = image.shape[:2]
        if x < 0 or y < 0 or x + w > width or y + h > height or w < 4 or h < 4:
            return None
        scale = self._template_scale(box)
        gray = image_gray(image, x, y, x + w, y + h)
        size = (max(4, round(w * scale)), max(4, round(h * scale)))
        return shrink(gray, size)

    def match_near(self, image: Image, box: Sequence[float], template: np.ndarray) -> Box | None:
        """``box`` moved to the best template match near it, or None below :data:`TEMPLATE_MIN_SCORE`."""
        self.template_tracks += 1
        x0, y0, x1, y1 = _track_window(image, box)
        scale = self._template_scale(box)
        size = (round((x1 - x0) * scale), round((y1 - y0) * scale))
        if size[0] < template.shape[1] or size[1] < template.shape[0]:
            return None
        roi = shrink(image_gray(image, x0, y0, x1, y1), size)
        scores = cv2.matchTemplate(roi, template, cv2.TM_CCOEFF_NORMED)
        _, best, _, (mx, my) = cv2.minMaxLoc(scores)
        if not np.isfinite(best) or best < TEMPLATE_MIN_SCORE:
            return None
        return x0 + mx / scale, y0 + my / scale, float(box[2]), float(box[3])

    def detect(self, rgb: Image) -> Box | None:
        """The largest face on the whole frame, or None."""
        return choose_face(self.detect_all(rgb), rgb.shape[1])


def _track_window(image: Image, box: Sequence[float]) -> tuple[int, int, int, int]:
    """The tracking search region ``(x0, y0, x1, y1)``: ``box`` widened by ``TRACK_PAD`` widths per side."""
    x, y, w, h = (float(v) for v in box)
    pad = TRACK_PAD * max(w, h)
    height, width = image.shape[:2]
    x0, y0 = max(0, int(x - pad)), max(0, int(y - pad))
    return x0, y0, min(width, int(np.ceil(x + w + pad))), min(height, int(np.ceil(y + h + pad)))


@functools.lru_cache(maxsize=1)
def _haar_cascade() -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / HAAR_CASCADE  # type: ignore[attr-defined]
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise FeatureError(
            f"OpenCV Haar cascade {path} could not be loaded (expected opencv-python-headless 4.x)"
        )
    return cascade


# ---- choosing and tracking ----------------------------------------------------------------------------------
def choose_face(
    boxes: np.ndarray, frame_width: int, side: str | None = None, previous: Sequence[float] | None = None
) -> Box | None:
    """The face to keep among ``boxes`` (K, 4): the one nearest ``previous`` (closer than its width), else the
    largest with its centre in the ``side`` half of the frame; None if no box qualifies."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return None
    centres = boxes[:, :2] + boxes[:, 2:] / 2.0
    if previous is not None:
        px, py, pw, ph = (float(v) for v in previous)
        dist = np.hypot(centres[:, 0] - (px + pw / 2.0), centres[:, 1] - (py + ph / 2.0))
        best = int(np.argmin(dist))
        if dist[best] < max(pw, ph):
            return tuple(float(v) for v in boxes[best])  # type: ignore[return-value]
    if side is not None:
        if side not in ("left", "right"):
            raise ConfigError(f"face side must be 'left' or 'right', got {side!r}")
        on_side = centres[:, 0] < frame_width / 2.0 if side == "left" else centres[:, 0] >= frame_width / 2.0
        boxes = boxes[on_side]
        if len(boxes) == 0:
            return None
    x, y, w, h = boxes[int(np.argmax(boxes[:, 2] * boxes[:, 3]))]
    return float(x), float(y), float(w), float(h)


def track_faces(
    frames: Sequence[Image], detector: FaceDetector, side: str | None = None, detect_every: int = 3
) -> list[Box | None]:
    """One face box (or None) per frame of a clip: the whole frame is searched until a face is found or when it
    is lost, then the detector runs near the box every ``detect_every``-th frame, template matching in between."""
    detections: list[Box | None] = []
    previous: Box | None = None
    template: np.ndarray | None = None
    last_detection = -detect_every
    for t, image in enumerate(frames):
        box: Box | None = None
        width = image.shape[1]
        if previous is not None and template is not None and t - last_detection < detect_every:
            box = detector.match_near(image, previous, template)
        if box is None and previous is not None:
            box = choose_face(detector.detect_near(image, previous), width, None, previous)
            last_detection = t
        if box is None:
            qualifies = functools.partial(choose_face, frame_width=width, side=side, previous=previous)
            box = choose_face(detector.detect_all(image, qualifies), width, side, previous)
            last_detection = t
        detections.append(box)
        if box is not None:
            previous = box
            template = detector.face_template(image, box)
    return detections


def smooth_boxes(detections: Sequence[Box | None], smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """Fill lost frames (None) with the nearest detected box, then smooth with an EMA ``s_t = a s_{t-1} + (1 - a)
    b_t``, ``a = smoothing``; returns float32 boxes (T, 4) and ``detected`` (T,)."""
    detected = np.array([d is not None for d in detections], dtype=bool)
    if not detected.any():
        raise FeatureError("no face box to track: the face was not found in any frame")
    good = np.flatnonzero(detected)
    raw = np.array([(0, 0, 0, 0) if d is None else d for d in detections], dtype=np.float64)
    raw = raw[good[np.abs(good[None, :] - np.arange(len(raw))[:, None]).argmin(axis=1)]]
    smoothed = np.empty_like(raw)
    smoothed[0] = raw[0]
    for t in range(1, len(raw)):
        smoothed[t] = smoothing * smoothed[t - 1] + (1.0 - smoothing) * raw[t]
    return smoothed.astype(np.float32), detected


def crop_face(rgb: Image, box: Sequence[float], margin: float, size: int) -> np.ndarray:
    """Square crop (side ``max(w, h) * (1 + 2 * margin)``, black outside the frame) centred on ``box``, resized
    to ``(size, size, 3)`` uint8."""
    x, y, w, h = (float(v) for v in box)
    side_px = max(2, int(round(max(w, h) * (1.0 + 2.0 * margin))))
    x0 = int(round(x + w / 2.0 - side_px / 2.0))
    y0 = int(round(y + h / 2.0 - side_px / 2.0))
    height, width = rgb.shape[:2]
    patch = np.zeros((side_px, side_px, 3), dtype=np.uint8)
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side_px, width), min(y0 + side_px, height)
    if sx1 > sx0 and sy1 > sy0:
        patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image_rgb(rgb, sx0, sy0, sx1, sy1)
    if side_px > size:
        return shrink(patch, (size, size))
    return cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)


def faces_from_frames(
    clip: _PendingClip, features: FeatureConfig, detector: FaceDetector, source: str
) -> FaceClip | ClipFailure:
    """Detect, track and crop the face on a clip's sampled frames (``source`` names it in a failure)."""
    sample_id, side, indices = clip.request.sample_id, clip.request.side, clip.indices
    frames = [clip.frames[i] for i in indices]
    problem = frames_problem([image_gray(f, 0, 0, f.shape[1], f.shape[0]) for f in frames], indices)
    if problem is not None:
        return ClipFailure(sample_id, f"{source} is {problem}", sampled_frames=len(frames))
    detections = track_faces(frames, detector, side, features.detect_every)
    if all(d is None for d in detections):
        width = frames[0].shape[1] if len(frames) else 0
        where = f" in the {side} half of the frame" if side else ""
        return ClipFailure(
            sample_id,
            f"{source}: no face found{where} in any of the {len(frames)} sampled frames (detector "
            f"{features.detector}, smallest face {detector.smallest_face(width):.0f} px = features.min_face_px)",
            sampled_frames=len(frames),
        )
    boxes, detected = smooth_boxes(detections, features.box_smoothing)
    margin, size = features.face_margin, features.crop_size
    crops = np.stack([crop_face(f, b, margin, size) for f, b in zip(frames, boxes, strict=True)])
    return FaceClip(sample_id, crops, boxes, detected, np.asarray(indices, dtype=np.int64))


# ---- decoding ----------------------------------------------------------------------------------------------
def video_length(path: Path) -> tuple[int, float | None]:
    """Frames in the first video stream (metadata, else a count of demuxed packets) and its fps (or None)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        if stream.frames and stream.frames > 0:
            return int(stream.frames), fps
        return sum(1 for p in container.demux(stream) if p.size > 0), fps


def extract_faces(
    sources: Iterable[tuple[str | Path, Sequence[ClipRequest]]],
    features: FeatureConfig,
    detector: FaceDetector,
) -> Iterator[tuple[str | Path, FaceClip | ClipFailure]]:
    """``(source, FaceClip or ClipFailure)`` for every clip of each ``(video file or face-crop folder, clips)``
    (bad media included), folders first, then videos in completion order, each needed frame decoded once. A
    thread decodes up to :data:`READ_AHEAD_FRAMES` frames ahead, into the next video, while this one detects."""
    videos = []
    for path, clips in sources:
        if Path(path).is_dir():
            yield from ((path, clip) for clip in extract_folder_clips(path, clips, features))
        else:
            videos.append((path, clips))
    video = _Video("")
    for item in _read_ahead(_read_videos(videos, features.n_frames), READ_AHEAD_FRAMES):
        if isinstance(item, _Video):
            video = item
        elif isinstance(item, ClipFailure):
            yield video.path, item
        elif isinstance(item, tuple):
            for p in video.wanted.pop(item[0]):
                p.frames[item[0]] = item[1]
                if len(p.frames) == len(set(p.indices.tolist())):
                    video.todo.remove(p)
                    clip = faces_from_frames(p, features, detector, f"video {video.path}")
                    if isinstance(clip, FaceClip) and video.fps:
                        clip.video_seconds = video.total / video.fps
                    yield video.path, clip
                    p.frames.clear()
        else:  # the video's end: how many frames were decoded, or why decoding stopped
            stop = f"video {video.path} is truncated: decoding stopped after {item} frames of {video.total}"
            for p in video.todo:
                reason = (
                    item if isinstance(item, str) else f"{stop}, clip needs frames up to {p.indices.max()}"
                )
                yield video.path, ClipFailure(p.request.sample_id, reason)


@dataclass
class _Video:
    """A video as :func:`_read_videos` hands it over, with the clips to cut from its frames."""

    path: str | Path
    total: int = 0
    fps: float | None = None
    todo: list[_PendingClip] = field(default_factory=list)
    wanted: dict[int, list[_PendingClip]] = field(default_factory=dict)  # frame index -> clips that need it


def _read_videos(
    videos: Iterable[tuple[str | Path, Sequence[ClipRequest]]], n_frames: int
) -> Iterator[_Video | ClipFailure | tuple[int, Image] | int | str]:
    """The decoding half of :func:`extract_faces`: per video its :class:`_Video`, its clips that fail at once,
    its needed frames ``(index, image)`` in order, then the number of frames decoded or why decoding stopped."""
    for video_path, clips in videos:
        path = Path(video_path)
        try:
            if not path.is_file():
                raise FileNotFoundError(f"video {path} does not exist")
            video = _Video(video_path, *video_length(path))
        except (av.FFmpegError, OSError, IndexError) as exc:
            yield _Video(video_path)
            yield from (ClipFailure(c.sample_id, _media_reason(path, exc)) for c in clips)
            yield 0
            continue
        windows = [
            (c, _sample_window(f"video {path}", c, video.total, n_frames, bounded=True)) for c in clips
        ]
        video.todo = [_PendingClip(c, w) for c, w in windows if not isinstance(w, str)]
        for p in video.todo:
            for idx in set(p.indices.tolist()):
                video.wanted.setdefault(idx, []).append(p)
        needed, decoded = sorted(video.wanted), -1  # the last frame decoded
        yield video  # the consumer's from here on
        yield from (ClipFailure(c.sample_id, w) for c, w in windows if isinstance(w, str))
        try:
            for decoded, frame in decode_frames(path, needed) if needed else ():
                yield decoded, as_image(frame)
        except (av.FFmpegError, OSError) as exc:
            yield f"{_media_reason(path, exc)} (after frame {decoded + 1})"
            continue
        yield decoded + 1


def _read_ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items``, each taken by one thread up to ``depth`` ahead of the caller (an exception is raised here)."""
    done = object()
    with ThreadPoolExecutor(1, "pkdot-read-ahead") as pool:
        ahead = deque(pool.submit(next, items, done) for _ in range(depth))
        try:
            while (item := ahead.popleft().result()) is not done:
                ahead.append(pool.submit(next, items, done))
                yield item
        finally:  # the caller stopped: no more items
            pool.shutdown(cancel_futures=True)


def _sample_window(src: str, clip: ClipRequest, total: int, n_frames: int, bounded: bool) -> np.ndarray | str:
    """The sampled frame indices of ``clip`` in a source of ``total`` frames, or why its window is unusable."""
    length = total - clip.start if clip.length is None else clip.length
    if clip.start < 0 or length < 1:
        return f"{src}: clip window start {clip.start}, length {length} is empty"
    if bounded and clip.start + length > total:
        return f"{src} has {total} frames; clip window {clip.start}..{clip.start + length} runs past its end"
    return sample_indices(length, n_frames, clip.start)


@dataclass
class FrameTable:
    """Presentation timestamps of a video stream's frames (sorted) and the indices of its key frames."""

    pts: list[int]
    keyframes: list[int]


def frame_table(path: str | Path) -> FrameTable | None:
    """Demux (no decoding) the sorted frame timestamps and key frames; None if one is missing or shared."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [(p.pts, bool(p.is_keyframe)) for p in container.demux(stream) if p.size > 0]
    if not packets or any(pts is None for pts, _ in packets):
        return None
    pts = sorted(int(p) for p, _ in packets)  # type: ignore[arg-type]
    if len(set(pts)) != len(pts):
        return None
    rank = {p: i for i, p in enumerate(pts)}
    keyframes = sorted(rank[int(p)] for p, key in packets if key)  # type: ignore[arg-type]
    return FrameTable(pts, keyframes) if keyframes and keyframes[0] == 0 else None


class _SeekMismatch(Exception):
    """Decoding after a seek did not give the expected frames (timestamps disagree with the demux pass)."""


def decode_frames(path: str | Path, needed: Sequence[int]) -> Iterator[tuple[int, av.VideoFrame]]:
    """The frames ``needed`` (0-based) of a video, in order, seeking to key frames when that saves decoding (else,
    or when a seek lands elsewhere, decoding from the start)."""
    needed = sorted(set(int(i) for i in needed))
    table = frame_table(path)
    done: set[int] = set()
    if table is not None:
        try:
            for index, frame in _decode_seeking(path, needed, table):
                done.add(index)
                yield index, frame
            return
        except _SeekMismatch as exc:
            logger.debug("seeking in %s failed (%s); decoding from the start", path, exc)
    if not (wanted := set(needed) - done):
        return
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = DECODE_THREAD_TYPE
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                yield index, frame
                wanted.discard(index)
                if not wanted:
                    return


def _decode_seeking(
    path: str | Path, needed: list[int], table: FrameTable
) -> Iterator[tuple[int, av.VideoFrame]]:
    rank = {p: i for i, p in enumerate(table.pts)}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = DECODE_THREAD_TYPE
        frames: Iterator[av.VideoFrame] | None = None
        position = -1  # the last decoded frame
        for target in needed:
            if target >= len(table.pts):
                return
            key = table.keyframes[bisect.bisect_right(table.keyframes, target) - 1]
            if frames is None or target <= position or key > position + 1:
                container.seek(table.pts[key], stream=stream, backward=True, any_frame=False)
                frames = iter(container.decode(stream))
                position = key - 1
            for frame in frames:
                index = rank.get(frame.pts) if frame.pts is not None else None
                if index is None:
                    raise _SeekMismatch(
                        f"decoded a frame with pts {frame.pts} that the demux pass did not list"
                    )
                position = index
                if index == target:
                    yield index, frame
                    break
                if index > target:
                    raise _SeekMismatch(f"frame {index} decoded while looking for frame {target}")
            else:
                return  # the stream ended before ``target``: truncated


def _media_reason(path: Path, exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) or not path.exists():
        return f"video {path} does not exist"
    if isinstance(exc, IndexError):
        return f"file {path} has no video stream"
    return f"file {path} is not a readable video (truncated or corrupt?): {exc}"


# ---- face-crop folders --------------------------------------------------------------------------------------
def index_frame_folder(folder: str | Path) -> dict[int, Path]:
    """``frame number -> image`` of a face-crop folder: files ``<digits>.jpg|.jpeg|.png|.bmp`` (numbers as named)."""
    index: dict[int, Path] = {}
    for path in Path(folder).iterdir():
        if path.suffix.lower() in IMAGE_SUFFIXES and path.stem.isdigit() and path.is_file():
            number = int(path.stem)
            if number in index:
                raise FeatureError(
                    f"frame folder {folder}: frame {number} appears twice ({index[number].name}, {path.name})"
                )
            index[number] = path
    return index


def extract_folder_clips(
    folder: str | Path, clips: Sequence[ClipRequest], features: FeatureConfig
) -> Iterator[FaceClip | ClipFailure]:
    """Face crops for every clip of one face-crop folder: frame ``i`` is file ``i + 1`` (missing = no face),
    resized to ``crop_size``, box = the image's extent; a :class:`ClipFailure` when no image can be used."""
    folder = Path(folder)
    try:
        if not folder.is_dir():
            raise FeatureError(f"frame folder {folder} does not exist")
        if not (files := index_frame_folder(folder)):
            raise FeatureError(
                f"frame folder {folder} has no frame images (expected <frame number>{'/'.join(IMAGE_SUFFIXES)})"
            )
    except (FeatureError, OSError) as exc:
        yield from (ClipFailure(clip.sample_id, str(exc)) for clip in clips)
        return
    last = max(files)
    size = features.crop_size
    for clip in clips:
        indices = _sample_window(f"frame folder {folder}", clip, last, features.n_frames, bounded=False)
        if isinstance(indices, str):
            yield ClipFailure(clip.sample_id, indices)
            continue
        present = [i for i in sorted(set(indices.tolist())) if i + 1 in files]
        images = {i: cv2.imread(str(files[i + 1]), cv2.IMREAD_COLOR) for i in present}
        if broken := [files[i + 1].name for i in present if images[i] is None]:
            yield ClipFailure(clip.sample_id, f"frame folder {folder}: {broken[0]} is not a readable image")
            continue
        extent: dict[int, Box] = {}  # the box of a face crop: the whole image
        crops: dict[int, np.ndarray] = {}
        for i, bgr in images.items():
            extent[i] = (0.0, 0.0, float(bgr.shape[1]), float(bgr.shape[0]))
            interp = cv2.INTER_AREA if max(bgr.shape[:2]) > size else cv2.INTER_LINEAR
            crops[i] = cv2.cvtColor(cv2.resize(bgr, (size, size), interpolation=interp), cv2.COLOR_BGR2RGB)
        if not crops:
            yield ClipFailure(
                clip.sample_id,
                f"frame folder {folder}: no face image for any of the {len(indices)} sampled frames "
                f"(files {int(indices.min()) + 1:05d}..{int(indices.max()) + 1:05d}; a missing file = no face)",
                sampled_frames=len(indices),
            )
            continue
        boxes, detected = smooth_boxes([extent.get(i) for i in indices.tolist()], 0.0)
        good = indices[detected]  # a frame without a face image shows the nearest one with
        nearest = good[np.abs(good[None, :] - indices[:, None]).argmin(axis=1)]
        frames = np.stack([crops[int(i)] for i in nearest])
        yield FaceClip(clip.sample_id, frames, boxes, detected, indices.astype(np.int64))
