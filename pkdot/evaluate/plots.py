"""Report figures (matplotlib, Agg backend, PNG); each function writes one file atomically and returns its path:
confusion matrices, learning curves, robustness curves, the teacher/student similarity structure with PKDOT's
transport plan, a PCA map of embeddings, and the summary table's means with their intervals."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from pkdot.errors import StageError  # noqa: E402
from pkdot.metrics import confusion_matrix  # noqa: E402
from pkdot.rundir import atomic_path  # noqa: E402

logger = logging.getLogger(__name__)


#: Students whose spread is drawn as a band when many models share a panel (the reference and PKDOT's):
#: eight overlapping bands are unreadable.
BANDED_STUDENTS = ("student-none", "student-pkdot")


def _save(fig: Figure, path: Path) -> Path:
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def plot_confusion_matrices(
    pred: pd.DataFrame, num_classes: int, path: Path, models: Sequence[str] | None = None
) -> Path:
    """One confusion matrix per model (test rows, counts summed over folds and seeds, row-normalised colours);
    ``models`` sets the models and their order."""
    test = pred[pred["split"] == "test"]
    models = list(models) if models is not None else sorted(set(test["model"]))
    if not models:
        raise StageError("plot_confusion_matrices: no test predictions")
    names = [str(i) for i in range(num_classes)]
    cols = min(len(models), 4)
    rows = -(-len(models) // cols)
    size = (3.2 * cols, 3.0 * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, layout="constrained")
    for ax in axes.flat[len(models) :]:
        ax.axis("off")
    for ax, model in zip(axes.flat, models, strict=False):
        g = test[test["model"] == model]
        counts = confusion_matrix(g["y_true"].to_numpy(), g["y_pred"].to_numpy(), num_classes)
        rate = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(rate, vmin=0.0, vmax=1.0, cmap="Blues")
        for (i, j), count in np.ndenumerate(counts):
            color = "white" if rate[i, j] > 0.5 else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=color)
        ax.set_title(model, fontsize=9)
        ax.set_xticks(range(num_classes), names, fontsize=7)
        ax.set_yticks(range(num_classes), names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    fig.suptitle("Confusion matrices (test, summed over folds and seeds)", fontsize=10)
    return _save(fig, path)


#: Learning-curve panels, in order: (title, test on the model name).
MODEL_FAMILIES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("Teacher", lambda m: m == "teacher" or m == "tnet"),
    ("Unimodal models", lambda m: m.startswith("unimodal-")),
    ("Students", lambda m: m.startswith("student-")),
)


def model_family(model: str) -> str:
    """The learning-curve panel of a model: ``Teacher``, ``Unimodal models``, ``Students`` or ``Other``."""
    return next((title for title, member in MODEL_FAMILIES if member(model)), "Other")


def distinct_colors(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` different colours: the 10 hues of ``tab10`` first, then tab20's 10 light variants, then
    ``tab20b`` and ``tab20c`` (60 in all)."""
    tab20 = plt.get_cmap("tab20")
    palette = [tab20(i) for i in range(0, 20, 2)] + [tab20(i) for i in range(1, 20, 2)]
    palette += [plt.get_cmap(name)(i) for name in ("tab20b", "tab20c") for i in range(20)]
    if n > len(palette):
        raise StageError(f"distinct_colors: {n} models, at most {len(palette)} distinct colours")
    return palette[:n]


def _mean_curve(runs: Sequence[Sequence[Mapping[str, float]]], key: str):
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for rec in run:
            if (value := rec.get(key)) is not None and np.isfinite(value):
                by_epoch.setdefault(int(rec["epoch"]), []).append(float(value))
    if not by_epoch:
        return None
    epochs = np.array(sorted(by_epoch))
    values = [np.array(by_epoch[e]) for e in epochs]
    return epochs, *(np.array([f(v) for v in values]) for f in (np.mean, np.min, np.max))


#: A training-loss panel whose curves span more than this factor is drawn on a log axis.
LOG_LOSS_SPAN = 20.0


def plot_learning_curves(
    histories: Mapping[str, Sequence[Sequence[Mapping[str, float]]]], path: Path, metric: str = "val_metric"
) -> Path:
    """Train loss and validation ``metric`` per epoch, one row of panels per model family: each model's mean over
    runs (band = min..max), a star at its best epoch. ``histories``: model -> runs -> epoch records."""
    if not histories:
        raise StageError("plot_learning_curves: no histories")
    families: dict[str, list[str]] = {}
    for model in histories:
        families.setdefault(model_family(model), []).append(model)
    # the most crowded panel gets the 10 strongest hues first; no colour is used twice in the figure
    by_size = [m for f in sorted(families, key=lambda f: -len(families[f])) for m in families[f]]
    colors = dict(zip(by_size, distinct_colors(len(by_size)), strict=True))
    order = [t for t, _ in MODEL_FAMILIES if t in families] + (["Other"] if "Other" in families else [])
    size = (12, 3.3 * len(order))
    fig, axes = plt.subplots(len(order), 2, figsize=size, squeeze=False, layout="constrained")
    for row, family in zip(axes, order, strict=True):
        ax_loss, ax_val = row
        loss_levels: list[float] = []
        for model in families[family]:
            color = colors[model]
            for key, ax in (("train_loss", ax_loss), ("val_metric", ax_val)):
                curve = _mean_curve(histories[model], key)
                if curve is None:
                    continue
                epochs, mean, low, high = curve
                if key == "train_loss":
                    loss_levels.extend(float(v) for v in mean if np.isfinite(v))
                label = model
                if key == "val_metric":
                    best = int(np.argmax(mean))
                    label = f"{model} (best {mean[best]:.3f} @ epoch {epochs[best]})"
                    ax.plot(epochs[best], mean[best], marker="*", ms=13, color=color, mec="k")
                ax.plot(epochs, mean, marker=".", color=color, label=label, lw=1.6)
                # eight students' bands overlap into one blur: in a family of more than 3 models only the
                # reference (student-none) and PKDOT's student keep their band
                crowded = len(families[family]) > 3 and model not in BANDED_STUDENTS
                if np.any(high > low) and not crowded:
                    ax.fill_between(epochs, low, high, alpha=0.12, color=color)
        ax_loss.set(title=f"{family}: training loss", xlabel="epoch", ylabel="train loss")
        # Weighted distillation totals differ by orders of magnitude (PKT/SP's weights are 3e4/3e3): on a
        # linear axis the largest flattens the others, so a panel spanning > 20x is drawn on a log axis.
        if loss_levels and min(loss_levels) > 0 and max(loss_levels) / min(loss_levels) > LOG_LOSS_SPAN:
            ax_loss.set_yscale("log")
            ax_loss.set_ylabel("train loss (log scale)")
        ax_val.set(title=f"{family}: validation {metric} (★ best epoch)", xlabel="epoch", ylabel=metric)
        for ax in row:
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_val.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(
        "Learning curves (mean over folds x seeds; band = min..max; students: bands for none and pkdot only)",
        fontsize=10,
    )
    return _save(fig, path)


def transport_plan_pot(
    student_cloud: np.ndarray, teacher_cloud: np.ndarray, *, blur: float = 0.1, max_iter: int = 10000
) -> np.ndarray:
    r"""Entropic OT plan ``(B, M)`` between uniform clouds ``(B, K)`` and ``(M, K)``, solved by POT's epsilon-scaling
    Sinkhorn: :math:`\arg\min_{P 1 = a, P^T 1 = b} \langle P, C\rangle - \varepsilon H(P)`,
    :math:`C_{ij} = \|x_i - y_j\|^2/2`, :math:`\varepsilon = \text{blur}^2` (PKDOT's plan)."""
    import ot

    x = np.asarray(student_cloud, dtype=np.float64)
    y = np.asarray(teacher_cloud, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise StageError(
            f"transport_plan_pot: expected clouds (B, K) and (M, K), got {x.shape} and {y.shape}"
        )
    if blur <= 0:
        raise StageError(f"transport_plan_pot: blur must be > 0, got {blur}")
    cost = ot.dist(x, y, metric="sqeuclidean") / 2.0
    a, b = ot.unif(x.shape[0]), ot.unif(y.shape[0])
    with warnings.catch_warnings():
        # the annealing's inner loops stop at 100 iterations per temperature and warn each time; what
        # matters is the final plan's marginals, checked below
        warnings.filterwarnings("ignore", message="Sinkhorn did not converge")
        plan = np.asarray(
            ot.sinkhorn(
                a, b, cost, reg=blur**2, method="sinkhorn_epsilon_scaling", numItermax=max_iter, stopThr=1e-9
            )
        )
    errors = [float(np.abs(plan.sum(axis=i) - m).max() / m.max()) for i, m in ((1, a), (0, b))]
    if max(errors) > 1e-3:
        logger.warning("transport_plan_pot: marginals off by %.1e (rows) / %.1e (columns)", *errors)
    return plan


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
) -> Path:
    r"""For one batch: the teacher's and the student's shifted cosine similarities and PKDOT's transport plan
    between their anchored clouds as :math:`B \cdot P`, with its diagonal mass; ``labels`` marked on the axes."""
    from pkdot.distill.pkdot import pkdot_structure

    t = torch.as_tensor(np.asarray(teacher_embedding, dtype=np.float32))
    s = torch.as_tensor(np.asarray(student_embedding, dtype=np.float32))
    if t.dim() != 2 or s.dim() != 2 or t.shape[0] != s.shape[0]:
        raise StageError(
            f"plot_structure: expected (B, Dt) and (B, Ds) embeddings of the same samples, got "
            f"{tuple(t.shape)} and {tuple(s.shape)}"
        )
    with torch.no_grad():
        clouds = pkdot_structure(s, t, k=k, anchors=anchors)
    plan = transport_plan_pot(clouds.student_cloud.numpy(), clouds.teacher_cloud.numpy(), blur=blur)
    batch = t.shape[0]
    diagonal_mass = float(np.trace(plan))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    panels = [
        (clouds.teacher_sim.numpy(), "teacher: cosine similarity (shifted)", "viridis"),
        (clouds.student_sim.numpy(), f"{student_name}: cosine similarity (shifted)", "viridis"),
        (plan * batch, f"OT plan x B (diagonal mass {diagonal_mass:.2f})", "magma"),
    ]
    lab = None if labels is None else np.asarray(labels)
    edges = [] if lab is None else np.flatnonzero(lab[1:] != lab[:-1]) + 0.5  # where the label changes
    for ax, (matrix, title, cmap) in zip(axes, panels, strict=True):
        im = ax.imshow(matrix, cmap=cmap)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
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
    """2-D PCA of test embeddings ``{name: (N, D)}`` of the same N samples, one panel per model, by label."""
    if not embeddings:
        raise StageError("plot_embedding_map: no embeddings")
    labels = np.asarray(labels)
    size = (4.8 * len(embeddings), 4.3)
    fig, axes = plt.subplots(1, len(embeddings), figsize=size, squeeze=False, layout="constrained")
    for ax, (name, emb) in zip(axes.flat, embeddings.items(), strict=True):
        x = np.asarray(emb, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] != labels.shape[0] or x.shape[0] < 2:
            raise StageError(
                f"plot_embedding_map: {name} embeddings have shape {x.shape}; expected "
                f"({labels.shape[0]}, D) with at least 2 samples"
            )
        pca = PCA(n_components=min(2, x.shape[1], x.shape[0]), random_state=seed)
        xy = pca.fit_transform(x)
        if xy.shape[1] == 1:
            xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
        if regression:
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels.astype(float), cmap="coolwarm", s=14)
            fig.colorbar(sc, ax=ax, shrink=0.8)
        else:
            for c in np.unique(labels):
                mask = labels == c
                ax.scatter(xy[mask, 0], xy[mask, 1], s=14, label=f"class {int(c)}")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(f"{name} (PCA, {pca.explained_variance_ratio_.sum():.0%} variance)", fontsize=9)
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
    family = {"teacher": "tab:gray", "unimodal": "tab:olive", "student-pkdot": "tab:red"}
    colors = [family.get(m, family.get(str(m).split("-")[0], "tab:blue")) for m in table["model"]]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(table) + 2), 4))
    x = np.arange(len(table))
    ax.bar(x, mean, yerr=err, capsize=4, color=colors)
    ax.set_xticks(x, table["model"], rotation=30, ha="right", fontsize=8)
    metric = str(table["metric"].iloc[0])
    ax.set_ylabel(f"test {metric} (mean, 95% CI)")
    ax.set_title(f"Test {metric} over folds x seeds (n = {int(table['n'].max())})", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_robustness(robustness: pd.DataFrame, path: Path, *, metric: str) -> Path:
    """Test ``metric`` against the perturbation level (``summarise_robustness`` rows): one panel per perturbation,
    one line per model, the corrected interval as a band."""
    needed = {"model", "perturbation", "level", "mean", "ci_low", "ci_high"}
    if robustness.empty or not needed <= set(robustness.columns):
        raise StageError(f"plot_robustness: expected a non-empty table with columns {sorted(needed)}")
    perturbations = list(dict.fromkeys(robustness["perturbation"]))
    models = list(dict.fromkeys(robustness["model"]))
    colors = dict(zip(models, distinct_colors(len(models)), strict=True))
    # Nine overlapping bands are unreadable: bands for the comparison that matters (the video model trained
    # alone, the student without distillation, PKDOT's student), lines only for the other students.
    banded = [m for m in models if m.startswith("unimodal-") or m in BANDED_STUDENTS]
    if len(models) <= 3 or not banded:
        banded = models
    units = dict(frame_drop="fraction of frames dropped", noise="noise std (0-255)", blur="blur sigma (px)")
    size = (4.6 * len(perturbations) + 1.5, 3.8)
    fig, axes = plt.subplots(1, len(perturbations), figsize=size, squeeze=False, layout="constrained")
    for ax, perturbation in zip(axes.flat, perturbations, strict=True):
        g = robustness[robustness["perturbation"] == perturbation]
        for model in models:
            gm = g[g["model"] == model].sort_values("level")
            if gm.empty:
                continue
            x, y = gm["level"].to_numpy(float), gm["mean"].to_numpy(float)
            band = model in banded
            marker, width, alpha = ("o", 2.0, 1.0) if band else (".", 1.0, 0.8)
            ax.plot(x, y, marker=marker, linewidth=width, alpha=alpha, color=colors[model], label=model)
            if band:
                low, high = gm["ci_low"].to_numpy(float), gm["ci_high"].to_numpy(float)
                ax.fill_between(x, low, high, alpha=0.15, color=colors[model])
        xlabel = units.get(perturbation, "level")
        ax.set(title=perturbation.replace("_", " "), xlabel=xlabel, ylabel=f"test {metric}")
        ax.grid(alpha=0.3)
    axes.flat[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    n = int(robustness["n"].max()) if "n" in robustness.columns else 0
    bands = "" if banded == models else f" (bands: {', '.join(banded)})"
    fig.suptitle(
        f"Robustness to degraded test video (mean and corrected 95% CI over {n} runs{bands})", fontsize=10
    )
    return _save(fig, path)
