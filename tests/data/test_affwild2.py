"""Aff-Wild2 adapter: clips and labels of the synthetic set; layout rules; bad annotations and videos."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pkdot.config import DataConfig
from pkdot.data import build_manifest
from pkdot.data.affwild2 import clip_windows, read_va_annotation, subject_of
from pkdot.data.manifest import MANIFEST_SCHEMA
from pkdot.errors import DatasetError

ANN = Path("annotations/VA_Estimation_Challenge")


def _cfg(**kw) -> DataConfig:
    kw.setdefault("task", "valence")
    kw.setdefault("student_modalities", ["video"])
    kw.setdefault("privileged_modalities", ["audio"])
    return DataConfig(dataset="affwild2", **kw)


def _fake_root(
    root: Path, videos: dict[str, list[str]], partition: str = "Train_Set", suffix: str = ".mp4"
) -> Path:
    """Annotation files with the given lines and a placeholder video per annotation stem."""
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / ANN / partition).mkdir(parents=True, exist_ok=True)
    for stem, lines in videos.items():
        (root / "videos" / f"{stem}{suffix}").write_bytes(b"\x00")
        (root / ANN / partition / f"{stem}.txt").write_text("\n".join(["valence,arousal", *lines]) + "\n")
    return root


def _lines(n: int, v: float = 0.5, a: float = -0.25) -> list[str]:
    return [f"{v},{a}"] * n


# ---- the synthetic set -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("clip_frames", "clip_stride", "min_annotated"), [(50, 50, 0.5), (20, 10, 0.9)])
def test_synthetic_clips_and_labels(
    affwild2: Path, clip_frames: int, clip_stride: int, min_annotated: float
) -> None:
    cfg = _cfg(root=affwild2, clip_frames=clip_frames, clip_stride=clip_stride, min_annotated=min_annotated)
    result = build_manifest(cfg)
    df = result.frame
    assert result.skipped == [] and list(df.columns) == MANIFEST_SCHEMA.names
    truth = pd.read_parquet(affwild2 / "synthetic_truth.parquet").set_index("sample_id")
    expected = 0
    for stem, row in truth.iterrows():
        annotated = np.asarray(row.annotated)
        valence = np.round(np.asarray(row.valence), 3)
        arousal = np.round(np.asarray(row.arousal), 3)
        for start in clip_windows(len(annotated), clip_frames, clip_stride):
            mask = annotated[start : start + clip_frames]
            sid = f"{stem}@{start}"
            if mask.mean() < min_annotated:
                assert sid not in set(df.sample_id)
                continue
            expected += 1
            clip = df.set_index("sample_id").loc[sid]
            assert clip.valence == pytest.approx(valence[start : start + clip_frames][mask].mean(), abs=1e-9)
            assert clip.arousal == pytest.approx(arousal[start : start + clip_frames][mask].mean(), abs=1e-9)
            assert clip.start_frame == start and clip.num_frames == clip_frames
            assert clip.subject_id == row.subject_id == subject_of(stem)
            assert clip.partition == row.partition
            assert (
                Path(clip.video_path) == (affwild2 / row.video).resolve()
                and clip.audio_path == clip.video_path
            )
    assert len(df) == expected > 0
    assert (df.label == -1).all() and df.physio_path.isna().all() and (df.dataset == "affwild2").all()
    assert df.valence.between(-1, 1).all() and df.arousal.between(-1, 1).all()
    # the _left/_right pair of a person shares one subject
    assert df.subject_id.nunique() == 4 and df.subject_id.str.fullmatch(r"video\d").all()


def test_unannotated_clips_are_dropped(tmp_path: Path) -> None:
    lines = _lines(10) + ["-5,-5"] * 8 + _lines(2) + ["0.1,-5"] * 10
    root = _fake_root(tmp_path / "r", {"v1": lines})
    df = build_manifest(_cfg(root=root, clip_frames=10, clip_stride=10, min_annotated=0.5)).frame
    assert df.sample_id.tolist() == ["v1@0"]  # 2/10 annotated in the 2nd window, 0/10 in the 3rd
    df = build_manifest(_cfg(root=root, clip_frames=10, clip_stride=10, min_annotated=0.2)).frame
    assert df.sample_id.tolist() == ["v1@0", "v1@10"]
    assert df.valence.tolist() == [0.5, 0.5]


def test_video_lookup_avi_subfolders_and_two_person_videos(tmp_path: Path) -> None:
    root = _fake_root(
        tmp_path / "r", {"12-24-1920x1080": _lines(4)}, partition="Validation_Set", suffix=".avi"
    )
    (root / "videos" / "batch2").mkdir()
    shutil.move(root / "videos" / "12-24-1920x1080.avi", root / "videos" / "batch2" / "12-24-1920x1080.avi")
    # one two-person video stored once, annotated per person
    (root / "videos" / "batch2" / "30-30-1920x1080.mp4").write_bytes(b"\x00")
    for side in ("left", "right"):
        (root / ANN / "Validation_Set" / f"30-30-1920x1080_{side}.txt").write_text(
            "valence,arousal\n0,0\n0,0\n"
        )
    df = build_manifest(_cfg(root=root, clip_frames=2, clip_stride=2, min_annotated=1.0)).frame
    assert set(df.sample_id) == {
        "12-24-1920x1080@0",
        "12-24-1920x1080@2",
        "30-30-1920x1080_left@0",
        "30-30-1920x1080_right@0",
    }
    pair = df[df.sample_id.str.startswith("30-30")]
    assert set(pair.subject_id) == {"30-30-1920x1080"} and pair.video_path.nunique() == 1
    assert (df.partition == "Validation_Set").all()
    assert (
        df.loc[df.sample_id == "12-24-1920x1080@0", "video_path"]
        .item()
        .endswith("batch2/12-24-1920x1080.avi")
    )


def test_modalities_choose_the_paths(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "r", {"v1": _lines(4)})
    df = build_manifest(
        _cfg(
            root=root,
            clip_frames=2,
            clip_stride=2,
            student_modalities=["audio"],
            privileged_modalities=["video"],
        )
    ).frame
    assert df.video_path.notna().all() and df.audio_path.notna().all()


def test_read_va_annotation_marks_unannotated_frames(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("valence,arousal\n0.5,-1\n-5,-5\n-5,0.2\n1,1\n\n")
    va = read_va_annotation(path)
    assert va.shape == (4, 2)
    assert np.isnan(va[1:3]).all() and va[0].tolist() == [0.5, -1.0] and va[3].tolist() == [1.0, 1.0]


# ---- errors ------------------------------------------------------------------------------------------------
def test_root_level_errors_raise_even_with_skip_bad(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        build_manifest(_cfg(root=tmp_path / "nope", skip_bad=True))
    (tmp_path / "r").mkdir()
    with pytest.raises(DatasetError, match="videos does not exist"):
        build_manifest(_cfg(root=tmp_path / "r", skip_bad=True))
    (tmp_path / "r" / "videos").mkdir()
    with pytest.raises(DatasetError, match="neither .*Train_Set nor .*Validation_Set exists"):
        build_manifest(_cfg(root=tmp_path / "r", skip_bad=True))
    (tmp_path / "r" / ANN / "Train_Set").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no annotation files"):
        build_manifest(_cfg(root=tmp_path / "r", skip_bad=True))


BAD = {
    "header": (["arousal,valence", "0,0"], "header 'arousal,valence'"),
    "one_value": (["0.1", "0.2,0.2"], r"line 2 '0.1' is not two comma-separated numbers"),
    "text": (["0.1,high"], "line 2 '0.1,high' is not two comma-separated"),
    "three_values": (["0.1,0.2,0.3"], "is not two comma-separated"),
    "out_of_range": (["0.1,0.2", "1.5,0.2"], r"line 3 '1.5,0.2' has a value outside \[-1, 1\]"),
    "nan": (["nan,0.2"], "outside"),
    "gap": (["0.1,0.2", "", "0.1,0.2"], "line 3 is empty"),
    "no_lines": ([], "no annotation lines"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_annotation_raises_or_is_skipped(tmp_path: Path, case: str) -> None:
    lines, message = BAD[case]
    root = _fake_root(tmp_path / "r", {"good": _lines(4), "bad": lines})
    if case == "header":
        (root / ANN / "Train_Set" / "bad.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message) as info:
        build_manifest(_cfg(root=root, clip_frames=2, clip_stride=2))
    assert "bad.txt" in str(info.value)
    result = build_manifest(_cfg(root=root, clip_frames=2, clip_stride=2, skip_bad=True))
    assert set(result.frame.sample_id) == {"good@0", "good@2"}
    assert len(result.skipped) == 1 and result.skipped[0]["path"].endswith("bad.txt")
    assert re.search(message, result.skipped[0]["reason"])


def test_missing_or_ambiguous_video_raises_or_is_skipped(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "r", {"good": _lines(4), "lost": _lines(4), "twice": _lines(4)})
    (root / "videos" / "lost.mp4").unlink()
    (root / "videos" / "twice.avi").write_bytes(b"\x00")
    with pytest.raises(DatasetError, match=r"lost.txt \(sample 'lost'\): no video named lost.mp4/.avi"):
        build_manifest(_cfg(root=root, clip_frames=2, clip_stride=2))
    result = build_manifest(_cfg(root=root, clip_frames=2, clip_stride=2, skip_bad=True))
    assert set(result.frame.sample_id) == {"good@0", "good@2"}
    reasons = {s["sample_id"]: s["reason"] for s in result.skipped}
    assert set(reasons) == {"lost", "twice"} and "several videos" in reasons["twice"]


def test_no_clip_at_all_raises(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "r", {"v1": ["-5,-5"] * 6})
    with pytest.raises(DatasetError, match="no clip of 2 frames"):
        build_manifest(_cfg(root=root, clip_frames=2, clip_stride=2, skip_bad=True))


# ---- the official protocol and the challenge's per-frame CCC ---------------------------------------------
def test_synthetic_set_has_both_partitions_and_official_folds_follow_them(
    affwild2: Path, tmp_path: Path
) -> None:
    from pkdot.config import TrainConfig
    from pkdot.folds import fold_plan

    df = build_manifest(_cfg(root=affwild2, clip_frames=20, clip_stride=20)).frame
    assert set(df.partition) == {"Train_Set", "Validation_Set"}
    (fold,) = fold_plan(df, TrainConfig(folds="official", val_fraction=0.3), seed=0)
    part = df.groupby("subject_id")["partition"].first()
    assert set(fold.test) == set(part[part == "Validation_Set"].index)
    assert set(fold.train) | set(fold.val) == set(part[part == "Train_Set"].index)
    assert fold.val and fold.train  # validation carved from Train_Set subjects, never from the test partition
    from pkdot.folds import describe_protocol, save_folds

    save_folds([fold], tmp_path / "splits.json")
    text = describe_protocol("official", tmp_path / "splits.json")
    assert (
        text.startswith("official Aff-Wild2 partitions")
        and f"`Validation_Set` ({len(fold.test)} videos)" in text
    )
    # the carve-out depends on the seed, the test partition does not
    draws = {fold_plan(df, TrainConfig(folds="official", val_fraction=0.3), seed=s)[0] for s in range(6)}
    assert {d.test for d in draws} == {fold.test} and len({d.val for d in draws}) > 1


def test_official_folds_refuse_data_without_a_validation_partition(tmp_path: Path) -> None:
    from pkdot.config import TrainConfig
    from pkdot.errors import ConfigError
    from pkdot.folds import fold_plan

    root = _fake_root(tmp_path / "r", {f"v{i}": _lines(20) for i in range(3)}, partition="Train_Set")
    df = build_manifest(_cfg(root=root, clip_frames=10, clip_stride=10)).frame
    with pytest.raises(ConfigError, match="found 3 and 0"):
        fold_plan(df, TrainConfig(folds="official"), seed=0)
    df.loc[df.sample_id == "v1@0", "partition"] = "Validation_Set"  # one video in both partitions
    with pytest.raises(DatasetError, match=r"subjects \['v1'\].*more than one partition"):
        fold_plan(df, TrainConfig(folds="official"), seed=0)


def test_official_is_the_affwild2_default_and_kfold_stays_available() -> None:
    from pkdot.config import load_config
    from pkdot.errors import ConfigError

    aff = ["data.dataset=affwild2", "data.task=valence", "data.privileged_modalities=[audio]"]
    assert load_config(overrides=aff).train.folds == "official"
    assert load_config(overrides=[*aff, "train.folds=loso"]).train.folds == "loso"
    assert load_config(overrides=[*aff, "train.folds=3"]).train.folds == 3
    assert load_config().train.folds == 5  # Biovid keeps subject 5-fold
    with pytest.raises(ConfigError, match="official"):
        load_config(overrides=["train.folds=official"])


def test_frame_predictions_assign_each_clip_to_its_frames(tmp_path: Path) -> None:
    from pkdot.data.affwild2 import challenge_scores, frame_predictions
    from pkdot.metrics import ccc

    # 25 frames: frames 5-7 unannotated; clips of 10 frames at 0 and 10 (frames 20-24 are a tail no clip covers)
    values = np.linspace(-0.8, 0.8, 25)
    lines = [f"{v:.3f},0.0" if not 5 <= i <= 7 else "-5,-5" for i, v in enumerate(values)]
    root = _fake_root(tmp_path / "r", {"v1": lines}, partition="Validation_Set")
    df = build_manifest(_cfg(root=root, clip_frames=10, clip_stride=10)).frame
    assert df.sample_id.tolist() == ["v1@0", "v1@10"]
    pred = pd.DataFrame({"sample_id": ["v1@0", "v1@10"], "y_pred": [0.1, 0.5]})
    y_true, y_pred, counts = frame_predictions(df, pred, root, "valence")
    assert counts == {"videos": 1, "frames": 22, "filled_frames": 5}
    np.testing.assert_allclose(y_true, np.round(np.delete(values, [5, 6, 7]), 3))
    # 7 annotated frames of clip 0, 10 of clip 1, the 5 tail frames take the nearest clip (clip 1)
    np.testing.assert_allclose(y_pred, [0.1] * 7 + [0.5] * 15)
    # per-frame CCC differs from the per-clip one, and a perfect per-frame prediction scores 1
    scores = challenge_scores(
        df, pred.assign(model="m", fold=0, seed=0, split="test"), root, "valence"
    ).set_index("model")
    assert scores.loc["m", "frame_ccc"] == pytest.approx(ccc(y_true, y_pred))
    overlap = _cfg(root=root, clip_frames=10, clip_stride=5)
    df2 = build_manifest(overlap).frame
    pred2 = pd.DataFrame({"sample_id": df2.sample_id, "y_pred": [0.0, 1.0, 0.0, 1.0][: len(df2)]})
    _, y2, _ = frame_predictions(df2, pred2, root, "valence")
    assert 0.5 in set(np.round(y2, 6))  # overlapping clips are averaged on the frames they share
