"""Bring-your-own table adapter: round trip, and every bad column / row raises or is skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pkdot.config import DataConfig
from pkdot.data import build_manifest
from pkdot.data.manifest import MANIFEST_SCHEMA
from pkdot.errors import ConfigError, DatasetError


def _cfg(**kw) -> DataConfig:
    kw.setdefault("student_modalities", ["face"])
    kw.setdefault("privileged_modalities", ["eeg"])
    return DataConfig(dataset="table", **kw)


def _table(n: int = 12, classes: int = 2, seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    return {
        "sample_id": [f"s{i}" for i in range(n)],
        "subject_id": [f"p{i % 4}" for i in range(n)],
        "label": [i % classes for i in range(n)],
        "face": [rng.normal(size=6).tolist() for _ in range(n)],
        "eeg": [rng.normal(size=3).tolist() for _ in range(n)],
    }


def _write(path: Path, columns: dict[str, list], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def test_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.parquet", _table(12, classes=5))
    result = build_manifest(_cfg(task="multiclass", root=path))
    df = result.frame
    assert result.skipped == [] and list(df.columns) == MANIFEST_SCHEMA.names
    assert df.sample_id.tolist() == [f"s{i}" for i in range(12)]
    assert df.label.tolist() == [i % 5 for i in range(12)] and df.label.dtype == np.int64
    assert df.subject_id.nunique() == 4 and (df.dataset == "table").all()
    for col in ("video_path", "physio_path", "audio_path"):
        assert df[col].isna().all()


def test_integer_valued_float_and_string_labels_are_accepted(tmp_path: Path) -> None:
    cols = _table(4)
    cols["label"] = [0.0, 1.0, 1.0, 0.0]
    assert build_manifest(_cfg(root=_write(tmp_path / "f.parquet", cols))).frame.label.tolist() == [
        0,
        1,
        1,
        0,
    ]
    cols["label"] = ["0", "1", "1", "0"]
    assert build_manifest(_cfg(root=_write(tmp_path / "s.parquet", cols))).frame.label.tolist() == [
        0,
        1,
        1,
        0,
    ]


def test_file_level_errors_always_raise(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        build_manifest(_cfg(root=tmp_path / "none.parquet", skip_bad=True))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        build_manifest(_cfg(root=tmp_path / "junk.parquet", skip_bad=True))
    cols = _table()
    del cols["eeg"]
    with pytest.raises(DatasetError, match=r"missing columns \['eeg'\]"):
        build_manifest(_cfg(root=_write(tmp_path / "m.parquet", cols), skip_bad=True))
    cols = _table()
    cols["eeg"] = ["a"] * len(cols["eeg"])
    with pytest.raises(DatasetError, match="column 'eeg' has type string"):
        build_manifest(_cfg(root=_write(tmp_path / "s.parquet", cols), skip_bad=True))
    with pytest.raises(ConfigError, match="data.task"):
        build_manifest(_cfg(task="valence", root=_write(tmp_path / "v.parquet", _table())))


def test_too_many_classes_for_the_task(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.parquet", _table(12, classes=3))
    with pytest.raises(DatasetError, match="3 distinct classes .* task 'binary' has 2 outputs"):
        build_manifest(_cfg(task="binary", root=path, skip_bad=True))
    assert len(build_manifest(_cfg(task="multiclass", root=path)).frame) == 12
    cols = _table(12, classes=2)
    cols["label"] = [0 if i % 2 else 3 for i in range(12)]
    with pytest.raises(DatasetError, match="has class 3 but task 'binary' expects classes 0..1"):
        build_manifest(_cfg(task="binary", root=_write(tmp_path / "gap.parquet", cols)))


def _damage(cols: dict[str, list], case: str) -> str:
    """Break row 5 (sample 's5'); return the expected message."""
    if case == "null_vector":
        cols["face"][5] = None
        return "column 'face' row 5: the vector is null"
    if case == "ragged":
        cols["face"][5] = cols["face"][5][:4]
        return "column 'face' row 5: ragged vector of length 4 .expected length 6"
    if case == "empty_vector":
        cols["eeg"][5] = []
        return "column 'eeg' row 5: the vector is empty"
    if case == "nan":
        cols["eeg"][5][1] = float("nan")
        return "column 'eeg' row 5: the vector has non-finite values"
    if case == "inf":
        cols["face"][5][0] = float("inf")
        return "non-finite"
    if case == "null_element":
        cols["face"][5][2] = None
        return "non-finite"
    if case == "negative_label":
        cols["label"][5] = -1
        return "column 'label' row 5: label -1 is negative"
    if case == "fractional_label":
        cols["label"] = [float(x) for x in cols["label"]]
        cols["label"][5] = 0.5
        return "label 0.5 is not an integer"
    if case == "text_label":
        cols["label"] = [str(x) for x in cols["label"]]
        cols["label"][5] = "pain"
        return "label 'pain' is not a number"
    if case == "null_label":
        cols["label"][5] = None
        return "label is null"
    if case == "duplicate_id":
        cols["sample_id"][5] = "s4"
        return "duplicate sample_id 's4'"
    if case == "empty_subject":
        cols["subject_id"][5] = ""
        return "empty subject_id"
    raise AssertionError(case)


CASES = [
    "null_vector",
    "ragged",
    "empty_vector",
    "nan",
    "inf",
    "null_element",
    "negative_label",
    "fractional_label",
    "text_label",
    "null_label",
    "duplicate_id",
    "empty_subject",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_row_raises_or_is_skipped(tmp_path: Path, case: str) -> None:
    cols = _table(12)
    message = _damage(cols, case)
    path = _write(tmp_path / "t.parquet", cols)
    with pytest.raises(DatasetError, match=message) as info:
        build_manifest(_cfg(root=path))
    assert str(path) in str(info.value)
    result = build_manifest(_cfg(root=path, skip_bad=True))
    assert len(result.frame) == 11 and "s5" not in set(result.frame.sample_id)
    assert len(result.skipped) == 1 and result.skipped[0]["path"] == str(path)
    assert result.skipped[0]["sample_id"] == ("s4" if case == "duplicate_id" else "s5")
    assert result.frame.sample_id.is_unique


def test_every_row_bad_raises_even_with_skip_bad(tmp_path: Path) -> None:
    cols = _table(3)
    cols["label"] = [-1, -2, -3]
    with pytest.raises(DatasetError, match=r"no usable rows \(3 skipped\)"):
        build_manifest(_cfg(root=_write(tmp_path / "t.parquet", cols), skip_bad=True))


# ---- classes from the labels, regression targets, several views ------------------------------------------
def test_ten_classes_are_inferred_from_the_labels(tmp_path: Path) -> None:
    from pkdot.data.tabular import infer_num_classes

    path = _write(tmp_path / "t.parquet", _table(40, classes=10))
    assert infer_num_classes(path) == 10
    df = build_manifest(_cfg(task="multiclass", root=path)).frame  # no cap at 5
    assert sorted(df.label.unique()) == list(range(10))
    assert len(build_manifest(_cfg(task="multiclass", num_classes=12, root=path)).frame) == 40
    cols = _table(40, classes=10)
    cols["label"] = [x + 1 for x in cols["label"]]  # 1-based classes: class 0 has no row
    gap = _write(tmp_path / "gap.parquet", cols)
    with pytest.raises(DatasetError, match=r"no row of class\(es\) \[0\].*data.num_classes=11"):
        infer_num_classes(gap)
    with pytest.raises(DatasetError, match=r"no row of class\(es\) \[0\]"):
        build_manifest(_cfg(task="multiclass", root=gap))


def test_num_classes_and_outputs_in_the_config() -> None:
    assert _cfg(task="multiclass", num_classes=10).num_outputs == 10
    assert DataConfig(task="multiclass").num_outputs == 5  # Biovid
    with pytest.raises(ConfigError, match="num_classes"):
        _ = _cfg(task="multiclass").num_outputs  # a table's classes are counted when the run is prepared
    with pytest.raises(ValueError, match="num_classes is for task 'multiclass'"):
        _cfg(task="binary", num_classes=3)
    assert _cfg(task="regression").num_outputs == 1 and _cfg(task="regression").is_regression


def test_regression_table_reads_a_float_target(tmp_path: Path) -> None:
    cols = _table(12)
    del cols["label"]
    cols["target"] = [0.25 * i - 1.0 for i in range(12)]
    path = _write(tmp_path / "r.parquet", cols)
    df = build_manifest(_cfg(task="regression", root=path)).frame
    assert df.target.tolist() == cols["target"] and (df.label == -1).all()
    cols["target"][3] = float("nan")
    cols["target"][8] = None
    bad = _write(tmp_path / "bad.parquet", cols)
    with pytest.raises(DatasetError, match=r"(?s)2 bad rows.*row 3: target nan is not finite.*row 8: target"):
        build_manifest(_cfg(task="regression", root=bad))
    with pytest.raises(DatasetError, match=r"missing columns \['target'\]"):
        build_manifest(_cfg(task="regression", root=_write(tmp_path / "c.parquet", _table(12))))


def test_three_views_of_different_lengths(tmp_path: Path) -> None:
    cols = _table(12)
    cols["gaze"] = [[float(i)] * 11 for i in range(12)]
    path = _write(tmp_path / "t.parquet", cols)
    cfg = _cfg(root=path, student_modalities=["face"], privileged_modalities=["eeg", "gaze"])
    assert len(build_manifest(cfg).frame) == 12
    cols["gaze"][4] = [1.0] * 3
    with pytest.raises(
        DatasetError, match="column 'gaze' row 4: ragged vector of length 3 .expected length 11"
    ):
        build_manifest(_cfg(root=_write(tmp_path / "r.parquet", cols), privileged_modalities=["eeg", "gaze"]))


def test_a_run_with_several_student_modalities_is_refused_up_front() -> None:
    from pkdot.config import load_config

    views = ["data.dataset=table", "data.student_modalities=[face, gaze]", "data.privileged_modalities=[eeg]"]
    with pytest.raises(ConfigError, match="the student reads one modality"):
        load_config(overrides=views)
    cfg = load_config(
        overrides=[*views[:1], "data.student_modalities=[face]", "data.privileged_modalities=[eeg, gaze]"]
    )
    assert cfg.data.modalities == ["face", "eeg", "gaze"]
