"""Synthetic faces: landmarks on the astronaut, expression units move the right part of the face, poses."""

from __future__ import annotations

import numpy as np
import pytest

from pkdot.data.faces_art import (
    EXPRESSION_UNITS,
    FaceRenderer,
    blink_track,
    draw_subject_look,
    expression_basis,
    head_motion,
    locate_landmarks,
)


@pytest.fixture(scope="module")
def renderer() -> FaceRenderer:
    look = draw_subject_look(np.random.default_rng(1), expressiveness=1.0)
    return FaceRenderer(look, 160)


def test_landmarks_have_facial_geometry() -> None:
    lm = locate_landmarks()
    x, y, w, h = lm.face_box
    assert lm.left_eye[0] < lm.right_eye[0]
    for px, py in (lm.left_eye, lm.right_eye, lm.left_brow, lm.right_brow, lm.mouth_center):
        assert x < px < x + w and y < py < y + h * 1.1
    assert lm.left_brow[1] < lm.left_eye[1] < lm.upper_lip[1] < lm.mouth_center[1]
    assert 0.3 * w < lm.interocular < 0.6 * w


def test_expression_basis_is_local() -> None:
    lm = locate_landmarks()
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float32)
    basis = expression_basis(lm, xx, yy)
    assert basis.shape == (len(EXPRESSION_UNITS), 512, 512, 2)
    assert np.abs(basis[:, :40, :40]).max() < 1e-3  # nothing moves far from the face
    brow_lower = basis[EXPRESSION_UNITS.index("brow_lower")]
    bx, by = (int(round(v)) for v in lm.left_brow)
    assert brow_lower[by, bx, 1] > 0.1 * lm.interocular  # brows move down (+y)


def _changed_rows(renderer: FaceRenderer, unit: str) -> tuple[np.ndarray, np.ndarray]:
    neutral, box = renderer.render(np.zeros(len(EXPRESSION_UNITS)), np.zeros(3))
    expr = np.zeros(len(EXPRESSION_UNITS))
    expr[EXPRESSION_UNITS.index(unit)] = 1.0
    moved, _ = renderer.render(expr, np.zeros(3))
    diff = np.abs(moved.astype(float) - neutral.astype(float)).sum(axis=2)
    x, y, w, h = (int(round(v)) for v in box)
    face = diff[y : y + h, x : x + w]
    return face[: h // 2].sum(), face[h // 2 :].sum()


@pytest.mark.parametrize(
    ("unit", "half"),
    [
        ("brow_lower", "upper"),
        ("eye_narrow", "upper"),
        ("brow_raise", "upper"),
        ("mouth_corner_up", "lower"),
        ("lip_raise", "lower"),
    ],
)
def test_units_move_their_part_of_the_face(renderer: FaceRenderer, unit: str, half: str) -> None:
    upper, lower = _changed_rows(renderer, unit)
    assert upper + lower > 0
    assert (upper > 3 * lower) if half == "upper" else (lower > 3 * upper)


def test_render_is_deterministic_and_box_follows_pose(renderer: FaceRenderer) -> None:
    expr = np.full(len(EXPRESSION_UNITS), 0.3)
    a, box_a = renderer.render(expr, np.array([0.0, 0.0, 0.0]))
    b, box_b = renderer.render(expr, np.array([0.0, 0.0, 0.0]))
    assert np.array_equal(a, b) and np.array_equal(box_a, box_b)
    c, box_c = renderer.render(expr, np.array([5.0, -3.0, 2.0]))
    assert box_c[:2] - box_a[:2] == pytest.approx([5.0, -3.0]) and box_c[2] == box_a[2]
    assert a.shape == (160, 160, 3) and a.dtype == np.uint8
    frac = box_a[2] / 160
    assert 0.45 <= frac <= 0.7  # the face covers roughly half the frame width
    assert 0 <= box_a[0] and box_a[0] + box_a[2] <= 160


def test_motion_and_blinks_are_smooth_and_bounded() -> None:
    rng = np.random.default_rng(0)
    look = draw_subject_look(rng, 0.5)
    motion = head_motion(rng, 250, 25, look, 160)
    assert motion.shape == (250, 3)
    assert np.abs(motion[:, :2]).max() <= look.motion_px + 1e-9
    assert np.abs(motion[:, 2] - look.tilt).max() <= look.motion_deg + 1e-9 <= 3.0
    assert np.abs(np.diff(motion, axis=0)).max() < 0.5  # no jumps between frames
    blinks = blink_track(rng, 250, 25)
    assert blinks.max() == pytest.approx(1.0, abs=0.1) and blinks.min() >= 0 and (blinks > 0.5).mean() < 0.1
