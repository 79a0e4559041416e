"""Report figures (matplotlib, Agg backend, PNG). Each function writes one file and returns its path.

- :func:`plot_confusion_matrices`: per model, summed over folds and seeds (classification only).
- :func:`plot_learning_curves`: train loss and validation metric per epoch, per model (mean over runs).
- :func:`plot_structure`: for one batch of test samples, the teacher's and the student's shifted
  cosine-similarity matrices and PKDOT's entropic transport plan between their anchored clouds.
- :func:`plot_embedding_map`: 2-D PCA of teacher and student test embeddings, coloured by label.
- :func:`plot_metric_bars`: the summary table's means with their confidence intervals.

Files are written to a temporary name in the target directory and renamed (no partial PNG).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from pkdot.errors import StageError  # noqa: E402
from pkdot.evaluate.metrics import confusion_matrix  # noqa: E402

logger = logging.getLogger(__name__)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    tmp.replace(path)
    return path


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return (n + cols - 1) // cols, cols


def plot_confusion_matrices(
    pred: pd.DataFrame,
    num_classes: int,
    path: Path,
    class_names: Sequence[str] | None = None,
    models: Sequence[str] | None = None,
) -> Path:
    """One confusion matrix per model (test rows, counts summed over folds and seeds), row-normalised colours.

    Parameters
    ----------
    pred : DataFrame
        Prediction rows (``model``, ``split``, ``y_true``, ``y_pred`` as class indices).
    num_classes : int
    path : Path
        The PNG to write.
    class_names : sequence of str, optional
        Tick labels (default ``0..C-1``).
    models : sequence of str, optional
        Models and their order (default: every model with test rows).
    """
    test = pred[pred["split"] == "test"]
    models = list(models) if models is not None else sorted(set(test["model"]))
    if not models:
        raise StageError("plot_confusion_matrices: no test predictions")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise StageError(f"plot_confusion_matrices: {len(names)} class names for {num_classes} classes")
    rows, cols = _grid(len(models))
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(models) :]:
        ax.axis("off")
    for ax, model in zip(axes.flat, models, strict=False):
        g = test[test["model"] == model]
        counts = confusion_matrix(g["y_true"].to_numpy(), g["y_pred"].to_numpy(), num_classes)
        rate = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(rate, vmin=0.0, vmax=1.0, cmap="Blues")
        for i in range(num_classes):
            for j in range(num_classes):
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rate[i, j] > 0.5 else "black",
                )
        ax.set_title(model, fontsize=9)
        ax.set_xticks(range(num_classes), names, fontsize=7)
        ax.set_yticks(range(num_classes), names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.suptitle("Confusion matrices (test, summed over folds and seeds)", fontsize=10)
    return _save(fig, path)


def plot_learning_curves(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, float]]]], path: Path, metric: str = "val_metric"
) -> Path:
    """Train loss and validation metric per epoch, one line per model (mean over its runs, band = min..max).

    Parameters
    ----------
    histories : mapping model -> list of runs, each a list of epoch records
        Records are ``{"epoch": int, "train_loss": float, "val_metric": float, ...}`` (``history.json``).
    path : Path
    metric : str
        Name shown on the validation axis.
    """
    if not histories:
        raise StageError("plot_learning_curves: no histories")
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for model, runs in histories.items():
        for key, ax in (("train_loss", ax_loss), ("val_metric", ax_val)):
            by_epoch: dict[int, list[float]] = {}
            for run in runs:
                for rec in run:
                    value = rec.get(key)
                    if value is not None and np.isfinite(value):
                        by_epoch.setdefault(int(rec["epoch"]), []).append(float(value))
            if not by_epoch:
                continue
            epochs = np.array(sorted(by_epoch))
            values = [np.array(by_epoch[e]) for e in epochs]
            mean = np.array([v.mean() for v in values])
            (line,) = ax.plot(epochs, mean, marker=".", label=model)
            ax.fill_between(
                epochs,
                [v.min() for v in values],
                [v.max() for v in values],
                alpha=0.15,
                color=line.get_color(),
            )
    ax_loss.set(title="Training loss", xlabel="epoch", ylabel="train loss")
    ax_val.set(title=f"Validation {metric}", xlabel="epoch", ylabel=metric)
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    ax_val.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_structure(
    teacher_embedding: np.ndarray,
    student_embedding: np.ndarray,
    path: Path,
    *,
    labels: np.ndarray | None = None,
    student_name: str = "student",
    k: int | str = 30,
    anchors: str = "least",
    blur: float = 0.1,
    scaling: float = 0.5,
) -> Path:
    r"""Teacher vs student similarity structure of one batch, and PKDOT's transport plan between them.

    Panels: shifted cosine similarities :math:`\tilde S_t`, :math:`\tilde S_s` (B x B,
    :func:`pkdot.distill.pkdot.pkdot_structure`), and the entropic plan :math:`P \in \mathbb{R}^{B\times B}`
    (rows: student samples, columns: teacher samples; :func:`pkdot.distill.pkdot.structure_plan`) shown as
    :math:`B \cdot P` (1 on a row = all of that sample's mass). The caption gives the plan's mass on its
    diagonal (1 = every sample's student structure is matched with its own teacher structure).

    Parameters
    ----------
    teacher_embedding, student_embedding : array, shape (B, Dt) and (B, Ds)
        Rows are the same samples, in the same order (sort them by label for a readable block structure).
    labels : array, shape (B,), optional
        Marked along the axes.
    """
    from pkdot.distill.pkdot import pkdot_structure, structure_plan

    t = torch.as_tensor(np.asarray(teacher_embedding, dtype=np.float32))
    s = torch.as_tensor(np.asarray(student_embedding, dtype=np.float32))
    if t.dim() != 2 or s.dim() != 2 or t.shape[0] != s.shape[0]:
        raise StageError(
            f"plot_structure: expected (B, Dt) and (B, Ds) embeddings of the same samples, got "
            f"{tuple(t.shape)} and {tuple(s.shape)}"
        )
    with torch.no_grad():
        clouds = pkdot_structure(s, t, k=k, anchors=anchors)
        plan = structure_plan(s, t, k=k, anchors=anchors, blur=blur, scaling=scaling).numpy()
    batch = t.shape[0]
    diagonal_mass = float(np.trace(plan))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    panels = [
        (clouds.teacher_sim.numpy(), "teacher: cosine similarity (shifted)", "viridis"),
        (clouds.student_sim.numpy(), f"{student_name}: cosine similarity (shifted)", "viridis"),
        (plan * batch, f"OT plan x B (diagonal mass {diagonal_mass:.2f})", "magma"),
    ]
    for ax, (matrix, title, cmap) in zip(axes, panels, strict=True):
        im = ax.imshow(matrix, cmap=cmap)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
        if labels is not None:
            lab = np.asarray(labels)
            edges = np.flatnonzero(lab[1:] != lab[:-1]) + 0.5
            for e in edges:
                ax.axhline(e, color="white", lw=0.6)
                ax.axvline(e, color="white", lw=0.6)
    axes[2].set(xlabel="teacher sample", ylabel="student sample")
    fig.suptitle(
        f"Similarity structure of {batch} test samples (k={k}, anchors={anchors}, blur={blur})", fontsize=10
    )
    return _save(fig, path)


def plot_embedding_map(
    embeddings: Mapping[str, np.ndarray], labels: np.ndarray, path: Path, *, regression: bool, seed: int = 0
) -> Path:
    """2-D PCA (scikit-learn, fitted per model) of test embeddings, one panel per model, coloured by label.

    Parameters
    ----------
    embeddings : mapping name -> array (N, D)
        Same N samples (same order) for every model; dimensions may differ between models.
    labels : array (N,)
        Class indices (discrete colours) or regression targets (a colour scale).
    seed : int
        ``random_state`` of the PCA solver.
    """
    if not embeddings:
        raise StageError("plot_embedding_map: no embeddings")
    labels = np.asarray(labels)
    fig, axes = plt.subplots(
        1, len(embeddings), figsize=(4.8 * len(embeddings), 4.3), squeeze=False, layout="constrained"
    )
    for ax, (name, emb) in zip(axes.flat, embeddings.items(), strict=True):
        x = np.asarray(emb, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != labels.shape[0] or x.shape[0] < 2:
            raise StageError(
                f"plot_embedding_map: {name} embeddings have shape {x.shape}; expected "
                f"({labels.shape[0]}, D) with at least 2 samples"
            )
        n_comp = min(2, x.shape[1], x.shape[0])
        pca = PCA(n_components=n_comp, random_state=seed)
        xy = pca.fit_transform(x)
        if n_comp == 1:
            xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
        if regression:
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels.astype(float), cmap="coolwarm", s=14)
            fig.colorbar(sc, ax=ax, shrink=0.8)
        else:
            for c in np.unique(labels):
                mask = labels == c
                ax.scatter(xy[mask, 0], xy[mask, 1], s=14, label=f"class {int(c)}")
            ax.legend(fontsize=7, loc="best")
        explained = pca.explained_variance_ratio_.sum()
        ax.set_title(f"{name} (PCA, {explained:.0%} variance)", fontsize=9)
        ax.set(xlabel="PC 1", ylabel="PC 2")
    fig.suptitle("Test embeddings", fontsize=10)
    return _save(fig, path)


def plot_metric_bars(table: pd.DataFrame, path: Path) -> Path:
    """Bar per model of ``mean`` with an error bar from ``ci_low`` to ``ci_high`` (the summary table)."""
    needed = {"model", "metric", "mean", "ci_low", "ci_high", "n"}
    if table.empty or not needed <= set(table.columns):
        raise StageError(f"plot_metric_bars: expected a non-empty table with columns {sorted(needed)}")
    mean = table["mean"].to_numpy(float)
    err = np.vstack([mean - table["ci_low"].to_numpy(float), table["ci_high"].to_numpy(float) - mean])
    colors = [
        "tab:gray"
        if m == "teacher"
        else "tab:olive"
        if str(m).startswith("unimodal-")
        else "tab:red"
        if m == "student-pkdot"
        else "tab:blue"
        for m in table["model"]
    ]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(table) + 2), 4))
    x = np.arange(len(table))
    ax.bar(x, mean, yerr=err, capsize=4, color=colors)
    ax.set_xticks(x, table["model"], rotation=30, ha="right", fontsize=8)
    metric = str(table["metric"].iloc[0])
    ax.set_ylabel(f"test {metric} (mean, 95% CI)")
    ax.set_title(f"Test {metric} over folds x seeds (n = {int(table['n'].max())})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
