from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from pkdot.config import FeatureConfig
from pkdot.errors import ConfigError, FeatureError
from pkdot.features import faces
from pkdot.features.faces import ClipFailure, ClipRequest, FaceClip
from tests.features.conftest import face_clips

FEATURES = FeatureConfig(n_frames=8, crop_size=48, min_face_px=24)  # the fixture faces are ~42 px


def _centre(box) -> np.ndarray:
    x, y, w, h = np.asarray(box, dtype=np.float64).T
    return np.stack([x + w / 2, y + h / 2], axis=-1)


@pytest.fixture(scope="module")
def face_clip_video(tmp_path_factory, media):
    return media.face_video(tmp_path_factory.mktemp("faces") / "face.mp4", seconds=5.5)


def test_tsn_sampling_takes_the_middle_of_each_segment():
    idx = faces.sample_indices(100, 10, start=40)
    assert idx.shape == (10,)
    assert np.all(np.diff(idx) > 0)
    # One index per equal segment of 10 frames, in its middle.
    assert np.array_equal((idx - 40) // 10, np.arange(10))
    assert np.array_equal((idx - 40) % 10, np.full(10, 5))
    short = faces.sample_indices(3, 8)
    assert short.min() >= 0 and short.max() <= 2 and np.all(np.diff(short) >= 0)
    with pytest.raises(FeatureError):
        faces.sample_indices(0, 8)


def test_smooth_boxes_fills_lost_frames_from_the_nearest_detection_and_smooths():
    a, b = (10.0, 10.0, 20.0, 20.0), (30.0, 10.0, 20.0, 20.0)
    boxes, detected = faces.smooth_boxes([None, a, None, None, b, None], smoothing=0.0)
    assert detected.tolist() == [False, True, False, False, True, False]
    assert (
        np.allclose(boxes[0], a)
        and np.allclose(boxes[2], a)
        and np.allclose(boxes[3], b)
        and np.allclose(boxes[5], b)
    )
    smoothed, _ = faces.smooth_boxes([a, b, b], smoothing=0.5)
    assert np.allclose(smoothed[1], (20, 10, 20, 20)) and np.allclose(smoothed[2], (25, 10, 20, 20))
    steady, _ = faces.smooth_boxes([a] * 5, smoothing=0.9)
    assert np.allclose(steady, np.array([a] * 5))
    with pytest.raises(FeatureError, match="not found"):
        faces.smooth_boxes([None, None], smoothing=0.5)


def test_crop_face_is_square_centred_and_black_outside_the_frame():
    img = np.zeros((100, 100, 3), np.uint8)
    img[40:60, 30:50] = (255, 0, 0)  # the "face": a red 20x20 square at (30, 40)
    crop = faces.crop_face(img, (30, 40, 20, 20), margin=0.5, size=40)
    assert crop.shape == (40, 40, 3) and crop.dtype == np.uint8
    # Side 20 * (1 + 2 * 0.5) = 40 -> the face fills the middle half of the crop.
    assert np.all(crop[12:28, 12:28, 0] > 200) and crop[2, 2, 0] == 0
    corner = faces.crop_face(img, (0, 0, 20, 20), margin=0.5, size=40)
    assert np.all(corner[:8, :8] == 0)  # outside the frame: black padding, face stays centred


def test_detects_and_centres_the_face_on_a_video(face_clip_video):
    clips = list(
        face_clips(face_clip_video.path, [ClipRequest("whole"), ClipRequest("window", 20, 60)], FEATURES)
    )
    assert {c.sample_id for c in clips} == {"whole", "window"}
    for clip in clips:
        assert isinstance(clip, FaceClip), getattr(clip, "reason", "")
        assert clip.frames.shape == (8, 48, 48, 3) and clip.frames.dtype == np.uint8
        assert clip.face_found >= 0.95
        truth = face_clip_video.boxes[clip.frame_indices]
        # The smoothed box is centred on the pasted face (within 10 % of the face size).
        err = np.linalg.norm(_centre(clip.boxes) - _centre(truth), axis=1)
        assert np.all(err < 0.1 * truth[:, 2]), (err, truth[:, 2])
    window = next(c for c in clips if c.sample_id == "window")
    assert window.frame_indices.min() >= 20 and window.frame_indices.max() < 80


def test_seeking_gives_the_same_frames_as_decoding_from_the_start(face_clip_video, monkeypatch):
    request = [ClipRequest("late", 100, 30), ClipRequest("early", 3, 40)]
    seeked = {c.sample_id: c for c in face_clips(face_clip_video.path, request, FEATURES)}
    monkeypatch.setattr(faces, "frame_table", lambda path: None)  # no timestamps: decode from the start
    plain = {c.sample_id: c for c in face_clips(face_clip_video.path, request, FEATURES)}
    for sid in ("late", "early"):
        assert np.array_equal(plain[sid].frame_indices, seeked[sid].frame_indices)
        assert np.array_equal(plain[sid].frames, seeked[sid].frames)


def test_decode_frames_returns_exactly_the_needed_frames(face_clip_video):
    import av

    with av.open(str(face_clip_video.path)) as container:
        reference = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    needed = [0, 1, 30, 31, 77, len(reference) - 1]
    got = list(faces.decode_frames(face_clip_video.path, needed + [len(reference) + 5]))
    assert [i for i, _ in got] == needed  # past the end: not yielded
    for i, frame in got:
        assert np.array_equal(frame.to_ndarray(format="rgb24"), reference[i])
    table = faces.frame_table(face_clip_video.path)
    assert table is not None and len(table.pts) == len(reference) and table.keyframes[0] == 0


def test_bad_videos_become_failures_with_a_reason(tmp_path, media):
    noface = media.face_video(tmp_path / "noface.mp4", seconds=2.0, face=False).path
    good = media.face_video(tmp_path / "good.mp4", seconds=2.0).path
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    cases = {
        noface: "no face found",
        truncated: "not a readable video",
        text: "not a readable video",
        tmp_path / "missing.mp4": "does not exist",
    }
    for path, expected in cases.items():
        (result,) = face_clips(path, [ClipRequest("s")], FEATURES)
        assert isinstance(result, ClipFailure) and expected in result.reason and str(path) in result.reason
    (past_end,) = face_clips(good, [ClipRequest("s", 40, 30)], FEATURES)
    assert isinstance(past_end, ClipFailure) and "runs past its end" in past_end.reason


def test_many_videos_decode_ahead_in_a_thread_and_give_what_each_video_gives_alone(
    tmp_path, media, monkeypatch
):
    import threading

    good = [media.face_video(tmp_path / f"good{k}.mp4", seconds=2.0, seed=k).path for k in range(3)]
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    videos = [
        (good[0], [ClipRequest("a"), ClipRequest("a-past-end", 40, 30)]),
        (tmp_path / "missing.mp4", [ClipRequest("missing")]),
        (good[1], [ClipRequest("b", 0, 20), ClipRequest("b2", 10, 30)]),
        (text, [ClipRequest("text")]),
        (good[2], [ClipRequest("c")]),
    ]
    alone = {c.sample_id: (path, c) for path, clips in videos for c in face_clips(path, clips, FEATURES)}
    decoded_in = set()
    as_image = faces.as_image
    monkeypatch.setattr(
        faces, "as_image", lambda f: decoded_in.add(threading.current_thread().name) or as_image(f)
    )
    together = list(faces.extract_faces(videos, FEATURES, faces.FaceDetector(FEATURES)))
    assert decoded_in == {"pkdot-read-ahead_0"}  # not the caller's thread
    assert sorted(c.sample_id for _, c in together) == sorted(alone)
    for path, clip in together:
        assert path == alone[clip.sample_id][0]
        other = alone[clip.sample_id][1]
        assert type(clip) is type(other), (clip.sample_id, getattr(clip, "reason", ""))
        if isinstance(clip, FaceClip):
            assert np.array_equal(clip.frames, other.frames) and np.array_equal(clip.boxes, other.boxes)
        else:
            assert clip.reason == other.reason
    assert {c.sample_id for _, c in together if isinstance(c, FaceClip)} == {"a", "b", "b2", "c"}


def test_read_ahead_stays_within_its_depth_raises_the_source_error_and_closes_the_source():
    made, closed = [], []

    def source(n, fail_at=None, seconds=0.0):
        try:
            for i in range(n):
                if i == fail_at:
                    raise FeatureError(f"item {i} is bad")
                time.sleep(seconds)
                made.append(i)
                yield i
        finally:
            closed.append(n)

    got = []
    for item in faces._read_ahead(source(50), depth=4):
        got.append(item)
        assert len(made) <= len(got) + 4  # never more than ``depth`` ahead of the caller
    assert got == list(range(50)) and closed == [50]
    with pytest.raises(FeatureError, match="item 3 is bad"):
        list(faces._read_ahead(source(10, fail_at=3), depth=2))
    made.clear()
    ahead = faces._read_ahead(source(1000, seconds=0.05), depth=3)
    assert [next(ahead), next(ahead)] == [0, 1]
    ahead.close()  # the caller stops early: the item being made is the last one, and the source is closed
    assert closed[-1] == 1000 and made == [0, 1, 2]


def test_truncated_stream_with_intact_header_is_reported(tmp_path, media):
    """A file whose header promises more frames than its data holds (cut mid-stream, moov first)."""
    import av

    src = media.face_video(tmp_path / "src.mp4", seconds=3.0).path
    faststart = tmp_path / "faststart.mp4"
    with av.open(str(src)) as inp, av.open(str(faststart), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)
    data = faststart.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.4)])
    (result,) = face_clips(cut, [ClipRequest("s")], FEATURES)
    assert isinstance(result, ClipFailure)
    assert "truncated" in result.reason and str(cut) in result.reason


def test_yunet_needs_a_model_file(tmp_path):
    with pytest.raises(ConfigError, match="yunet_model"):
        faces.FaceDetector(FeatureConfig(detector="yunet"))
    with pytest.raises(ConfigError, match="yunet_model"):
        faces.FaceDetector(FeatureConfig(detector="yunet", yunet_model=tmp_path / "absent.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx model")
    with pytest.raises(FeatureError, match="YuNet"):
        faces.FaceDetector(FeatureConfig(detector="yunet", yunet_model=junk))


# ---- two-person videos (Aff-Wild2 <video>_left / <video>_right) ---------------------------------------------
def _iou(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0, y0 = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    x1 = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    y1 = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return inter / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter)


@pytest.fixture(scope="module")
def two_person_video(tmp_path_factory, media):
    """Two synthetic people side by side (320 x 160): a smaller frowning one on the left, a larger smiling
    one on the right, each moving; returns the video path and each side's true face boxes (n_frames, 4)."""
    import dataclasses

    from pkdot.data.faces_art import EXPRESSION_UNITS, FaceRenderer, draw_subject_look, head_motion

    rng = np.random.default_rng(3)
    size, n = 160, 60
    looks = {
        "left": dataclasses.replace(draw_subject_look(rng, 1.0), face_fraction=0.45),
        "right": dataclasses.replace(draw_subject_look(rng, 1.0), face_fraction=0.6),
    }
    expression = {side: np.zeros(len(EXPRESSION_UNITS)) for side in looks}
    expression["left"][EXPRESSION_UNITS.index("brow_lower")] = 1.5
    expression["right"][EXPRESSION_UNITS.index("mouth_corner_up")] = 1.5
    frames = np.empty((n, size, 2 * size, 3), np.uint8)
    truth = {side: np.empty((n, 4)) for side in looks}
    for k, (side, look) in enumerate(looks.items()):
        renderer = FaceRenderer(look, size)
        poses = head_motion(rng, n, 25, look, size)
        for i in range(n):
            half, box = renderer.render(expression[side], poses[i])
            frames[i, :, k * size : (k + 1) * size] = half
            truth[side][i] = box + np.array([k * size, 0, 0, 0])
    # The video is stored once, under the name without the side (as Aff-Wild2 does).
    path = media.write_video(tmp_path_factory.mktemp("two") / "10-60-1280x720.mp4", frames)
    return path, truth


def test_face_side_only_for_a_shared_two_person_video(tmp_path):
    shared = tmp_path / "10-60-1280x720.mp4"
    assert faces.face_side("10-60-1280x720_left@50", shared) == "left"
    assert faces.face_side("10-60-1280x720_right@0", shared) == "right"
    assert faces.face_side("10-60-1280x720_left@0", tmp_path / "10-60-1280x720_left.mp4") is None
    assert faces.face_side("10-60-1280x720_right@0", tmp_path / "cropped" / "10-60-1280x720_right") is None
    assert faces.face_side("video3@0", tmp_path / "video3.mp4") is None


def test_two_person_video_gives_each_side_its_own_face(two_person_video):
    path, truth = two_person_video
    features = FeatureConfig(n_frames=8, crop_size=48, min_face_px=48)
    requests = [
        ClipRequest(f"10-60-1280x720_{side}@0", 0, 60, faces.face_side(f"10-60-1280x720_{side}@0", path))
        for side in ("left", "right")
    ]
    assert [r.side for r in requests] == ["left", "right"]
    clips = {c.sample_id.split("_")[-1].split("@")[0]: c for c in face_clips(path, requests, features)}
    for side in ("left", "right"):
        clip = clips[side]
        assert isinstance(clip, FaceClip), getattr(clip, "reason", "")
        assert clip.face_found >= 0.75
        iou = _iou(clip.boxes, truth[side][clip.frame_indices])
        assert np.all(iou > 0.5), (side, iou)
    # Different people / expressions: the crops differ far more than a crop differs over time.
    between = np.abs(clips["left"].frames.astype(float) - clips["right"].frames.astype(float)).mean()
    within = np.abs(np.diff(clips["left"].frames.astype(float), axis=0)).mean()
    assert between > 3 * within, (between, within)
    # Without a side, the largest face (the right person) is taken: the old behaviour for both tracks.
    (unsided,) = face_clips(path, [ClipRequest("x", 0, 60)], features)
    assert np.all(_iou(unsided.boxes, truth["right"][unsided.frame_indices]) > 0.5)


def test_choose_face_prefers_the_tracked_face_then_the_named_side():
    boxes = np.array([[10, 10, 30, 30], [200, 10, 60, 60]], np.float64)
    assert faces.choose_face(boxes, 320) == (200.0, 10.0, 60.0, 60.0)  # largest
    assert faces.choose_face(boxes, 320, side="left") == (10.0, 10.0, 30.0, 30.0)
    assert faces.choose_face(boxes[1:], 320, side="left") is None
    # A tracked face wins over the side rule, even after it crosses the middle of the frame.
    assert faces.choose_face(boxes, 320, side="left", previous=(190, 12, 58, 58)) == (200.0, 10.0, 60.0, 60.0)
    with pytest.raises(ConfigError):
        faces.choose_face(boxes, 320, side="top")


def test_shrink_is_area_averaging_of_every_kth_pixel_for_any_view() -> None:
    """``shrink`` keeps every k-th pixel (k = floor(ratio / 2)) then area-averages; the RGB path copies whole
    pixels itself: the result must not depend on how the input is laid out in memory."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (900, 1000, 3), dtype=np.uint8)
    for image in (frame[10:497, 21:508], frame, frame[::-1], frame[:, :, 1], frame[:, ::2]):
        k = int(min(image.shape[1] / 112, image.shape[0] / 112) / 2)
        expected = cv2.resize(np.ascontiguousarray(image[::k, ::k]), (112, 112), interpolation=cv2.INTER_AREA)
        assert np.array_equal(faces.shrink(image, (112, 112)), expected), image.shape
