"""Stage ``extract``: manifest -> ``RUN/features/*.parquet`` + ``extract_report.json`` (Ray tasks, resumable
shards: each shard is keyed by its own rows' recordings, so a re-run redoes only the shards that changed)."""

from __future__ import annotations

from typing import Any

from pkdot.config import RunConfig
from pkdot.data.manifest import read_manifest
from pkdot.errors import StageError
from pkdot.features.extract import run_extract
from pkdot.pipeline.base import Stage, StageOutput, remove_stale
from pkdot.rundir import RunDir
from pkdot.tracking.runs import log_stage


def _numeric(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a report as ``a.b.c`` metric names; per-sample sections stay in the JSON artifact."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, bool) or k in ("per_sample", "quarantined", "not_written"):
            continue
        if isinstance(v, int | float):
            out[f"{prefix}{k}"] = float(v)
        elif isinstance(v, dict):
            out.update(_numeric(v, f"{prefix}{k}."))
    return out


def before(cfg: RunConfig, options: dict[str, Any]) -> None:
    """Nothing downstream may read the old tables while (or if) this run fails: they go first; the shards stay."""
    rd = RunDir(cfg.run_dir)
    for path in [*sorted(rd.features.glob("*.parquet")), rd.extract_report]:
        remove_stale(path)


def run(cfg: RunConfig) -> StageOutput:
    rd = RunDir(cfg.run_dir)
    report = run_extract(cfg, read_manifest(rd.manifest), rd.root, workers=cfg.features.workers)
    if not (tables := sorted(rd.features.glob("*.parquet"))):
        raise StageError(f"extraction wrote no feature table under {rd.features}")
    log_stage(cfg, "extract", metrics=_numeric(report), artifacts=[rd.extract_report])
    keys = ("counts", "face_detection_rate", "shards_done", "shards_skipped")
    return StageOutput(tables, {k: report[k] for k in keys if k in report})


STAGE = Stage(
    name="extract",
    sections=("seed", "data", "features"),
    code=("features", "data/manifest.py", "scheduler.py", "ray_utils.py"),
    output=lambda rd: rd.features,
    body=run,
    before=before,
    help="Manifest + face/physio/audio features into RUN/features",
)
