"""The manifest: one row per sample, the contract between the dataset adapters and feature extraction.

Columns (Parquet, schema :data:`MANIFEST_SCHEMA`): ``sample_id`` (unique), ``subject_id``; ``label`` (class
index; -1 where there is none, e.g. Aff-Wild2), ``class_name``; ``valence``, ``arousal`` (Aff-Wild2 clip means,
else NaN); ``target`` (table regression target, else NaN); ``video_path``, ``physio_path``, ``audio_path``
(absolute, nullable); ``start_frame``, ``num_frames`` (clip window, null = whole video); ``partition``
(Aff-Wild2 ``Train_Set``/``Validation_Set``, else empty); ``dataset`` (``biovid``, ``affwild2``, ``table``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pkdot.config import DataConfig
from pkdot.errors import DatasetError
from pkdot.rundir import atomic_write_parquet

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("subject_id", pa.string()),
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("valence", pa.float64()),
        ("arousal", pa.float64()),
        ("target", pa.float64()),
        ("video_path", pa.string()),
        ("physio_path", pa.string()),
        ("audio_path", pa.string()),
        ("start_frame", pa.int64()),
        ("num_frames", pa.int64()),
        ("partition", pa.string()),
        ("dataset", pa.string()),
    ]
)

BIOVID_CLASSES = ["BL1", "PA1", "PA2", "PA3", "PA4"]


def manifest_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows (dicts with any subset of the manifest columns) -> a DataFrame with every column, in order."""
    df = pd.DataFrame(rows)
    missing = {name: None for name in MANIFEST_SCHEMA.names if name not in df.columns}
    df = df.assign(**missing)[MANIFEST_SCHEMA.names]
    if df["sample_id"].duplicated().any():
        dup = df.loc[df["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise DatasetError(f"manifest: sample_id {dup!r} appears more than once (expected unique ids)")
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest (atomically) with every column of :data:`MANIFEST_SCHEMA`."""
    frame = manifest_frame(df.to_dict("records"))
    atomic_write_parquet(pa.Table.from_pandas(frame, schema=MANIFEST_SCHEMA, preserve_index=False), path)
    return Path(path)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest and check its columns."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise DatasetError(f"manifest {path} is not a readable Parquet file: {exc}") from exc
    if missing := [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]:
        raise DatasetError(f"manifest {path}: missing columns {missing} (expected {MANIFEST_SCHEMA.names})")
    return table.to_pandas()[MANIFEST_SCHEMA.names]


@dataclasses.dataclass
class ManifestResult:
    """What an adapter returns: the manifest rows and the samples it skipped (``data.skip_bad``), each
    ``{"path": str, "sample_id": str | None, "reason": str}``."""

    frame: pd.DataFrame
    skipped: list[dict] = dataclasses.field(default_factory=list)


class BadSamples:
    """Raise :class:`DatasetError` on a bad sample, or record it and go on when ``skip_bad`` is set."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.skipped: list[dict] = []

    def bad(self, path: str | Path, sample_id: str | None, reason: str) -> None:
        """Report one bad sample (``reason`` says what was expected); raises unless ``skip_bad``."""
        if not self.skip_bad:
            where = f"{path}" + (f" (sample {sample_id!r})" if sample_id is not None else "")
            raise DatasetError(f"{where}: {reason}")
        logger.warning("skipping %s%s: %s", path, f" (sample {sample_id!r})" if sample_id else "", reason)
        self.skipped.append({"path": str(path), "sample_id": sample_id, "reason": reason})

    def result(self, frame: pd.DataFrame, what: str) -> ManifestResult:
        """The manifest ``frame`` and the skipped samples, logged as ``<what>: N samples, S subjects, K skipped``."""
        counts = (len(frame), frame["subject_id"].nunique(), len(self.skipped))
        logger.info("%s: %d samples, %d subjects, %d skipped", what, *counts)
        return ManifestResult(frame=frame, skipped=self.skipped)


def use_face_crops(data: DataConfig, root: str, folder: Path, layout: str) -> bool:
    """Whether the faces come from the crop ``folder`` (``data.faces`` 'frames', or unset and it exists) rather
    than the videos; False without the video modality. 'frames' without the folder raises (naming ``root``)."""
    if "video" not in data.modalities:
        return False
    if data.faces == "frames" and not folder.is_dir():
        raise DatasetError(f"{root}: {folder} does not exist (data.faces 'frames' expects {layout})")
    return data.faces == "frames" or (data.faces is None and folder.is_dir())
