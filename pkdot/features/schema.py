"""Schemas of the feature tables under ``<run>/features/``: a ``sample_id`` column and *tensor columns*, each
stored as ``NAME`` (the array's C-order bytes), ``NAME_shape`` (list<int32>) and ``NAME_dtype`` (numpy name).

- ``faces.parquet``: ``frames`` uint8 (T, H, W, 3) RGB crops; ``face_found`` (fraction of sampled frames with
  the face), ``boxes`` (T*4: x, y, w, h in source pixels), ``lost_frames``.
- ``physio.parquet``: ``window`` float32 (C, L); ``spectrogram`` float32 (C, F, T) log power; ``channels``;
  descriptors ``eda_level``, ``eda_slope``, ``heart_rate``, ``emg_rms``.
- ``audio.parquet``: ``logmel`` float32 (n_mels, T); bring-your-own ``<modality>.parquet``: ``vector`` (D,).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pkdot.errors import FeatureError
from pkdot.rundir import atomic_write_parquet

#: Default tensor column the models read for each extracted modality.
DEFAULT_TENSOR: dict[str, str] = {"video": "frames", "physio": "spectrogram", "audio": "logmel"}
#: Rows per Parquet row group (streaming reads never hold more than this many decoded samples).
ROW_GROUP_SIZE = 64


def tensor_fields(name: str) -> list[pa.Field]:
    return [
        pa.field(name, pa.binary()),
        pa.field(f"{name}_shape", pa.list_(pa.int32())),
        pa.field(f"{name}_dtype", pa.string()),
    ]


FACES_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        *tensor_fields("frames"),
        pa.field("face_found", pa.float64()),
        pa.field("boxes", pa.list_(pa.float32())),
        pa.field("lost_frames", pa.int32()),
    ]
)
PHYSIO_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        *tensor_fields("window"),
        *tensor_fields("spectrogram"),
        pa.field("channels", pa.list_(pa.string())),
        *(pa.field(name, pa.float64()) for name in ("eda_level", "eda_slope", "heart_rate", "emg_rms")),
    ]
)
AUDIO_SCHEMA = pa.schema([pa.field("sample_id", pa.string()), *tensor_fields("logmel")])
VECTOR_SCHEMA = pa.schema([pa.field("sample_id", pa.string()), *tensor_fields("vector")])


def encode_tensor(name: str, array: np.ndarray) -> dict[str, object]:
    """One tensor -> the three column values of a row."""
    arr = np.ascontiguousarray(array)
    return {name: arr.tobytes(), f"{name}_shape": list(arr.shape), f"{name}_dtype": arr.dtype.name}


def write_table_atomic(
    rows: list[dict], schema: pa.Schema, path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write rows to ``path`` atomically, in row groups; ``metadata`` goes into the file's schema metadata."""
    if metadata:
        schema = schema.with_metadata({**(schema.metadata or {}), **metadata})
    atomic_write_parquet(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=ROW_GROUP_SIZE)
    return Path(path)


def read_sample_ids(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"feature table {path} does not exist (run `pkdot extract` first)")
    return pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()


def iter_tensors(
    path: str | Path, column: str, batch_rows: int = ROW_GROUP_SIZE
) -> Iterable[tuple[list[str], np.ndarray]]:
    """Stream ``(sample_ids, stacked array)`` batches of one tensor column."""
    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"feature table {path} does not exist (run `pkdot extract` first)")
    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise FeatureError(
            f"feature table {path} has no tensor column {column!r} (has {pf.schema_arrow.names})"
        )
    cols = ["sample_id", column, f"{column}_shape", f"{column}_dtype"]
    for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
        d = batch.to_pydict()
        arrays = [
            np.frombuffer(r, dtype=np.dtype(t)).reshape(tuple(s))
            for r, s, t in zip(d[column], d[f"{column}_shape"], d[f"{column}_dtype"], strict=True)
        ]
        yield d["sample_id"], np.stack(arrays) if arrays else np.empty((0,))


def read_tensors(
    path: str | Path, column: str, sample_ids: Sequence[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Read one tensor column fully: ``(sample_ids, array (N, *shape))``, in the order of ``sample_ids`` when
    given (an absent one raises FeatureError)."""
    if not (batches := list(iter_tensors(path, column))):
        raise FeatureError(f"feature table {path} is empty")
    ids = [sid for batch_ids, _ in batches for sid in batch_ids]
    data = np.concatenate([arr for _, arr in batches])
    if sample_ids is None:
        return ids, data
    index = {s: i for i, s in enumerate(ids)}
    if missing := [s for s in sample_ids if s not in index]:
        raise FeatureError(
            f"feature table {path}: {len(missing)} requested samples are absent, e.g. {missing[:3]}"
        )
    order = np.array([index[s] for s in sample_ids], dtype=np.int64)
    return list(sample_ids), data[order]
