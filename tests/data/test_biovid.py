"""Biovid adapter: synthetic sets round-trip; every bad input raises DatasetError or is skipped with skip_bad."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from pkdot.config import DataConfig
from pkdot.data import build_manifest, write_manifest_report
from pkdot.data.manifest import BIOVID_CLASSES, MANIFEST_SCHEMA, read_manifest, write_manifest
from pkdot.errors import DatasetError

HEADER = ["subject_id", "subject_name", "class_id", "class_name", "sample_id", "sample_name"]
BIO_A = "time\tgsr\tecg\temg_trapezius\n0\t1.0\t0.1\t0.2\n"


def _fake_root(root: Path, rows: list[list[str]], *, sep: str = "\t", bio: str = BIO_A) -> Path:
    """A Biovid layout with placeholder recordings (the adapter checks files and CSV headers only)."""
    lines = [sep.join(HEADER)] + [sep.join(r) for r in rows]
    root.mkdir(parents=True, exist_ok=True)
    (root / "samples.csv").write_text("\n".join(lines) + "\n")
    for r in rows:
        subject, sample = r[1], r[5]
        (root / "video" / subject).mkdir(parents=True, exist_ok=True)
        (root / "video" / subject / f"{sample}.mp4").write_bytes(b"\x00")
        (root / "biosignals_filtered" / subject).mkdir(parents=True, exist_ok=True)
        (root / "biosignals_filtered" / subject / f"{sample}_bio.csv").write_text(bio)
    return root


def _rows(subjects: int = 2) -> list[list[str]]:
    rows, k = [], 0
    for s in range(subjects):
        for c, name in enumerate(BIOVID_CLASSES):
            rows.append([str(s), f"s{s}", str(c), name, str(k), f"s{s}-{name}-{k:03d}"])
            k += 1
    return rows


def _cfg(**kw) -> DataConfig:
    return DataConfig(dataset="biovid", **kw)


# ---- round trips on the synthetic sets ---------------------------------------------------------------------
def test_synthetic_part_a_multiclass_round_trip(biovid_a: Path, tmp_path: Path) -> None:
    result = build_manifest(_cfg(task="multiclass", root=biovid_a))
    df = result.frame
    samples = pd.read_csv(biovid_a / "samples.csv", sep="\t", dtype=str)
    assert result.skipped == [] and len(df) == len(samples) == 40
    assert list(df.columns) == MANIFEST_SCHEMA.names
    assert set(df.sample_id) == set(samples.sample_name)
    truth = pd.read_parquet(biovid_a / "synthetic_truth.parquet").set_index("sample_id")
    assert (df.label.to_numpy() == truth.loc[df.sample_id, "class_id"].to_numpy()).all()
    assert (df.class_name == [BIOVID_CLASSES[c] for c in df.label]).all()
    assert (df.subject_id == truth.loc[df.sample_id, "subject_id"].to_numpy()).all()
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in df.video_path)
    assert all(Path(p).name.endswith("_bio.csv") and Path(p).is_file() for p in df.physio_path)
    assert df.audio_path.isna().all() and df.valence.isna().all() and (df.dataset == "biovid").all()
    # The manifest writes and reads back with the schema.
    write_manifest(df, tmp_path / "manifest.parquet")
    back = read_manifest(tmp_path / "manifest.parquet")
    assert back.sample_id.tolist() == df.sample_id.tolist() and back.label.tolist() == df.label.tolist()


def test_synthetic_part_a_binary_keeps_bl1_and_pa4(biovid_a: Path) -> None:
    df = build_manifest(_cfg(task="binary"), biovid_a).frame
    assert len(df) == 4 * 2 * 2
    assert set(df.class_name) == {"BL1", "PA4"}
    assert (df.label == (df.class_name == "PA4").astype(int)).all()


def test_synthetic_part_b_round_trip(biovid_b: Path) -> None:
    df = build_manifest(_cfg(task="multiclass", part="B"), biovid_b).frame
    assert len(df) == 10 and sorted(df.label.unique()) == [0, 1, 2, 3, 4]
    assert df.subject_id.nunique() == 2
    # A Part A reading of a Part B set is fine (extra facial EMG columns are known columns) ...
    assert len(build_manifest(_cfg(task="binary", part="A"), biovid_b).frame) == 4


def test_part_b_needs_facial_emg_columns(biovid_a: Path) -> None:
    # ... but Part B on Part A files lacks emg_corrugator / emg_zygomaticus.
    with pytest.raises(DatasetError, match="emg_corrugator"):
        build_manifest(_cfg(part="B"), biovid_a)


def test_modalities_choose_the_recordings(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "r", _rows(1))
    df = build_manifest(_cfg(student_modalities=["physio"], privileged_modalities=["video"]), root).frame
    assert df.video_path.notna().all() and df.physio_path.notna().all()


@pytest.mark.parametrize("sep", ["\t", ",", ";"])
def test_delimiters_are_detected(tmp_path: Path, sep: str) -> None:
    bio = BIO_A.replace("\t", sep)
    root = _fake_root(tmp_path / "r", _rows(2), sep=sep, bio=bio)
    df = build_manifest(_cfg(task="multiclass"), root).frame
    assert len(df) == 10 and df.subject_id.tolist()[:5] == ["s0"] * 5


# ---- errors about the root itself always raise -------------------------------------------------------------
def test_missing_root_and_samples_csv(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        build_manifest(_cfg(skip_bad=True), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="samples.csv does not exist"):
        build_manifest(_cfg(skip_bad=True), tmp_path / "empty")
    with pytest.raises(DatasetError, match="data.root is not set"):
        build_manifest(_cfg())


def test_samples_csv_header_errors_raise_even_with_skip_bad(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "r", _rows(1))
    text = (root / "samples.csv").read_text().replace("class_name", "label_name")
    (root / "samples.csv").write_text(text)
    with pytest.raises(DatasetError, match=r"samples.csv: missing columns \['class_name'\]"):
        build_manifest(_cfg(skip_bad=True), root)
    (root / "samples.csv").write_text("")
    with pytest.raises(DatasetError, match="empty"):
        build_manifest(_cfg(skip_bad=True), root)
    (root / "samples.csv").write_text("\t".join(HEADER) + "\n")
    with pytest.raises(DatasetError, match="no samples"):
        build_manifest(_cfg(skip_bad=True), root)


# ---- bad samples: raise, or skip and report ----------------------------------------------------------------
def _break(root: Path, case: str) -> str:
    """Damage sample s1-PA4-009 (a row kept by both tasks) in one way; return the expected message."""
    samples = root / "samples.csv"
    sample, subject = "s1-PA4-009", "s1"
    if case == "class_non_numeric":
        samples.write_text(samples.read_text().replace("s1\t4\tPA4", "s1\tfour\tPA4"))
        return "class_id 'four' is not a number"
    if case == "class_negative":
        samples.write_text(samples.read_text().replace("s1\t4\tPA4", "s1\t-1\tPA4"))
        return "class_id '-1' is not a Biovid class"
    if case == "class_outside":
        samples.write_text(samples.read_text().replace("s1\t4\tPA4", "s1\t7\tPA4"))
        return "class_id '7' is not a Biovid class"
    if case == "class_name_mismatch":
        samples.write_text(samples.read_text().replace("s1\t4\tPA4", "s1\t4\tPA2"))
        return "does not match class_id 4"
    if case == "missing_video":
        (root / "video" / subject / f"{sample}.mp4").unlink()
        return "video of this samples.csv entry does not exist"
    if case == "missing_csv":
        (root / "biosignals_filtered" / subject / f"{sample}_bio.csv").unlink()
        return "biosignal CSV of this samples.csv entry does not exist"
    if case == "wrong_columns":
        (root / "biosignals_filtered" / subject / f"{sample}_bio.csv").write_text("time\tgsr\tecg\n0\t1\t2\n")
        return r"missing \['emg_trapezius'\]"
    if case == "unknown_column":
        (root / "biosignals_filtered" / subject / f"{sample}_bio.csv").write_text(
            "time\tgsr\tecg\temg_trapezius\tresp\n0\t1\t2\t3\t4\n"
        )
        return r"unknown \['resp'\]"
    if case == "empty_csv":
        (root / "biosignals_filtered" / subject / f"{sample}_bio.csv").write_text("")
        return "empty"
    if case == "duplicate":
        lines = samples.read_text().splitlines()
        dup = next(line for line in lines if sample in line)
        samples.write_text("\n".join([*lines, dup]) + "\n")
        return "appears more than once"
    raise AssertionError(case)


CASES = [
    "class_non_numeric",
    "class_negative",
    "class_outside",
    "class_name_mismatch",
    "missing_video",
    "missing_csv",
    "wrong_columns",
    "unknown_column",
    "empty_csv",
    "duplicate",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_bad_sample_raises(tmp_path: Path, case: str, task: str) -> None:
    root = _fake_root(tmp_path / "r", _rows(2))
    message = _break(root, case)
    with pytest.raises(DatasetError, match=message) as info:
        build_manifest(_cfg(task=task), root)
    assert str(root) in str(info.value)


@pytest.mark.parametrize("case", CASES)
def test_bad_sample_is_skipped_and_reported(tmp_path: Path, case: str) -> None:
    root = _fake_root(tmp_path / "r", _rows(2))
    message = _break(root, case)
    result = build_manifest(_cfg(task="multiclass", skip_bad=True), root)
    assert len(result.skipped) == 1
    skipped = result.skipped[0]
    assert skipped["sample_id"] == "s1-PA4-009" and str(root) in skipped["path"]
    assert re.search(message, skipped["reason"])
    expected = 10 if case == "duplicate" else 9  # the first copy of a duplicate is kept
    assert len(result.frame) == expected and result.frame.sample_id.is_unique
    report = tmp_path / "out" / "manifest_report.json"
    write_manifest_report(result, report)
    data = json.loads(report.read_text())
    assert data["samples"] == expected and data["skipped_count"] == 1 and data["skipped"] == result.skipped
    assert not list(report.parent.glob(".*tmp*"))


def test_all_samples_bad_raises_even_with_skip_bad(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "r", _rows(1))
    for video in (root / "video").rglob("*.mp4"):
        video.unlink()
    with pytest.raises(DatasetError, match=r"no usable samples .*5 skipped"):
        build_manifest(_cfg(task="multiclass", skip_bad=True), root)


def test_binary_task_does_not_need_the_recordings_of_other_classes(tmp_path: Path) -> None:
    root = _fake_root(tmp_path / "r", _rows(1))
    (root / "video" / "s0" / "s0-PA2-002.mp4").unlink()
    assert len(build_manifest(_cfg(task="binary"), root).frame) == 2
    with pytest.raises(DatasetError, match="s0-PA2-002"):
        build_manifest(_cfg(task="multiclass"), root)
