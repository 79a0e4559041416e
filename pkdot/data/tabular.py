"""Bring-your-own feature table -> manifest.

The root is one Parquet FILE with ``sample_id`` (unique), ``subject_id``, the target (``label``: classes
0..K-1 for ``binary`` / ``multiclass``; ``target``: finite floats for ``regression``) and one list-of-float
column per modality (one length per column: the most common one; a tie raises). Stage 1 reads the vectors
from the table itself. Every bad row is found first, then all are reported in one :class:`DatasetError`
(the first :data:`MAX_LISTED`), or skipped and listed under ``data.skip_bad``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pkdot.config import DataConfig
from pkdot.data.manifest import BadSamples, ManifestResult, manifest_frame
from pkdot.errors import ConfigError, DatasetError
from pkdot.rundir import atomic_write_parquet
from pkdot.tables import is_vector_type, modal_length, vector_lengths, vector_problem

logger = logging.getLogger(__name__)

ID_COLUMNS = ("sample_id", "subject_id")
TABLE_TASKS = ("binary", "multiclass", "regression")
#: Bad rows named in one error message (the total is always given).
MAX_LISTED = 20


def _value_problem(value: object, label: bool) -> str | None:
    """Why ``value`` is not a class ``label`` (a non-negative integer) / a finite regression target, or None."""
    kind = "an integer class" if label else "a number"
    if value is None:
        return "is null"
    if isinstance(value, bool):
        return f"{value!r} is a boolean, not {kind}"
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return f"{value!r} is not a number"
        return _value_problem(number, label)
    if not isinstance(value, int | float | np.integer | np.floating):
        return f"{value!r} ({type(value).__name__}) is not {kind}"
    if not np.isfinite(float(value)):
        return f"{value!r} is not finite"
    if label and value != int(value):
        return f"{value!r} is not an integer"
    return f"{value!r} is negative" if label and value < 0 else None


def infer_num_classes(path: Path) -> int:
    """``max(label) + 1`` over the valid labels of a table; :class:`DatasetError` when there is no ``label``
    column or valid label, or a class in ``0..max`` has no row."""
    path = Path(path)
    try:
        table = pq.read_table(path, columns=["label"])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise DatasetError(
            f"table {path}: cannot read a 'label' column to count the classes ({exc}); expected a Parquet file "
            "with an integer 'label' column (or set data.num_classes)"
        ) from exc
    labels = [
        int(float(v)) for v in table.column("label").to_pylist() if _value_problem(v, label=True) is None
    ]
    if not labels:
        raise DatasetError(f"table {path}: column 'label' has no valid class (expected integers >= 0)")
    k = _consecutive_classes(path, labels)
    logger.info("table %s: %d classes inferred from column 'label'", path, k)
    return max(k, 2)


def _consecutive_classes(path: Path, classes: list[int]) -> int:
    """``max(classes) + 1``; raises :class:`DatasetError` when a class in ``0..max`` has no row."""
    k = int(max(classes)) + 1
    if absent := sorted(set(range(k)) - set(classes)):
        raise DatasetError(
            f"table {path}: column 'label' has classes up to {k - 1} but no row of class(es) {absent[:20]} "
            f"(relabel the classes to consecutive integers from 0, or set data.num_classes={k} if they are "
            "meant to be empty)"
        )
    return k


def build_table_manifest(data: DataConfig, root: Path) -> ManifestResult:
    """Manifest of a bring-your-own Parquet table (see the module docstring); a bad column, label set or no
    usable row always raises :class:`DatasetError`, bad rows (vector, label, target, id) unless ``skip_bad``."""
    path = Path(root)
    if data.task not in TABLE_TASKS:
        raise ConfigError(
            f"data.task: table data is 'binary', 'multiclass' (column 'label') or 'regression' (column "
            f"'target'), got {data.task!r}"
        )
    if not path.is_file():
        raise DatasetError(f"table {path} does not exist (expected a Parquet file)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"table {path} is not a readable Parquet file: {exc}") from exc
    target = "target" if data.task == "regression" else "label"
    modalities = data.modalities
    if missing := [c for c in (*ID_COLUMNS, target, *modalities) if c not in table.column_names]:
        raise DatasetError(
            f"table {path}: missing columns {missing} (expected {[*ID_COLUMNS, target]} and one list-of-float "
            f"column per modality {modalities}; found {table.column_names})"
        )
    for m in modalities:
        if not is_vector_type(table.schema.field(m).type):
            raise DatasetError(
                f"table {path}: column {m!r} has type {table.schema.field(m).type} (expected a list of floats "
                "per row)"
            )
    if (n := table.num_rows) == 0:
        raise DatasetError(f"table {path} has no rows")
    sample_ids, subject_ids, targets = (table.column(c).to_pylist() for c in (*ID_COLUMNS, target))
    problems: dict[int, str] = {}  # row -> the first thing wrong with it

    def reject(i: int, column: str, reason: str) -> None:
        problems.setdefault(i, f"column {column!r} row {i}: {reason}")

    for m in modalities:
        lengths, nonfinite = vector_lengths(table.column(m))
        expected = modal_length(path, m, lengths)
        for i in range(n):
            if problem := vector_problem(lengths[i], nonfinite[i], expected):
                reject(i, m, problem)
    seen: set[str] = set()
    wanted = "a finite number" if data.task == "regression" else "a non-negative integer class"
    for i in range(n):
        if sample_ids[i] is None or str(sample_ids[i]) == "":
            reject(i, "sample_id", "empty sample_id")
        elif str(sample_ids[i]) in seen:
            reject(i, "sample_id", f"duplicate sample_id {sample_ids[i]!r} (expected unique ids)")
        else:
            seen.add(str(sample_ids[i]))
        if subject_ids[i] is None or str(subject_ids[i]) == "":
            reject(i, "subject_id", "empty subject_id")
        if problem := _value_problem(targets[i], label=data.task != "regression"):
            reject(i, target, f"{target} {problem} (expected {wanted})")
    if data.task != "regression":
        _check_classes(data, path, targets, problems, reject)

    bad = BadSamples(data.skip_bad)
    if problems and not data.skip_bad:
        raise DatasetError(_bad_rows_message(path, sample_ids, problems))
    for i in sorted(problems):
        bad.bad(path, None if sample_ids[i] is None else str(sample_ids[i]), problems[i])
    if not (keep := [i for i in range(n) if i not in problems]):
        raise DatasetError(f"table {path}: no usable rows ({len(bad.skipped)} skipped)")
    rows = [
        {
            "sample_id": str(sample_ids[i]),
            "subject_id": str(subject_ids[i]),
            "label": -1 if data.task == "regression" else int(float(targets[i])),
            "class_name": "",
            "valence": float("nan"),
            "arousal": float("nan"),
            "target": float(targets[i]) if data.task == "regression" else float("nan"),
            "partition": "",
            "dataset": "table",
        }
        for i in keep
    ]
    frame = manifest_frame(rows)
    if data.task == "regression":
        values = frame["target"].to_numpy(np.float64)
        if np.abs(values).max() > 10.0:
            logger.warning(
                "table %s: 'target' ranges over [%.3g, %.3g]; the regression head is linear and trained with "
                "MSE at the configured learning rates, so a standardised target trains faster",
                path,
                values.min(),
                values.max(),
            )
    return bad.result(frame, f"table {path} (task {data.task})")


def _check_classes(data: DataConfig, path: Path, labels: list, problems: dict[int, str], reject) -> None:
    """The label set against the task: too many classes raise; rows with a class outside the range are bad."""
    if not (valid := [i for i in range(len(labels)) if _value_problem(labels[i], label=True) is None]):
        return
    classes = {i: int(float(labels[i])) for i in valid}
    distinct = sorted(set(classes.values()))
    if data.task == "binary":
        k = 2
        if len(distinct) > k:
            raise DatasetError(
                f"table {path}: column 'label' has {len(distinct)} distinct classes {distinct[:20]} but task "
                f"'binary' has 2 outputs (use data.task=multiclass; the classes are counted from the labels)"
            )
    elif data.num_classes is not None:
        k = data.num_classes
    else:
        k = _consecutive_classes(path, distinct)
    outside = [i for i in valid if classes[i] >= k]
    if outside and data.task == "binary":
        rows = ", ".join(f"row {i} (class {classes[i]})" for i in outside[:MAX_LISTED])
        raise DatasetError(
            f"table {path}: column 'label' has class {max(classes[i] for i in outside)} but task 'binary' "
            f"expects classes 0..1 (relabel the classes to 0 and 1): {len(outside)} rows, {rows}"
        )
    for i in outside:
        reject(i, "label", f"label {classes[i]} is outside 0..{k - 1} (data.num_classes={k})")
    present = {classes[i] for i in valid if i not in problems}
    if absent := sorted(set(range(k)) - present):
        logger.warning("table %s: no usable row of class(es) %s (of 0..%d)", path, absent[:20], k - 1)


def _bad_rows_message(path: Path, sample_ids: list, problems: dict[int, str]) -> str:
    """One error naming every bad row (up to :data:`MAX_LISTED`) and how many there are."""
    rows = sorted(problems)
    named = {i: f"sample {sample_ids[i]!r}: " for i in rows if sample_ids[i] not in (None, "")}
    listed = [f"  {named.get(i, '')}{problems[i]}" for i in rows[:MAX_LISTED]]
    more = f"\n  ... and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
    head = (
        f"table {path}: {len(rows)} bad row{'s' if len(rows) != 1 else ''}"
        + (f" (the first {MAX_LISTED} listed)" if len(rows) > MAX_LISTED else "")
        + "; fix them, or set data.skip_bad=true (--skip-bad) to skip and report them:\n"
    )
    return head + "\n".join(listed) + more


def write_view_table(
    path: str | Path,
    sample_ids: list[str],
    subject_ids: list[str],
    labels: np.ndarray,
    views: dict[str, np.ndarray],
) -> Path:
    """Write a table in this module's layout (``sample_id``, ``subject_id``, ``label``, one float32 list column
    per view of ``views``: name -> (N, D_m)), atomically. Returns ``path``."""
    ids = {"sample_id": pa.array(sample_ids), "subject_id": pa.array(subject_ids), "label": pa.array(labels)}
    vectors = {
        m: pa.array([row.tolist() for row in x], type=pa.list_(pa.float32())) for m, x in views.items()
    }
    atomic_write_parquet(pa.table(ids | vectors), path)
    return Path(path)
