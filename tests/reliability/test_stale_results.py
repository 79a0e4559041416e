"""Cases 1 and 2 of issue 11: no stage ever reads stale results.

1. A re-extract in which every sample fails must not leave the old feature tables (or the old extract marker)
   usable: ``train-teacher`` refuses, naming ``pkdot extract``.
2. A recording zeroed or rewritten in place is seen: extract redoes exactly the shards that contain it; the
   Prefect cache key is the library's key and follows the recordings and the stage's source code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pkdot import pipeline, rundir
from pkdot.errors import FeatureError, StageError
from pkdot.pipeline.base import check_upstream, code_hash, stage_key
from tests.reliability.conftest import extract, tiny_cfg


def _marker(run: Path, stage: str) -> dict:
    return json.loads((run / "stages" / f"{stage}.json").read_text())


def test_failed_reextract_leaves_no_usable_features(tiny_biovid: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg(tiny_biovid, run)
    first = extract(cfg)
    assert not first.skipped and (run / "features" / "faces.parquet").is_file()
    manifest_before = pd.read_parquet(run / "manifest.parquet")

    for video in (tiny_biovid / "video").rglob("*.mp4"):  # every sample fails now
        video.write_bytes(b"")
    with pytest.raises(FeatureError, match="extraction wrote no sample"):
        extract(cfg)

    assert not (run / "features" / "faces.parquet").exists()  # the old tables are gone ...
    assert not (run / "features" / "physio.parquet").exists()
    assert "fingerprint" not in _marker(run, "extract")  # ... and so is the marker's fingerprint
    with pytest.raises(StageError, match=r"stage 'extract' did not complete .* re-run `pkdot extract`"):
        pipeline.run_stage("train-teacher", cfg)
    # what the manifest stage wrote is intact (all six rows; the quarantine happened in extract)
    pd.testing.assert_frame_equal(pd.read_parquet(run / "manifest.parquet"), manifest_before)
    report = json.loads((run / "features" / "extract_report.json").read_text())
    assert report["n_written"] == 0 and len(report["quarantined"]) == len(manifest_before)


def test_an_earlier_stage_running_again_is_refused_downstream(tiny_biovid: Path, tmp_path: Path) -> None:
    """Not only the previous stage: a stage further up that is running again (or whose re-run was interrupted)
    has invalidated what it wrote before, so nothing downstream reads it, and readers of finished runs
    (``check_upstream`` past the last stage they read) refuse it too."""
    run = tmp_path / "run"
    cfg = tiny_cfg(tiny_biovid, run)
    extract(cfg)
    after_extract = pipeline.STAGES.index(pipeline.stage("extract")) + 1
    assert check_upstream(cfg, pipeline.STAGES, after_extract) == _marker(run, "extract")["fingerprint"]
    marker = run / "stages" / "manifest.json"
    marker.write_text(
        json.dumps({"inputs": "pending:" + _marker(run, "manifest")["inputs"]})
    )  # as execute does
    with pytest.raises(StageError, match=r"stage 'manifest' did not complete .* re-run `pkdot extract`"):
        pipeline.run_stage("train-teacher", cfg)
    with pytest.raises(StageError, match=r"stage 'manifest' did not complete"):
        check_upstream(cfg, pipeline.STAGES, after_extract)


def test_features_changed_behind_the_pipeline_are_refused(tiny_biovid: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg(tiny_biovid, run)
    extract(cfg)
    faces = run / "features" / "faces.parquet"
    faces.write_bytes(faces.read_bytes())  # rewritten (new mtime): not what extract recorded
    with pytest.raises(StageError, match=r"faces\.parquet \(changed\).*re-run `pkdot extract`"):
        pipeline.run_stage("train-teacher", cfg)
    faces.unlink()
    with pytest.raises(StageError, match=r"faces\.parquet \(missing\).*re-run `pkdot extract`"):
        pipeline.run_stage("train-teacher", cfg)
    again = extract(cfg)  # extract sees its own outputs changed and rebuilds them from the kept shards
    assert not again.skipped and faces.is_file()
    assert again.details["shards_done"] == 0 and again.details["shards_skipped"] == 12


def test_a_recording_changed_in_place_redoes_exactly_its_shards(tiny_biovid: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg(tiny_biovid, run)
    first = extract(cfg)
    assert first.details["shards_done"] == 12  # 6 samples x (video, physio), one sample per shard
    assert extract(cfg).skipped  # nothing changed: up to date

    victim = sorted((tiny_biovid / "video").rglob("*.mp4"))[0]
    victim.write_bytes(b"")  # zeroed in place
    zeroed = extract(cfg)
    assert not zeroed.skipped
    assert zeroed.details["shards_done"] == 1 and zeroed.details["shards_skipped"] == 11
    report = json.loads((run / "features" / "extract_report.json").read_text())
    assert [q["sample_id"] for q in report["quarantined"]] == [victim.stem]
    assert str(victim) in report["quarantined"][0]["reason"]
    assert zeroed.fingerprint != first.fingerprint  # so every stage below gets a new key

    bio = sorted((tiny_biovid / "biosignals_filtered").rglob("*_bio.csv"))[-1]
    text = bio.read_text().splitlines()
    bio.write_text("\n".join(text[:1] + [text[2], text[1]] + text[3:]) + "\n")  # same size, new content
    rewritten = extract(cfg)
    assert rewritten.details["shards_done"] == 1 and rewritten.details["shards_skipped"] == 11


def test_a_rewritten_recording_changes_the_extract_key_and_the_version_string_does_not(
    tiny_biovid: Path, tmp_path: Path, monkeypatch
) -> None:
    import pkdot

    cfg = tiny_cfg(tiny_biovid, tmp_path / "run")
    manifest = pipeline.run_stage("manifest", cfg)
    key = stage_key(cfg, pipeline.stage("extract"), manifest.fingerprint)
    monkeypatch.setattr(pkdot, "__version__", "99.0")  # the version string is not part of any key
    assert stage_key(cfg, pipeline.stage("extract"), manifest.fingerprint) == key

    sorted((tiny_biovid / "video").rglob("*.mp4"))[0].write_bytes(b"")
    changed = pipeline.run_stage("manifest", cfg)
    assert changed.fingerprint != manifest.fingerprint
    assert stage_key(cfg, pipeline.stage("extract"), changed.fingerprint) != key


def test_editing_a_stage_source_file_changes_only_that_stage_key(tmp_path: Path) -> None:
    package = Path(shutil.copytree(rundir.PACKAGE_DIR, tmp_path / "pkdot"))
    before = {s.name: code_hash(s, package) for s in pipeline.STAGES}
    faces = package / "features" / "faces.py"
    faces.write_text(faces.read_text() + "\n# an edit\n")
    after = {s.name: code_hash(s, package) for s in pipeline.STAGES}
    assert after["extract"] != before["extract"]
    assert {s for s in after if after[s] != before[s]} == {"extract"}
    loss = package / "distill" / "kd.py"
    loss.write_text(loss.read_text() + "\n# an edit\n")
    assert code_hash(pipeline.stage("distill"), package) != before["distill"]
    assert code_hash(pipeline.stage("train-teacher"), package) == before["train-teacher"]


def test_an_edited_extractor_reruns_the_stage_and_its_modality_shards(
    tiny_biovid: Path, tmp_path: Path, monkeypatch
) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg(tiny_biovid, run)
    extract(cfg)
    package = Path(shutil.copytree(rundir.PACKAGE_DIR, tmp_path / "pkdot"))
    physio = package / "features" / "physio.py"
    physio.write_text(physio.read_text() + "\n# an edit\n")
    monkeypatch.setattr(rundir, "PACKAGE_DIR", package)
    again = extract(cfg)
    assert not again.skipped
    assert again.details["shards_done"] == 6 and again.details["shards_skipped"] == 6  # the physio shards
