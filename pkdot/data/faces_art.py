"""Synthetic talking / grimacing faces built from ``skimage.data.astronaut()`` (ships offline).

The face and eyes are found once with Haar cascades, brows and mouth placed from the eye geometry. An
*expression unit* (AU4 brow lowering, AU6/7 eye narrowing, AU6 cheek raise, AU9/10 lip raise, mouth corners,
AU1/2 brow raise) is a smooth displacement field around those landmarks, applied with :func:`cv2.remap` to the
subject's tinted, warped head, placed with a rigid pose over a background; the face box follows the Haar box."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import cv2
import numpy as np

from pkdot.errors import FeatureError

logger = logging.getLogger(__name__)

#: Peak displacement of each expression unit at intensity 1, as a fraction of the inter-ocular distance.
UNIT_AMPLITUDE: dict[str, float] = dict(
    brow_lower=0.17, eye_narrow=0.10, cheek_raise=0.07, lip_raise=0.13, mouth_corner_up=0.11, brow_raise=0.13
)
#: Names of the expression units, in the order of an expression vector.
EXPRESSION_UNITS: tuple[str, ...] = tuple(UNIT_AMPLITUDE)


@dataclass(frozen=True)
class FaceLandmarks:
    """Landmarks on the astronaut portrait, in its pixel coordinates ``(x, y)``."""

    face_box: tuple[float, float, float, float]
    left_eye: tuple[float, float]
    right_eye: tuple[float, float]
    left_brow: tuple[float, float]
    right_brow: tuple[float, float]
    mouth_center: tuple[float, float]
    mouth_left: tuple[float, float]
    mouth_right: tuple[float, float]
    upper_lip: tuple[float, float]

    @property
    def interocular(self) -> float:
        return float(np.hypot(self.right_eye[0] - self.left_eye[0], self.right_eye[1] - self.left_eye[1]))


def haar_cascade(name: str = "haarcascade_frontalface_default.xml") -> cv2.CascadeClassifier:
    """Load one of OpenCV's bundled Haar cascades (raises FeatureError if the file is missing)."""
    path = cv2.data.haarcascades + name  # type: ignore[attr-defined]
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise FeatureError(f"OpenCV Haar cascade {path} could not be loaded (opencv-python 4.x ships it)")
    return cascade


@functools.lru_cache(maxsize=1)
def astronaut_rgb() -> np.ndarray:
    """The astronaut portrait, ``(512, 512, 3)`` uint8 RGB."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@functools.lru_cache(maxsize=1)
def locate_landmarks() -> FaceLandmarks:
    """Find the face and both eyes on the astronaut (Haar cascades), once; brows ``0.25 d`` above the eyes,
    mouth centre ``0.95 d`` below their midpoint, corners ``+-0.45 d`` from it, upper lip ``0.1 d`` above."""
    gray = cv2.cvtColor(astronaut_rgb(), cv2.COLOR_RGB2GRAY)
    faces = haar_cascade().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(60, 60))
    if len(faces) == 0:
        raise FeatureError("astronaut portrait: the Haar frontal-face cascade found no face")
    fx, fy, fw, fh = (float(v) for v in max(faces, key=lambda b: b[2] * b[3]))
    upper = gray[int(fy) : int(fy + fh * 0.6), int(fx) : int(fx + fw)]
    eyes = haar_cascade("haarcascade_eye.xml").detectMultiScale(upper, scaleFactor=1.05, minNeighbors=5)
    centres = sorted((fx + x + w / 2.0, fy + y + h / 2.0) for x, y, w, h in eyes)
    left = [c for c in centres if c[0] < fx + fw / 2]
    right = [c for c in centres if c[0] >= fx + fw / 2]
    if not left or not right:
        raise FeatureError(f"astronaut portrait: expected one eye on each side of the face, found {centres}")
    le, re = left[0], right[-1]
    d = float(np.hypot(re[0] - le[0], re[1] - le[1]))
    mid = ((le[0] + re[0]) / 2.0, (le[1] + re[1]) / 2.0)
    mouth = (mid[0], mid[1] + 0.95 * d)
    lm = FaceLandmarks(
        face_box=(fx, fy, fw, fh),
        left_eye=le,
        right_eye=re,
        left_brow=(le[0], le[1] - 0.25 * d),
        right_brow=(re[0], re[1] - 0.25 * d),
        mouth_center=mouth,
        mouth_left=(mouth[0] - 0.45 * d, mouth[1] - 0.05 * d),
        mouth_right=(mouth[0] + 0.45 * d, mouth[1] - 0.05 * d),
        upper_lip=(mouth[0], mouth[1] - 0.1 * d),
    )
    logger.debug("astronaut landmarks: %s", lm)
    return lm


def _gauss(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((xx - cx) / sx) ** 2 + ((yy - cy) / sy) ** 2)).astype(np.float32)


def expression_basis(lm: FaceLandmarks, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Displacement fields of the expression units on a grid ``xx, yy`` (H, W) of astronaut coordinates:
    (U, H, W, 2) float32 forward displacement ``(dx, dy)`` (astronaut pixels) of each unit at intensity 1
    (content at ``p`` moves to ``p + field(p)``)."""
    d = lm.interocular
    mid_x = (lm.left_eye[0] + lm.right_eye[0]) / 2.0
    out = np.zeros((len(EXPRESSION_UNITS), *xx.shape, 2), np.float32)
    amp = {unit: a * d for unit, a in UNIT_AMPLITUDE.items()}
    # brow_lower: brows down + towards the midline.
    for bx, by in (lm.left_brow, lm.right_brow):
        g = _gauss(xx, yy, bx, by, 0.28 * d, 0.2 * d)
        out[0, ..., 1] += amp["brow_lower"] * g
        out[0, ..., 0] += 0.35 * amp["brow_lower"] * np.sign(mid_x - bx) * g
    # eye_narrow: compress towards the eye line (dy = -A * s * g with s the normalised offset).
    sy = 0.15 * d
    for ex, ey in (lm.left_eye, lm.right_eye):
        g = _gauss(xx, yy, ex, ey, 0.32 * d, sy)
        out[1, ..., 1] += -amp["eye_narrow"] * ((yy - ey) / sy) * g
    # cheek_raise: below the eyes, up.
    for ex, ey in (lm.left_eye, lm.right_eye):
        out[2, ..., 1] += -amp["cheek_raise"] * _gauss(xx, yy, ex, ey + 0.45 * d, 0.3 * d, 0.22 * d)
    # lip_raise: upper lip and nose wings up.
    ux, uy = lm.upper_lip
    out[3, ..., 1] += -amp["lip_raise"] * _gauss(xx, yy, ux, uy - 0.1 * d, 0.4 * d, 0.22 * d)
    for cx, cy in (lm.mouth_left, lm.mouth_right):
        out[4, ..., 1] += -amp["mouth_corner_up"] * _gauss(xx, yy, cx, cy, 0.18 * d, 0.18 * d)
    for bx, by in (lm.left_brow, lm.right_brow):
        out[5, ..., 1] += -amp["brow_raise"] * _gauss(xx, yy, bx, by - 0.05 * d, 0.35 * d, 0.25 * d)
    return out


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Band-limited noise in [-1, 1] of shape (size, size, channels): a cells x cells grid, cubic upsampling."""
    coarse = rng.uniform(-1.0, 1.0, (cells, cells, channels)).astype(np.float32)
    up = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(up.reshape(size, size, channels), -1.0, 1.0)


@dataclass(frozen=True)
class SubjectLook:
    """How one synthetic person looks and moves (drawn by :func:`draw_subject_look`): ``face_fraction`` =
    face box width / frame width, ``aspect`` (x, y) head stretch, ``tint`` RGB face gain, ``gain``/``gamma``
    lighting, ``offset`` face centre offset (frame fractions), ``tilt`` roll (deg), ``motion_px``/``motion_deg``
    head-motion amplitudes at 160 px, ``warp_seed`` the face warp's seed, ``expressiveness`` in [0, 1] scales
    every expression."""

    face_fraction: float
    aspect: tuple[float, float]
    tint: tuple[float, float, float]
    gain: float
    gamma: float
    offset: tuple[float, float]
    tilt: float
    motion_px: float
    motion_deg: float
    warp_px: float
    warp_seed: int
    background_seed: int
    background_style: int
    background_rgb: tuple[float, float, float]
    expressiveness: float


def draw_subject_look(rng: np.random.Generator, expressiveness: float) -> SubjectLook:
    """Draw one person's appearance, pose and lighting (see :class:`SubjectLook`)."""
    return SubjectLook(
        face_fraction=float(rng.uniform(0.47, 0.62)),
        aspect=(float(rng.uniform(0.92, 1.08)), float(rng.uniform(0.94, 1.06))),
        tint=tuple(float(v) for v in rng.uniform(0.8, 1.15, 3)),  # type: ignore[arg-type]
        gain=float(rng.uniform(0.8, 1.15)),
        gamma=float(rng.uniform(0.8, 1.25)),
        offset=(float(rng.uniform(-0.07, 0.07)), float(rng.uniform(-0.06, 0.06))),
        tilt=float(rng.uniform(-2.0, 2.0)),
        motion_px=float(rng.uniform(1.5, 3.5)),
        motion_deg=float(rng.uniform(1.0, 2.5)),
        warp_px=float(rng.uniform(1.5, 4.0)),
        warp_seed=int(rng.integers(2**31)),
        background_seed=int(rng.integers(2**31)),
        background_style=int(rng.integers(3)),
        background_rgb=tuple(float(v) for v in rng.uniform(30, 225, 3)),  # type: ignore[arg-type]
        expressiveness=float(expressiveness),
    )


def head_motion(
    rng: np.random.Generator, n_frames: int, fps: float, look: SubjectLook, frame_size: int
) -> np.ndarray:
    """Smooth rigid head motion ``(n_frames, 3)`` = (dx px, dy px, roll degrees): each a sum of three
    sinusoids of 0.1-0.7 Hz, normalised to the subject's amplitude (pixels scale with ``frame_size / 160``)."""
    t = np.arange(n_frames, dtype=np.float64) / fps
    out = np.zeros((n_frames, 3), np.float64)
    amps = (look.motion_px * frame_size / 160.0, look.motion_px * frame_size / 160.0, look.motion_deg)
    for k, a in enumerate(amps):
        freqs = rng.uniform(0.1, 0.7, 3)
        phases = rng.uniform(0, 2 * np.pi, 3)
        weights = rng.uniform(0.5, 1.0, 3)
        wave = sum(w * np.sin(2 * np.pi * f * t + p) for w, f, p in zip(weights, freqs, phases, strict=True))
        out[:, k] = a * wave / weights.sum()
    out[:, 2] += look.tilt
    return out


def blink_track(rng: np.random.Generator, n_frames: int, fps: float) -> np.ndarray:
    """Eye-closure intensity per frame in [0, 1]: blinks every 2-6 s lasting ~0.2 s."""
    track = np.zeros(n_frames, np.float64)
    t = np.arange(n_frames) / fps
    start = rng.uniform(0.3, 3.0)
    while start < n_frames / fps:
        track = np.maximum(track, np.exp(-0.5 * ((t - start) / 0.05) ** 2))
        start += rng.uniform(2.0, 6.0)
    return track


class FaceRenderer:
    """Render frames (``frame_size`` square) of one subject: expression vector + pose -> RGB frame and face box.
    The head is tinted, warped and resampled once; a frame costs one ``remap`` and one ``warpAffine``."""

    def __init__(self, look: SubjectLook, frame_size: int) -> None:
        self.look = look
        self.frame_size = int(frame_size)
        lm = locate_landmarks()
        src = astronaut_rgb().astype(np.float32)
        fx, fy, fw, fh = lm.face_box
        self.face_center_src = (fx + fw / 2.0, fy + fh / 2.0)
        # Output-space scale: face box width -> face_fraction of the frame.
        self.scale = look.face_fraction * frame_size / fw
        sx, sy = look.aspect
        half = 1.15 * fw  # head region half-side in source pixels
        side = int(np.ceil(2 * half * self.scale * max(sx, sy))) | 1
        c = (side - 1) / 2.0
        # Grid of the scaled ROI -> astronaut coordinates (inverse of scale/aspect about the face centre).
        jj, ii = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32))
        ax = self.face_center_src[0] + (jj - c) / (self.scale * sx)
        ay = self.face_center_src[1] + (ii - c) / (self.scale * sy)
        # Subject-specific low-frequency warp of the face (identity nuisance), in source pixels.
        wrng = np.random.default_rng(look.warp_seed)
        warp = _smooth_noise(wrng, side, 4, 2) * look.warp_px
        map_x = (ax + warp[..., 0]).astype(np.float32)
        map_y = (ay + warp[..., 1]).astype(np.float32)
        face = cv2.remap(src, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        face *= np.asarray(look.tint, np.float32)
        # Soft head mask (hair to chin) in source coordinates.
        cxs, cys = self.face_center_src
        ecy = cys - 0.05 * fh
        below = np.clip((ay - ecy) / (0.88 * fh), 0.0, 1.0)  # narrow the ellipse towards the chin
        ell = ((ax - cxs) / (0.80 * fw * (1.0 - 0.3 * below))) ** 2 + ((ay - ecy) / (0.88 * fh)) ** 2
        alpha = np.clip((1.0 - ell) / 0.15, 0.0, 1.0).astype(np.float32)
        self.face_rgba = np.clip(np.dstack([face, alpha * 255.0]) + 0.5, 0, 255).astype(np.uint8)
        # Expression basis at the ROI grid, converted to ROI pixels (displacement scales with the face).
        basis = expression_basis(lm, ax, ay)
        basis[..., 0] *= self.scale * sx
        basis[..., 1] *= self.scale * sy
        self.basis = np.ascontiguousarray(basis)  # (U, side, side, 2)
        self.grid = np.stack([jj, ii], axis=-1)
        self.roi_center = c
        self.background = self._background()
        lut = 255.0 * np.clip(look.gain * (np.arange(256) / 255.0) ** look.gamma, 0, 1)
        self._lut = lut.astype(np.uint8)
        self.box_side = fw * self.scale * float(np.sqrt(sx * sy))

    def _background(self) -> np.ndarray:
        f = self.frame_size
        rng = np.random.default_rng(self.look.background_seed)
        base = np.asarray(self.look.background_rgb, np.float32)
        yy, xx = np.mgrid[0:f, 0:f].astype(np.float32) / f
        grad = (rng.uniform(-40, 40) * xx + rng.uniform(-40, 40) * yy)[..., None]
        style = self.look.background_style
        if style == 0:  # blotchy wall
            tex = _smooth_noise(rng, f, 6, 3) * 35.0
        elif style == 1:  # stripes (curtain / shelf)
            freq = rng.uniform(4, 10)
            axis = xx if rng.uniform() < 0.5 else yy
            tex = (np.sin(2 * np.pi * freq * axis) * 25.0)[..., None] * np.ones(3)
        else:  # fine grain + blobs
            tex = _smooth_noise(rng, f, 12, 3) * 20.0 + _smooth_noise(rng, f, 3, 3) * 30.0
        return np.clip(base + grad + tex, 0, 255).astype(np.float32)

    def render(
        self, expression: np.ndarray, pose: np.ndarray, noise: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One frame (F, F, 3) uint8 RGB and its face box ``(x, y, w, h)`` float64 in frame pixels;
        ``expression`` (U,) unit intensities, ``pose`` (3,) dx, dy (px), roll (deg), ``noise`` (F, F, 3)."""
        # Inverse map: out(p) = face(p - U(p)), U = sum_k e_k B_k. A plain loop over the active units, not a
        # BLAS product: BLAS threads spin on a shared CPU and made this 100x slower.
        maps = self.grid.copy()
        for k, weight in enumerate(np.asarray(expression, np.float64)):
            if weight != 0.0:
                maps -= np.float32(weight) * self.basis[k]
        map_x, map_y = (np.ascontiguousarray(maps[..., k]) for k in (0, 1))
        face = cv2.remap(self.face_rgba, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        f = self.frame_size
        cx = f / 2.0 + self.look.offset[0] * f + float(pose[0])
        cy = f / 2.0 + self.look.offset[1] * f + float(pose[1])
        m = cv2.getRotationMatrix2D((self.roi_center, self.roi_center), float(pose[2]), 1.0)
        m[0, 2] += cx - self.roi_center
        m[1, 2] += cy - self.roi_center
        placed = cv2.warpAffine(face, m, (f, f), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        placed = placed.astype(np.float32)
        alpha = placed[..., 3:4] * np.float32(1.0 / 255.0)
        frame = self.background + (placed[..., :3] - self.background) * alpha
        if noise is not None:
            frame += noise
        frame = cv2.LUT(np.clip(frame, 0, 255).astype(np.uint8), self._lut)
        s = self.box_side
        return frame, np.array([cx - s / 2.0, cy - s / 2.0, s, s], np.float64)
