"""The manifest: one row per sample, the contract between the dataset adapters and stage 1.

Columns (Parquet, schema :data:`MANIFEST_SCHEMA`):

- ``sample_id`` (str, unique), ``subject_id`` (str)
- ``label`` (int64): class index for classification data sets (Biovid: 0=BL1 .. 4=PA4; table: the user's
  integer label), -1 where there is none (Aff-Wild2)
- ``class_name`` (str, may be empty)
- ``valence``, ``arousal`` (float64): clip-mean annotation for Aff-Wild2, NaN elsewhere
- ``target`` (float64): the regression target of table data (``data.task: regression``), NaN elsewhere
  (optional on read: a manifest written before this column existed reads as all-NaN)
- ``video_path``, ``physio_path``, ``audio_path`` (str, nullable): absolute paths of the recordings
- ``start_frame``, ``num_frames`` (int64, nullable): the clip window in the video (Aff-Wild2); null = whole video
- ``partition`` (str): Aff-Wild2 ``Train_Set``/``Validation_Set``; empty elsewhere
- ``dataset`` (str): ``biovid``, ``affwild2`` or ``table``
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pkdot.errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from pkdot.config import TrainConfig
    from pkdot.train.splits import Fold

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

#: Columns that an older manifest may lack; they read as null.
OPTIONAL_COLUMNS = ("target",)


def manifest_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows (dicts with any subset of the manifest columns) -> a DataFrame with every column, in order."""
    df = pd.DataFrame(rows)
    for field in MANIFEST_SCHEMA:
        if field.name not in df.columns:
            df[field.name] = None
    df = df[[f.name for f in MANIFEST_SCHEMA]]
    if df["sample_id"].duplicated().any():
        dup = df.loc[df["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise DatasetError(f"manifest: sample_id {dup!r} appears more than once (expected unique ids)")
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a manifest atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(
        manifest_frame(df.to_dict("records")), schema=MANIFEST_SCHEMA, preserve_index=False
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest and check its columns."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise DatasetError(f"manifest {path} is not a readable Parquet file: {exc}") from exc
    missing = [
        f.name for f in MANIFEST_SCHEMA if f.name not in table.column_names and f.name not in OPTIONAL_COLUMNS
    ]
    if missing:
        raise DatasetError(f"manifest {path}: missing columns {missing} (expected {MANIFEST_SCHEMA.names})")
    frame = table.to_pandas()
    for name in OPTIONAL_COLUMNS:
        if name not in frame.columns:
            frame[name] = float("nan")
    return frame[[f.name for f in MANIFEST_SCHEMA]]


@dataclasses.dataclass
class ManifestResult:
    """What an adapter returns: the manifest rows and the samples it skipped (``data.skip_bad``).

    ``skipped`` holds ``{"path": str, "sample_id": str | None, "reason": str}`` per skipped sample.
    """

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


def subject_partitions(frame: pd.DataFrame) -> dict[str, str]:
    """Each subject's ``partition`` (Aff-Wild2 ``Train_Set`` / ``Validation_Set``).

    Raises :class:`DatasetError` naming the subjects whose samples lie in more than one partition (the
    official protocol needs train and test subjects to be disjoint).
    """
    pairs = frame[["subject_id", "partition"]].astype(str).drop_duplicates()
    counts = pairs.groupby("subject_id")["partition"].nunique()
    both = sorted(counts[counts > 1].index)
    if both:
        raise DatasetError(
            f"manifest: subjects {both[:10]} ({len(both)} in all) have samples in more than one partition "
            "(expected each video/subject in exactly one of Train_Set and Validation_Set)"
        )
    return dict(zip(pairs["subject_id"], pairs["partition"], strict=True))


def fold_plan(frame: pd.DataFrame, train: TrainConfig, seed: int) -> list[Fold]:
    """The subject folds a run of these samples uses (``train.folds``, ``train.val_fraction``, ``seed``).

    ``official``: :func:`pkdot.train.splits.official_folds` over the samples' partitions; otherwise
    :func:`pkdot.train.splits.subject_folds` over their subjects. ``train.max_folds`` is *not* applied.
    Raises :class:`ConfigError` when there are too few subjects for the scheme, naming the subjects found and
    the number the scheme needs (called at manifest time, so a run stops before extraction).
    """
    from pkdot.train.splits import official_folds, subject_folds

    if train.folds == "official":
        return official_folds(subject_partitions(frame), val_fraction=train.val_fraction, seed=seed)
    scheme = 5 if train.folds is None else train.folds
    subjects = sorted(set(frame["subject_id"].astype(str)))
    try:
        return subject_folds(subjects, scheme, val_fraction=train.val_fraction, seed=seed)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc} [the manifest has {len(frame)} samples from {len(subjects)} subject(s): "
            f"{subjects[:10]}{' ...' if len(subjects) > 10 else ''}]"
        ) from None


def describe_protocol(scheme: int | str | None, splits_path: Path) -> str:
    """One sentence naming the evaluation protocol recorded in ``splits.json`` (for the report).

    Reads the file's entries (``fold``, ``train``, ``val``, ``test`` and, for repeated folds, ``seed``) and
    describes the folds of the first seed listed.
    """
    entries = json.loads(Path(splits_path).read_text())
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"splits file {splits_path}: expected a non-empty list of folds")
    first_seed = entries[0].get("seed")
    folds = [e for e in entries if e.get("seed") == first_seed]
    seeds = sorted({e.get("seed") for e in entries if e.get("seed") is not None})
    if scheme == "official":
        f = folds[0]
        return (
            f"official Aff-Wild2 partitions: trained on `Train_Set` ({len(f['train'])} videos, {len(f['val'])} "
            f"more held out for validation/model selection), tested on `Validation_Set` ({len(f['test'])} videos)"
        )
    name = "leave-one-subject-out" if scheme == "loso" else f"subject {scheme}-fold"
    repeats = f", drawn anew for each of {len(seeds)} seeds" if len(seeds) > 1 and scheme != "loso" else ""
    return (
        f"{name} cross-validation ({len(folds)} folds evaluated{repeats}; test subjects never seen in "
        "training, validation subjects carved from each fold's training subjects)"
    )
