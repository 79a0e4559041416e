"""Bring-your-own feature table: validation, quarantine and aligned ``<column>.parquet`` vector tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pkdot.config import load_config
from pkdot.data.manifest import manifest_frame
from pkdot.errors import DatasetError, FeatureError
from pkdot.features.extract import run_extract
from pkdot.features.schema import read_tensors
from pkdot.rundir import RunDir


def _table(tmp_path, face, bio):
    ids = [f"s{i}" for i in range(len(face))]
    path = tmp_path / "features.parquet"
    pd.DataFrame(
        {"sample_id": ids, "subject": [f"p{i % 3}" for i in range(len(ids))], "face": face, "bio": bio}
    ).to_parquet(path)
    manifest = manifest_frame(
        [{"sample_id": s, "subject_id": "p", "label": 0, "dataset": "table"} for s in ids]
    )
    cfg = load_config(
        overrides={
            "data.dataset": "table",
            "data.root": str(path),
            "data.student_modalities": ["face"],
            "data.privileged_modalities": ["bio"],
        }
    )
    return cfg, manifest


def test_table_columns_become_aligned_vector_tables(tmp_path):
    rng = np.random.default_rng(0)
    face = [rng.standard_normal(6).tolist() for _ in range(6)]
    bio = [rng.standard_normal(4).tolist() for _ in range(6)]
    face[1][2] = float("nan")  # non-finite -> quarantined
    bio[3] = bio[3][:3]  # wrong length -> quarantined
    cfg, manifest = _table(tmp_path, face, bio)
    manifest = pd.concat([manifest, manifest_frame([{"sample_id": "absent", "subject_id": "p", "label": 0}])])
    report = run_extract(cfg, manifest, tmp_path / "run", progress=False)
    reasons = {(q["sample_id"], q["modality"]): q["reason"] for q in report["quarantined"]}
    assert "non-finite" in reasons[("s1", "face")]
    assert "ragged vector of length 3 (expected length 4" in reasons[("s3", "bio")]
    assert "not in the table" in reasons[("absent", "face")]
    ids_face, face_arr = read_tensors(tmp_path / "run/features/face.parquet", "vector")
    ids_bio, bio_arr = read_tensors(tmp_path / "run/features/bio.parquet", "vector")
    assert ids_face == ids_bio == ["s0", "s2", "s4", "s5"]
    assert face_arr.shape == (4, 6) and bio_arr.shape == (4, 4) and face_arr.dtype == np.float32
    assert np.allclose(face_arr[1], face[2])
    assert report["vector_dims"] == {"face": 6, "bio": 4}
    assert json.loads(RunDir(tmp_path / "run").extract_report.read_text())["n_written"] == 4


def test_table_errors_name_the_file_and_column(tmp_path):
    cfg, manifest = _table(tmp_path, [[1.0, 2.0]] * 2, [[1.0]] * 2)
    with pytest.raises(DatasetError, match="no column 'eeg'"):
        run_extract(
            cfg.model_copy(update={"data": cfg.data.model_copy(update={"privileged_modalities": ["eeg"]})}),
            manifest,
            tmp_path / "run",
            progress=False,
        )
    with pytest.raises(DatasetError, match="expected a list of numbers"):
        run_extract(
            cfg.model_copy(
                update={"data": cfg.data.model_copy(update={"privileged_modalities": ["subject"]})}
            ),
            manifest,
            tmp_path / "run",
            progress=False,
        )
    with pytest.raises(DatasetError, match="Parquet file"):
        run_extract(
            cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": tmp_path / "nope.parquet"})}),
            manifest,
            tmp_path / "run",
            progress=False,
        )
    nan_cfg, nan_manifest = _table(tmp_path, [[1.0, float("nan")]] * 2, [[1.0]] * 2)
    with pytest.raises(FeatureError, match="no sample has valid vectors"):
        run_extract(nan_cfg, nan_manifest, tmp_path / "run2", progress=False)
    assert RunDir(tmp_path / "run2").extract_report.is_file()
