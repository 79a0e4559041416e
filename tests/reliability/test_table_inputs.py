"""Issue 11 case 6: bad bring-your-own tables fail at ``manifest`` time, naming every bad row.

One test per case: too few subjects for the folds (one subject; fewer than the folds), a bad label named by its
row, every bad row listed (capped, with the total), the modal vector length taken as right (a tie refused).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pkdot import pipeline
from pkdot.config import DataConfig, load_config
from pkdot.data import build_manifest
from pkdot.data.tabular import MAX_LISTED
from pkdot.errors import ConfigError, DatasetError


def _table(n: int = 24, subjects: int = 6, dims: tuple[int, int] = (6, 3), seed: int = 0) -> dict[str, list]:
    rng = np.random.default_rng(seed)
    return {
        "sample_id": [f"s{i}" for i in range(n)],
        "subject_id": [f"p{i % subjects}" for i in range(n)],
        "label": [i % 2 for i in range(n)],
        "face": [rng.normal(size=dims[0]).tolist() for _ in range(n)],
        "eeg": [rng.normal(size=dims[1]).tolist() for _ in range(n)],
    }


def _write(path: Path, cols: dict[str, list]) -> Path:
    pd.DataFrame(cols).to_parquet(path)
    return path


def _run_cfg(tmp_path: Path, table: Path, *extra: str):
    return load_config(
        overrides=[
            "data.dataset=table",
            f"data.root={table}",
            "data.student_modalities=[face]",
            "data.privileged_modalities=[eeg]",
            f"run_dir={tmp_path / 'run'}",
            *extra,
        ]
    )


def _data(table: Path, **kw) -> DataConfig:
    return DataConfig(
        dataset="table", root=table, student_modalities=["face"], privileged_modalities=["eeg"], **kw
    )


def test_a_single_subject_is_refused_at_manifest_time(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.parquet", _table(subjects=1))
    cfg = _run_cfg(tmp_path, table)
    with pytest.raises(ConfigError, match=r"train.folds=5.*got 1.*24 samples from 1 subject\(s\): \['p0'\]"):
        pipeline.run_stage("manifest", cfg)
    assert not (tmp_path / "run" / "manifest.parquet").exists()  # nothing for extract to pick up


def test_fewer_subjects_than_folds_is_refused_at_manifest_time(tmp_path: Path) -> None:
    table = _write(tmp_path / "t.parquet", _table(subjects=3))
    with pytest.raises(ConfigError, match=r"5-fold needs at least 5 subjects, got 3.*from 3 subject\(s\)"):
        pipeline.run_stage("manifest", _run_cfg(tmp_path, table))
    two = _write(tmp_path / "two.parquet", _table(subjects=2))
    with pytest.raises(ConfigError, match=r"'loso'.*2 subjects leave 1 outside a test fold.*from 2 subject"):
        pipeline.run_stage("manifest", _run_cfg(tmp_path, two, "train.folds=loso"))
    pipeline.run_stage(
        "manifest", _run_cfg(tmp_path, table, "train.folds=3")
    )  # 3 subjects, 3 folds: 1+1+1 per fold
    assert (tmp_path / "run" / "manifest.parquet").is_file()


def test_a_bad_label_is_named_by_row_and_sample(tmp_path: Path) -> None:
    cols = _table()
    cols["label"] = [str(x) for x in cols["label"]]
    cols["label"][7] = "pain"
    table = _write(tmp_path / "t.parquet", cols)
    with pytest.raises(DatasetError) as info:
        build_manifest(_data(table))
    assert "1 bad row" in str(info.value)
    assert "sample 's7': column 'label' row 7: label 'pain' is not a number" in str(info.value)
    # a class outside data.num_classes is a bad row too, named the same way
    cols = _table()
    cols["label"] = [i % 3 for i in range(24)]
    cols["label"][10] = 7
    with pytest.raises(DatasetError, match=r"sample 's10': column 'label' row 10: label 7 is outside 0..2"):
        build_manifest(_data(_write(tmp_path / "k.parquet", cols), task="multiclass", num_classes=3))


def test_every_bad_row_is_listed_up_to_a_cap_with_the_count(tmp_path: Path) -> None:
    cols = _table(n=60)
    bad_rows = list(range(3, 60, 2))  # 29 rows, beyond the cap
    for i in bad_rows:
        cols["eeg"][i] = [float("nan")] * 3
    table = _write(tmp_path / "t.parquet", cols)
    with pytest.raises(DatasetError) as info:
        build_manifest(_data(table))
    text = str(info.value)
    assert f"{len(bad_rows)} bad rows (the first {MAX_LISTED} listed)" in text
    listed = [int(m) for m in re.findall(r"column 'eeg' row (\d+)", text)]
    assert listed == bad_rows[:MAX_LISTED]
    assert f"... and {len(bad_rows) - MAX_LISTED} more" in text
    skipped = build_manifest(_data(table, skip_bad=True)).skipped  # all of them, uncapped, with skip_bad
    assert [s["sample_id"] for s in skipped] == [f"s{i}" for i in bad_rows]


def test_the_modal_vector_length_is_taken_as_right(tmp_path: Path) -> None:
    cols = _table(n=20)
    short = [0, 4, 8, 12, 16, 19, 2, 6]  # 8 of 20 rows are shorter: 12 rows of 6 are the majority
    for i in short:
        cols["face"][i] = cols["face"][i][:4]
    table = _write(tmp_path / "t.parquet", cols)
    with pytest.raises(DatasetError) as info:
        build_manifest(_data(table))
    text = str(info.value)
    assert "8 bad rows" in text and "expected length 6, as in most rows" in text
    assert sorted(int(m) for m in re.findall(r"row (\d+): ragged vector of length 4", text)) == sorted(short)
    # a 50/50 split has no majority: refused, with the counts, even with skip_bad (which rows would be wrong?)
    cols = _table(n=20)
    for i in range(10):
        cols["face"][i] = cols["face"][i][:4]
    tie = _write(tmp_path / "tie.parquet", cols)
    with pytest.raises(
        DatasetError, match=r"no majority vector length \(length 4: 10 rows, length 6: 10 rows\)"
    ):
        build_manifest(_data(tie, skip_bad=True))
