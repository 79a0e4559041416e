"""The `pkdot` command: synth / manifest for every dataset kind, and config errors that name the field."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pkdot.cli import main


@pytest.fixture(scope="module")
def biovid_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "biovid"
    assert (
        main(
            [
                "synth",
                "biovid",
                "--out",
                str(out),
                "--subjects",
                "2",
                "--seed",
                "3",
                "--samples-per-class",
                "1",
                "--frame-size",
                "96",
            ]
        )
        == 0
    )
    return out


def test_synth_is_byte_identical_for_a_seed(biovid_root, tmp_path):
    again = tmp_path / "again"
    assert (
        main(
            [
                "synth",
                "biovid",
                "--out",
                str(again),
                "--subjects",
                "2",
                "--seed",
                "3",
                "--samples-per-class",
                "1",
                "--frame-size",
                "96",
            ]
        )
        == 0
    )
    assert (again / "samples.csv").read_bytes() == (biovid_root / "samples.csv").read_bytes()
    for csv in sorted((biovid_root / "biosignals_filtered").rglob("*_bio.csv")):
        twin = again / csv.relative_to(biovid_root)
        assert twin.read_bytes() == csv.read_bytes()


@pytest.mark.parametrize(
    ("task", "rows", "labels"), [("binary", 4, {0, 1}), ("multiclass", 10, {0, 1, 2, 3, 4})]
)
def test_manifest_biovid(biovid_root, tmp_path, task, rows, labels, capsys):
    out = tmp_path / "m.parquet"
    assert (
        main(
            ["manifest", "--dataset", "biovid", "--root", str(biovid_root), "--task", task, "--out", str(out)]
        )
        == 0
    )
    df = pd.read_parquet(out)
    assert len(df) == rows and set(df["label"]) == labels
    assert df["video_path"].map(lambda p: p.endswith(".mp4")).all()
    assert "2 subjects" in capsys.readouterr().out


def test_manifest_affwild2(tmp_path):
    root = tmp_path / "aw"
    assert (
        main(
            [
                "synth",
                "affwild2",
                "--out",
                str(root),
                "--subjects",
                "2",
                "--seed",
                "0",
                "--seconds-per-video",
                "4",
                "--frame-size",
                "96",
            ]
        )
        == 0
    )
    out = tmp_path / "m.parquet"
    assert (
        main(
            [
                "manifest",
                "--dataset",
                "affwild2",
                "--root",
                str(root),
                "--out",
                str(out),
                "--set",
                "data.clip_frames=25",
                "--set",
                "data.clip_stride=25",
            ]
        )
        == 0
    )
    df = pd.read_parquet(out)
    assert len(df) >= 4 and df["valence"].between(-1, 1).all() and (df["label"] == -1).all()
    assert df["audio_path"].notna().all()


def test_manifest_table(tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "sample_id": [f"x{i}" for i in range(12)],
            "subject_id": [f"s{i % 3}" for i in range(12)],
            "label": [i % 2 for i in range(12)],
            "face": [rng.normal(size=5).tolist() for _ in range(12)],
            "eeg": [rng.normal(size=7).tolist() for _ in range(12)],
        }
    )
    path = tmp_path / "t.parquet"
    table.to_parquet(path)
    out = tmp_path / "m.parquet"
    assert (
        main(
            [
                "manifest",
                "--dataset",
                "table",
                "--root",
                str(path),
                "--student-modalities",
                "face",
                "--privileged-modalities",
                "eeg",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(pd.read_parquet(out)["sample_id"]) == sorted(table["sample_id"])


def test_invalid_config_fails_naming_the_field(biovid_root, tmp_path, capsys):
    code = main(
        [
            "manifest",
            "--dataset",
            "biovid",
            "--root",
            str(biovid_root),
            "--out",
            str(tmp_path / "m.parquet"),
            "--set",
            "train.batch_size=-4",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and not (tmp_path / "m.parquet").exists()


def test_missing_root_is_a_dataset_error(tmp_path, capsys):
    code = main(
        ["manifest", "--dataset", "biovid", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "m.pq")]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err
