"""Dataset adapters: a dataset root -> the manifest (one row per sample, :mod:`pkdot.data.manifest`).

- :func:`build_manifest` dispatches on ``data.dataset`` to :mod:`pkdot.data.biovid`,
  :mod:`pkdot.data.affwild2` or :mod:`pkdot.data.tabular` and applies the task.
- :func:`write_manifest_report` writes what was skipped (``data.skip_bad``) as JSON.
- :mod:`pkdot.data.synthetic` writes small data sets in the real layouts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pkdot.config import DataConfig
from pkdot.data.manifest import ManifestResult
from pkdot.errors import DatasetError
from pkdot.rundir import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["ManifestResult", "build_manifest", "write_manifest_report"]


def build_manifest(data: DataConfig, root: Path | None = None) -> ManifestResult:
    """Read a dataset root into a manifest.

    Parameters
    ----------
    data : the run's data section (dataset, part, task, modalities, clip windows, skip_bad).
    root : dataset root (a directory; for ``dataset: table`` the Parquet file). Defaults to ``data.root``.

    Returns
    -------
    ManifestResult with ``frame`` (manifest columns, one row per sample) and ``skipped`` (bad samples skipped
    under ``data.skip_bad``). Raises :class:`DatasetError` naming the path and what was expected.
    """
    chosen = root if root is not None else data.root
    if chosen is None:
        raise DatasetError(
            f"data.root is not set for dataset {data.dataset!r} (give a dataset root, or let `pkdot run` "
            "generate the synthetic set)"
        )
    chosen = Path(chosen).expanduser()
    if data.dataset == "biovid":
        from pkdot.data.biovid import build_biovid_manifest

        return build_biovid_manifest(data, chosen)
    if data.dataset == "affwild2":
        from pkdot.data.affwild2 import build_affwild2_manifest

        return build_affwild2_manifest(data, chosen)
    if data.dataset == "table":
        from pkdot.data.tabular import build_table_manifest

        return build_table_manifest(data, chosen)
    raise DatasetError(f"data.dataset {data.dataset!r} has no adapter (expected biovid, affwild2 or table)")


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
