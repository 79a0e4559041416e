"""Dataset adapters: a dataset root -> the manifest (one row per sample, :mod:`pkdot.data.manifest`);
:mod:`pkdot.data.synthetic` writes small data sets in the real layouts."""

from __future__ import annotations

import logging
from pathlib import Path

from pkdot.config import DataConfig
from pkdot.data.affwild2 import build_affwild2_manifest
from pkdot.data.biovid import build_biovid_manifest
from pkdot.data.manifest import ManifestResult
from pkdot.data.tabular import build_table_manifest
from pkdot.errors import DatasetError
from pkdot.rundir import atomic_write_json

logger = logging.getLogger(__name__)
ADAPTERS = dict(biovid=build_biovid_manifest, affwild2=build_affwild2_manifest, table=build_table_manifest)


def build_manifest(data: DataConfig, root: Path | None = None) -> ManifestResult:
    """Read a dataset ``root`` (default ``data.root``; for a ``table`` a Parquet file) into a manifest."""
    if (chosen := root if root is not None else data.root) is None:
        raise DatasetError(
            f"data.root is not set for dataset {data.dataset!r} (give a dataset root, or let `pkdot run` "
            "generate the synthetic set)"
        )
    return ADAPTERS[data.dataset](data, Path(chosen).expanduser())


def write_manifest_report(result: ManifestResult, path: Path) -> None:
    """Write ``{"samples", "subjects", "skipped_count", "skipped": [...]}`` as JSON."""
    frame = result.frame
    report = {
        "samples": int(len(frame)),
        "subjects": int(frame["subject_id"].nunique()) if len(frame) else 0,
        "skipped_count": len(result.skipped),
        "skipped": list(result.skipped),
    }
    atomic_write_json(path, report, indent=2)
    logger.info("manifest report -> %s (%d skipped)", path, len(result.skipped))
