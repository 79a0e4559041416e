"""Stage ``manifest``: the data set's adapter -> ``RUN/manifest.parquet`` (+ ``manifest_report.json``). Runs every
time (a cheap re-scan); its fingerprint covers the rows, a generated set's parameters and the identity of every
recording and index file, so a recording rewritten in place changes every key below."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pkdot.config import RunConfig
from pkdot.data import build_manifest, write_manifest_report
from pkdot.data.manifest import write_manifest
from pkdot.folds import fold_plan
from pkdot.pipeline.base import Stage, StageOutput
from pkdot.rundir import RunDir, file_identity, hash_json


def recordings_identity(frame: pd.DataFrame, root: str | Path | None) -> str:
    """Hash of the identity (:func:`pkdot.rundir.file_identity`) of every recording a manifest names and of the
    data root's index files (a table root: the file itself)."""
    columns = [c for c in ("video_path", "physio_path", "audio_path") if c in frame.columns]
    idents = {v: file_identity(v) for c in columns for v in frame[c].tolist() if isinstance(v, str) and v}
    if root is not None:
        root = Path(root)
        for p in [root] if root.is_file() else sorted(q for q in root.iterdir() if q.is_file()):
            idents[str(p)] = file_identity(p)
    return hash_json(idents)


def run(cfg: RunConfig) -> StageOutput:
    rd = RunDir(cfg.run_dir)
    result = build_manifest(cfg.data, cfg.data.root)
    # too few subjects for the folds: refuse now, not at training
    fold_plan(result.frame, cfg.train, cfg.seed)
    write_manifest(result.frame, rd.manifest)
    write_manifest_report(result, rd.manifest_report)
    rows = str(int(pd.util.hash_pandas_object(result.frame.astype(str), index=False).sum() % (1 << 62)))
    # A generated set keeps its paths when its parameters (coupling, ...) change: they decide its content.
    synthetic = Path(cfg.data.root) / ".synthetic-complete.json"
    payload = {"rows": rows, "recordings": recordings_identity(result.frame, cfg.data.root)}
    if synthetic.is_file():
        payload["synthetic"] = synthetic.read_text()
    subjects = int(result.frame["subject_id"].nunique())
    details = dict(samples=len(result.frame), skipped=len(result.skipped), subjects=subjects)
    return StageOutput([rd.manifest], details, fingerprint=hash_json(payload))


STAGE = Stage(
    name="manifest",
    sections=("seed", "data", "train"),
    code=("data", "folds.py"),
    output=lambda rd: rd.manifest,
    body=run,
    help="Data set root -> manifest (one row per sample; bad samples named)",
    always=True,
)
