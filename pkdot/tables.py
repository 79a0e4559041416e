"""Row checks of bring-your-own vector tables (used by the manifest and by extraction) and the delimiter of a
text table's header (Biovid ``samples.csv`` and biosignal CSVs)."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np
import pyarrow as pa

from pkdot.errors import DatasetError


@functools.lru_cache(maxsize=256)
def sniff_delimiter(header: str, delimiters: str = "\t,;") -> str | None:
    """The delimiter of a header line among ``delimiters`` (csv.Sniffer, else the most frequent of tab, comma,
    semicolon), or None. Cached: thousands of files share a few headers."""
    try:
        return csv.Sniffer().sniff(header, delimiters=delimiters).delimiter
    except csv.Error:
        counts = {d: header.count(d) for d in "\t,;"}
        best = max(counts, key=lambda d: counts[d])
        return best if counts[best] else None


def is_vector_type(kind: pa.DataType) -> bool:
    """Whether a Parquet column type holds one vector of numbers per row (a list of ints or floats)."""
    lists = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    return lists and (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type))


def vector_lengths(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, has_nonfinite)`` per row of a list<float> column (length -1 for null rows)."""
    values = column.to_pylist()
    lengths = np.array([-1 if vec is None else len(vec) for vec in values], np.int64)
    nonfinite = [vec is not None and not np.isfinite(np.array(vec, dtype=np.float64)).all() for vec in values]
    return lengths, np.array(nonfinite, bool)


def modal_length(path: Path, column: str, lengths: np.ndarray) -> int:
    """The most common positive length of a vector column (``lengths`` of :func:`vector_lengths`; nulls and
    empty vectors ignored); raises :class:`DatasetError` on a tie."""
    present = lengths[lengths > 0]
    if present.size == 0:
        return 0
    values, counts = np.unique(present, return_counts=True)
    top = values[counts == counts.max()]
    if top.size > 1:
        spread = ", ".join(f"length {v}: {c} rows" for v, c in zip(values, counts, strict=True))
        raise DatasetError(
            f"table {path}: column {column!r} has no majority vector length ({spread}); expected one length "
            "per modality, and a tie does not say which rows are wrong (fix the table)"
        )
    return int(top[0])


def vector_problem(length: int, nonfinite: bool, expected: int) -> str | None:
    """What is wrong with one row's vector (see :func:`vector_lengths`), or None."""
    if length < 0:
        return "the vector is null (expected a list of floats)"
    if length == 0:
        return "the vector is empty"
    if length != expected:
        return f"ragged vector of length {length} (expected length {expected}, as in most rows)"
    if nonfinite:
        return "the vector has non-finite values (NaN/inf/null)"
    return None
