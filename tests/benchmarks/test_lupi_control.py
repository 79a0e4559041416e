"""The positive control's table (benchmarks/lupi_control.py): at coupling 1 the privileged view is the student's
deciding coordinates, at 0 an independent draw that only shares the label."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.benchmarks.bench_loader import load_benchmark

control = load_benchmark("lupi_control")


def _draw(coupling: float, seed: int = 3) -> dict:
    return control.draw_relevant_table(subjects=30, per_subject=20, coupling=coupling, seed=seed)


def test_coupling_one_reveals_the_students_deciding_coordinates():
    t = _draw(1.0)
    x, z, y = t["observed"], t["relevant"], t["label"]
    assert x.shape == (600, control.DIMS) and z.shape == (600, control.RELEVANT)
    np.testing.assert_array_equal(z, x[:, : control.RELEVANT])
    assert 0.3 < y.mean() < 0.7  # both classes, roughly balanced
    # the label is a linear threshold of the privileged view: one direction separates it perfectly
    direction = np.random.default_rng([3, 1]).standard_normal(control.RELEVANT)
    np.testing.assert_array_equal((z @ direction > 0).astype(int), y)
    assert len(set(t["subject_id"])) == 30 and len(set(t["sample_id"])) == 600


def test_coupling_zero_keeps_the_label_but_not_the_window():
    t1, t0 = _draw(1.0), _draw(0.0)
    np.testing.assert_array_equal(t1["observed"], t0["observed"])  # same student view and labels
    np.testing.assert_array_equal(t1["label"], t0["label"])
    x, z, y = t0["observed"], t0["relevant"], t0["label"]
    direction = np.random.default_rng([3, 1]).standard_normal(control.RELEVANT)
    np.testing.assert_array_equal((z @ direction > 0).astype(int), y)  # the teacher can still learn the task
    # ... but, given the label, its view says nothing about the student's window
    for label in (0, 1):
        rows = y == label
        corr = np.corrcoef(z[rows] @ direction, x[rows, : control.RELEVANT] @ direction)[0, 1]
        assert abs(corr) < 0.15, (label, corr)
    # at coupling 1 the same within-class correlation is 1
    z1 = t1["relevant"]
    for label in (0, 1):
        rows = y == label
        assert np.corrcoef(z1[rows] @ direction, x[rows, : control.RELEVANT] @ direction)[0, 1] > 0.999


def test_written_table_and_bad_arguments(tmp_path):
    path = control.write_relevant_table(
        tmp_path / "t.parquet", subjects=4, per_subject=3, coupling=1.0, seed=0
    )
    table = pq.read_table(path)
    assert set(table.column_names) == {"sample_id", "subject_id", "label", "observed", "relevant"}
    assert table.num_rows == 12 and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="coupling must be 0 or 1"):
        control.draw_relevant_table(subjects=4, per_subject=3, coupling=0.5)
    with pytest.raises(ValueError, match=">= 2 subjects"):
        control.draw_relevant_table(subjects=1, per_subject=3, coupling=1.0)
