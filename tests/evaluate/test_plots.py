"""pkdot.evaluate.plots: each figure is a valid PNG that depends on its data; bad input raises."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pkdot.errors import StageError
from pkdot.evaluate.plots import (
    plot_confusion_matrices,
    plot_embedding_map,
    plot_learning_curves,
    plot_metric_bars,
    plot_structure,
)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) > 5000, f"{path} is only {len(data)} bytes"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (
        kind == b"IHDR"
        and zlib.crc32(data[12 : 16 + length]) == struct.unpack(">I", data[16 + length : 20 + length])[0]
    )
    assert data[-8:-4] == b"IEND"
    return struct.unpack(">II", data[16:24])


def _pred(y_pred_offset: int) -> pd.DataFrame:
    y = np.array([0, 1, 2] * 6)
    rows = []
    for model in ("teacher", "student-none"):
        for fold in (0, 1):
            p = (y + (y_pred_offset if model == "student-none" else 0)) % 3
            rows.append(
                pd.DataFrame(
                    {
                        "model": model,
                        "fold": fold,
                        "seed": 0,
                        "split": "test",
                        "y_true": y.astype(float),
                        "y_pred": p.astype(float),
                    }
                )
            )
    return pd.concat(rows, ignore_index=True)


def test_confusion_matrices(tmp_path):
    a = plot_confusion_matrices(_pred(0), 3, tmp_path / "a.png")
    b = plot_confusion_matrices(_pred(1), 3, tmp_path / "b.png")
    assert a == tmp_path / "a.png"
    width, height = _png_size(a)
    assert width > 400 and height > 200
    _png_size(b)
    assert a.read_bytes() != b.read_bytes()  # the drawing reflects the predictions
    with pytest.raises(StageError, match="outside"):
        plot_confusion_matrices(_pred(0), 2, tmp_path / "d.png")
    assert not (tmp_path / "d.png").exists()


def test_learning_curves(tmp_path):
    runs = [
        [{"epoch": e, "train_loss": 1 / e + s, "val_metric": 0.5 + 0.02 * e + s} for e in range(1, 6)]
        for s in (0.0, 0.1)
    ]
    histories = {
        "teacher": runs,
        "student-pkdot": [[{**r, "train_loss": r["train_loss"] * 2} for r in run] for run in runs],
    }
    path = plot_learning_curves(histories, tmp_path / "curves.png", metric="accuracy")
    assert _png_size(path)[0] > 600
    with pytest.raises(StageError):
        plot_learning_curves({}, tmp_path / "empty.png")


def test_structure_plot_and_embedding_map(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 8)
    teacher = rng.normal(size=(2, 12))[labels] * 3 + rng.normal(size=(16, 12))
    student = teacher @ rng.normal(size=(12, 5))
    path = plot_structure(
        teacher, student, tmp_path / "structure.png", labels=labels, student_name="student-pkdot", k=6
    )
    width, height = _png_size(path)
    assert width > 2 * height  # three panels side by side
    with pytest.raises(StageError, match="same samples"):
        plot_structure(teacher, student[:10], tmp_path / "bad.png")

    emb = plot_embedding_map(
        {"teacher": teacher, "student-pkdot": student}, labels, tmp_path / "emb.png", regression=False
    )
    _png_size(emb)
    reg = plot_embedding_map(
        {"teacher": teacher}, rng.uniform(-1, 1, 16), tmp_path / "emb_reg.png", regression=True
    )
    _png_size(reg)
    with pytest.raises(StageError, match="expected"):
        plot_embedding_map({"teacher": teacher[:5]}, labels, tmp_path / "bad_emb.png", regression=False)


def test_metric_bars(tmp_path):
    table = pd.DataFrame(
        {
            "model": ["teacher", "student-none", "student-pkdot"],
            "metric": "accuracy",
            "mean": [0.9, 0.6, 0.7],
            "ci_low": [0.85, 0.5, 0.65],
            "ci_high": [0.95, 0.7, 0.75],
            "n": 4,
        }
    )
    path = plot_metric_bars(table, tmp_path / "bars.png")
    _png_size(path)
    with pytest.raises(StageError, match="columns"):
        plot_metric_bars(table.drop(columns=["ci_low"]), tmp_path / "bad.png")


def test_transport_plan_pot_has_the_marginals_and_matches_points():
    from pkdot.evaluate.plots import transport_plan_pot

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1.5, size=(12, 6))
    perm = rng.permutation(12)
    y = x[perm] + rng.normal(0, 0.05, size=(12, 6))
    plan = transport_plan_pot(x, y, blur=0.1)
    assert plan.shape == (12, 12) and (plan >= 0).all()
    np.testing.assert_allclose(plan.sum(1), 1 / 12, atol=1e-6)
    np.testing.assert_allclose(plan.sum(0), 1 / 12, atol=1e-6)
    np.testing.assert_array_equal(plan.argmax(1), np.argsort(perm))  # each point onto its noisy copy
    with pytest.raises(StageError, match="clouds"):
        transport_plan_pot(x, y[:, :3])


def test_learning_curves_one_panel_row_per_family_and_distinct_colours(tmp_path):
    from pkdot.evaluate.plots import distinct_colors, model_family

    losses = ["none", "kd", "fitnet", "sp", "rkd", "pkt", "crd", "pkdot"]
    models = ["teacher", "unimodal-video", "unimodal-physio", *[f"student-{m}" for m in losses]]
    assert [model_family(m) for m in models[:4]] == [
        "Teacher",
        "Unimodal models",
        "Unimodal models",
        "Students",
    ]
    for n in (3, 11, 25):
        colors = distinct_colors(n)
        assert len(set(colors)) == n  # never a repeated colour
    histories = {
        m: [[{"epoch": e, "train_loss": 1 / e + i, "val_metric": 0.5 + 0.01 * i * e} for e in range(1, 6)]]
        for i, m in enumerate(models)
    }
    path = plot_learning_curves(histories, tmp_path / "curves.png", metric="accuracy")
    width, height = _png_size(path)
    assert height > 700  # three rows of panels
    only_students = plot_learning_curves(
        {m: histories[m] for m in models[3:]}, tmp_path / "students.png", metric="accuracy"
    )
    assert _png_size(only_students)[1] < height / 2


def test_learning_curves_log_axis_when_weighted_losses_span_orders_of_magnitude(tmp_path, monkeypatch):
    """PKT/SP's weighted totals (~100) next to CE-sized losses (~0.5): the students' loss panel is logarithmic,
    the teacher's (one model) stays linear."""
    import pkdot.evaluate.plots as plots

    figures = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), real_save(fig, path))[1])
    runs = lambda level: [[{"epoch": e, "train_loss": level / e, "val_metric": 0.6} for e in (1, 2, 3)]]  # noqa: E731
    histories = {"teacher": runs(0.7), "student-none": runs(0.6), "student-pkt": runs(130.0)}
    plots.plot_learning_curves(histories, tmp_path / "curves.png", metric="accuracy")
    (fig,) = figures
    scales = {
        ax.get_title().split(":")[0]: ax.get_yscale() for ax in fig.axes if "training loss" in ax.get_title()
    }
    assert scales == {"Teacher": "linear", "Students": "log"}
