"""Bring-your-own feature table -> manifest.

The root is one Parquet FILE with the columns ``sample_id`` (str, unique), ``subject_id`` (str), ``label``
(non-negative integer class) and one column per modality named in ``data.student_modalities`` and
``data.privileged_modalities``: a list of floats per row, of the same length ``D_m`` in every row, finite.

The manifest rows carry ``sample_id``, ``subject_id``, ``label`` and ``dataset = "table"``; their recording
paths stay null. Stage 1 reads the modality vectors from the table itself (``data.root``).

Task: ``binary`` (labels 0/1) or ``multiclass`` (labels ``0..num_outputs-1``) is the user's choice; more
distinct labels than ``data.num_outputs``, or a label ``>= num_outputs``, raises :class:`DatasetError`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pkdot.config import DataConfig
from pkdot.data.manifest import BadSamples, ManifestResult, manifest_frame
from pkdot.errors import ConfigError, DatasetError

logger = logging.getLogger(__name__)

ID_COLUMNS = ("sample_id", "subject_id", "label")


def _label_problem(value: object) -> str | None:
    """Why ``value`` is not a non-negative integer class label (None when it is one)."""
    if value is None:
        return "is null"
    if isinstance(value, bool):
        return f"{value!r} is a boolean, not an integer class"
    if isinstance(value, int | np.integer):
        return None if value >= 0 else f"{value!r} is negative"
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            return f"{value!r} is not finite"
        if value != int(value):
            return f"{value!r} is not an integer"
        return None if value >= 0 else f"{value!r} is negative"
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return f"{value!r} is not a number"
        return _label_problem(number)
    return f"{value!r} ({type(value).__name__}) is not an integer class"


def _vector_lengths(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, list]:
    """``(lengths, has_nonfinite, values)`` per row of a list<float> column (length -1 for null rows)."""
    values = column.to_pylist()
    lengths = np.full(len(values), -1, np.int64)
    nonfinite = np.zeros(len(values), bool)
    for i, vec in enumerate(values):
        if vec is None:
            continue
        lengths[i] = len(vec)
        arr = np.asarray([np.nan if x is None else x for x in vec], dtype=np.float64)
        nonfinite[i] = bool(arr.size and not np.isfinite(arr).all())
    return lengths, nonfinite, values


def build_table_manifest(data: DataConfig, root: Path) -> ManifestResult:
    """Manifest of a bring-your-own Parquet table (see the module docstring).

    Missing columns, a column that is not a list of numbers, or too many classes always raise; with
    ``data.skip_bad`` a bad row (null / ragged / non-finite vector, bad label, empty or duplicate id) is
    skipped and listed in ``ManifestResult.skipped``, otherwise it raises :class:`DatasetError` naming the file,
    the column and the sample.
    """
    path = Path(root)
    if data.task not in ("binary", "multiclass"):
        raise ConfigError(
            f"data.task: table data is classification, expected 'binary' or 'multiclass', got {data.task!r}"
        )
    if not path.is_file():
        raise DatasetError(f"table {path} does not exist (expected a Parquet file)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"table {path} is not a readable Parquet file: {exc}") from exc
    modalities = data.modalities
    missing = [c for c in (*ID_COLUMNS, *modalities) if c not in table.column_names]
    if missing:
        raise DatasetError(
            f"table {path}: missing columns {missing} (expected {list(ID_COLUMNS)} and one list-of-float column per "
            f"modality {modalities}; found {table.column_names})"
        )
    for m in modalities:
        kind = table.schema.field(m).type
        if not (
            pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
        ) or not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
            raise DatasetError(
                f"table {path}: column {m!r} has type {kind} (expected a list of floats per row)"
            )
    bad = BadSamples(data.skip_bad)
    n = table.num_rows
    if n == 0:
        raise DatasetError(f"table {path} has no rows")
    sample_ids = table.column("sample_id").to_pylist()
    subject_ids = table.column("subject_id").to_pylist()
    labels = table.column("label").to_pylist()
    ok = np.ones(n, bool)

    def reject(i: int, column: str, reason: str) -> None:
        if ok[i]:
            sid = None if sample_ids[i] is None else str(sample_ids[i])
            bad.bad(path, sid, f"column {column!r} row {i}: {reason}")
            ok[i] = False

    for m in modalities:
        lengths, nonfinite, _ = _vector_lengths(table.column(m))
        present = lengths[lengths >= 0]
        expected = int(np.bincount(present).argmax()) if present.size else 0
        for i in range(n):
            if lengths[i] < 0:
                reject(i, m, "the vector is null (expected a list of floats)")
            elif lengths[i] == 0:
                reject(i, m, "the vector is empty")
            elif lengths[i] != expected:
                reject(
                    i,
                    m,
                    f"ragged vector of length {lengths[i]} (expected length {expected}, as in most rows)",
                )
            elif nonfinite[i]:
                reject(i, m, "the vector has non-finite values (NaN/inf/null)")
    seen: set[str] = set()
    for i in range(n):
        if sample_ids[i] is None or str(sample_ids[i]) == "":
            reject(i, "sample_id", "empty sample_id")
        elif str(sample_ids[i]) in seen:
            reject(i, "sample_id", f"duplicate sample_id {sample_ids[i]!r} (expected unique ids)")
        if subject_ids[i] is None or str(subject_ids[i]) == "":
            reject(i, "subject_id", "empty subject_id")
        problem = _label_problem(labels[i])
        if problem:
            reject(i, "label", f"label {problem} (expected a non-negative integer class)")
        if ok[i]:
            seen.add(str(sample_ids[i]))
    keep = np.flatnonzero(ok)
    if keep.size == 0:
        raise DatasetError(f"table {path}: no usable rows ({len(bad.skipped)} skipped)")
    kept_labels = np.array([int(float(labels[i])) for i in keep], np.int64)
    distinct = sorted(set(kept_labels.tolist()))
    k = data.num_outputs
    if len(distinct) > k:
        raise DatasetError(
            f"table {path}: column 'label' has {len(distinct)} distinct classes {distinct[:10]} but task "
            f"{data.task!r} has {k} outputs (use data.task=multiclass for up to 5 classes)"
        )
    if distinct[-1] >= k:
        raise DatasetError(
            f"table {path}: column 'label' has class {distinct[-1]} but task {data.task!r} expects classes "
            f"0..{k - 1} (relabel the classes to consecutive integers from 0)"
        )
    rows = [
        {
            "sample_id": str(sample_ids[i]),
            "subject_id": str(subject_ids[i]),
            "label": int(lab),
            "class_name": "",
            "valence": float("nan"),
            "arousal": float("nan"),
            "partition": "",
            "dataset": "table",
        }
        for i, lab in zip(keep, kept_labels, strict=True)
    ]
    frame = manifest_frame(rows)
    logger.info(
        "table %s: %d samples, %d subjects, %d skipped",
        path,
        len(frame),
        frame["subject_id"].nunique(),
        len(bad.skipped),
    )
    return ManifestResult(frame=frame, skipped=bad.skipped)
