r"""Fold/seed aggregation: per-run metrics, means with intervals corrected for repeated CV, paired comparisons.

A model trained once per (fold, seed) has :math:`J` test scores whose training sets overlap, so the plain
t interval :math:`s/\sqrt J` is too narrow: intervals and p-values use Nadeau and Bengio's corrected resampled t,
:math:`\bar x \pm t_{1-\alpha/2, J-1}\, s \sqrt{1/J + n_{test}/n_{train}}`. Each distillation loss is compared
with ``student-none`` paired by (fold, seed). Uncorrected numbers are kept as ``naive_*``. Reference: Nadeau &
Bengio, "Inference for the Generalization Error", Machine Learning 52, 2003."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import stats

from pkdot.data.manifest import read_manifest
from pkdot.errors import StageError
from pkdot.features.schema import read_sample_ids
from pkdot.folds import load_fold_plan
from pkdot.metrics import classification_metrics, regression_metrics
from pkdot.rundir import RunDir

logger = logging.getLogger(__name__)

#: Columns every ``predictions.parquet`` has (docs/interfaces.md).
PREDICTION_COLUMNS = "sample_id subject_id y_true y_pred scores embedding model fold seed split".split()
BASELINE_STUDENT = "student-none"

PAIRED_COLUMNS = (
    "model baseline metric mean_diff std_diff ci_low ci_high n p_value naive_ci_low naive_ci_high naive_p_value"
).split()


def primary_metric(regression: bool) -> str:
    """The metric models are ranked by: ``"ccc"`` for regression, ``"accuracy"`` for classification."""
    return "ccc" if regression else "accuracy"


def _finite_values(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise StageError(f"{what}: no values")
    if not np.all(np.isfinite(x)):
        raise StageError(f"{what}: values contain NaN or infinity ({x.tolist()})")
    return x


#: Name and one-line formula of the interval correction, as the report states it.
CORRECTION_NAME = "Nadeau-Bengio corrected resampled t"
CORRECTION_FORMULA = "CI = mean ± t(0.975, J-1) · s · sqrt(1/J + n_test/n_train), J = folds × seeds runs"


def _variance_factor(n: int, test_train_ratio: float | None) -> float:
    """``1/J`` (plain t) or ``1/J + n_test/n_train`` (Nadeau-Bengio) -- the factor on ``s^2``."""
    if test_train_ratio is None:
        return 1.0 / n
    if not (math.isfinite(test_train_ratio) and test_train_ratio >= 0.0):
        raise StageError(f"test_train_ratio must be a finite number >= 0, got {test_train_ratio}")
    return 1.0 / n + float(test_train_ratio)


def mean_ci(
    values: Sequence[float], level: float = 0.95, *, test_train_ratio: float | None = None
) -> tuple[float, float, float, float]:
    r"""Mean, std (ddof=1) and Student-t interval :math:`\bar x \mp t\, s \sqrt{c}`, :math:`c = 1/n` or
    Nadeau-Bengio's :math:`1/n + n_{test}/n_{train}` (``test_train_ratio``); ``(mean, mean)`` without spread."""
    if not 0.0 < level < 1.0:
        raise StageError(f"confidence level must be in (0, 1), got {level}")
    x = _finite_values(values, "mean_ci")
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    if std == 0.0:
        return mean, 0.0, mean, mean
    scale = std * math.sqrt(_variance_factor(x.size, test_train_ratio))
    low, high = stats.t.interval(level, df=x.size - 1, loc=mean, scale=scale)
    return mean, std, float(low), float(high)


def paired_difference(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, *, test_train_ratio: float | None = None
) -> dict[str, float]:
    r"""Paired comparison of two models scored on the same runs: on :math:`d = a - b`, ``mean_diff``,
    ``std_diff``, the :func:`mean_ci` interval, ``n`` and the two-sided t-test ``p_value`` (NaN with one run;
    0 or 1 when every difference is equal)."""
    x, y = _finite_values(a, "paired_difference(a)"), _finite_values(b, "paired_difference(b)")
    if x.shape != y.shape:
        raise StageError(
            f"paired_difference: a has {x.size} values and b has {y.size}; expected one pair per run"
        )
    d = x - y
    mean, std, low, high = mean_ci(d, level, test_train_ratio=test_train_ratio)
    n = int(d.size)
    if n == 1:
        p_value = float("nan")
    elif std <= 1e-12 * max(1.0, abs(mean)):  # equal differences (up to float rounding): t is infinite or 0/0
        p_value = 0.0 if abs(mean) > 1e-12 else 1.0
        low = high = mean
    elif test_train_ratio is None:
        p_value = float(stats.ttest_rel(x, y).pvalue)
    else:
        t_stat = mean / (std * math.sqrt(_variance_factor(n, test_train_ratio)))
        p_value = float(2.0 * stats.t.sf(abs(t_stat), df=n - 1))
    return {"mean_diff": mean, "std_diff": std, "ci_low": low, "ci_high": high, "n": n, "p_value": p_value}


#: The range of each bounded metric: its intervals are clipped to it (a t interval is symmetric and can leave it).
METRIC_RANGE = {"accuracy": (0.0, 1.0), "macro_f1": (0.0, 1.0), "ccc": (-1.0, 1.0), "pearson": (-1.0, 1.0)}
BOUNDS_SENTENCE = (
    "Intervals of accuracy and F1 are clipped to [0, 1], those of CCC to [-1, 1] (the metric's range; "
    "the t interval itself is symmetric and can leave it)."
)


def corrected_and_naive(
    a: Sequence[float],
    b: Sequence[float] | None,
    level: float,
    test_train_ratio: float | None,
    metric: str | None = None,
) -> dict[str, float]:
    """:func:`paired_difference` (``b`` given) or :func:`mean_ci` of ``a`` (clipped to :data:`METRIC_RANGE`),
    corrected, plus the uncorrected ``naive_*`` interval (and p-value)."""
    if b is None:
        mean, std, low, high = mean_ci(a, level, test_train_ratio=test_train_ratio)
        _, _, nlow, nhigh = mean_ci(a, level)
        lo, hi = METRIC_RANGE.get(metric or "", (-math.inf, math.inf))
        clipped = [min(max(v, lo), hi) for v in (low, high, nlow, nhigh)]
        names = ("ci_low", "ci_high", "naive_ci_low", "naive_ci_high")
        return {"mean": mean, "std": std, **dict(zip(names, clipped, strict=True))}
    naive = paired_difference(a, b, level)
    return paired_difference(a, b, level, test_train_ratio=test_train_ratio) | {
        f"naive_{k}": naive[k] for k in ("ci_low", "ci_high", "p_value")
    }


def fold_size_ratio(sizes: pd.DataFrame) -> float:
    r"""Mean over runs of :math:`n_{test}/n_{train}` (columns ``n_test``, ``n_train``); raises when a run has none."""
    if not (bad := sizes[~(sizes["n_train"] > 0)]).empty:
        r = bad.iloc[0]
        raise StageError(
            f"fold {r.get('fold')} seed {r.get('seed')}: {r['n_train']} training samples; cannot compute "
            "n_test/n_train for the corrected t interval"
        )
    return float((sizes["n_test"] / sizes["n_train"]).mean())


# ---- predictions -------------------------------------------------------------------------------------------
def _read_predictions(path: Path) -> pd.DataFrame:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise StageError(f"predictions file {path} is not a readable Parquet file: {exc}") from exc
    if missing := [c for c in PREDICTION_COLUMNS if c not in table.column_names]:
        raise StageError(
            f"predictions file {path}: missing columns {missing} (expected {list(PREDICTION_COLUMNS)})"
        )
    df = table.to_pandas()
    if bad_split := sorted(set(df["split"]) - {"test", "val"}):
        raise StageError(f"predictions file {path}: column split has {bad_split}; expected 'test' or 'val'")
    for col in ("y_true", "y_pred"):
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise StageError(
                f"predictions file {path}: column {col} has dtype {df[col].dtype}; expected float64"
            )
    df["source"] = str(path)
    return df


def collect_predictions(run_dir: Path) -> pd.DataFrame:
    """Every row of the run's ``predictions*.parquet`` files (under ``RUN/teacher/``, ``RUN/student/``) with a
    ``source`` column (checked: readable, with the columns, no (model, fold, seed, split, sample_id) twice)."""
    rd = RunDir(run_dir)
    roots = [root for root in (rd.teachers, rd.students) if root.is_dir()]
    files = sorted(p for r in roots for p in r.rglob("predictions*.parquet") if not p.name.startswith("."))
    if not files:
        raise StageError(
            f"no predictions under {run_dir}: expected {rd.teachers}/fold-<k>/seed-<s>/predictions.parquet and "
            f"{rd.students}/<loss>/fold-<k>/seed-<s>/predictions.parquet "
            "(run the teacher and distill stages)"
        )
    pred = pd.concat([_read_predictions(p) for p in files], ignore_index=True)
    if (dup := pred.duplicated(["model", "fold", "seed", "split", "sample_id"], keep=False)).any():
        row = pred.loc[dup].iloc[0]
        sources = sorted(set(pred.loc[dup & (pred["model"] == row["model"]), "source"]))
        raise StageError(
            f"predictions of model {row['model']!r} fold {row['fold']} seed {row['seed']} split {row['split']} "
            f"list sample {row['sample_id']!r} more than once (files {sources})"
        )
    logger.info(
        "read %d prediction rows of %d models from %d files", len(pred), pred["model"].nunique(), len(files)
    )
    return pred


def fold_sizes(run_dir: Path, pred: pd.DataFrame, modalities: Sequence[str] = ()) -> pd.DataFrame | None:
    """Per (fold, seed) run: ``n_test``, ``n_val`` and ``n_train`` (manifest samples, with features of
    ``modalities``, of the other subjects -- of the other samples when ``splits.json`` holds folds over samples,
    ``train.folds: clips``), for the corrected interval; None without ``manifest.parquet``."""
    rd = RunDir(run_dir)
    if not rd.manifest.is_file():
        return None
    manifest = read_manifest(rd.manifest)
    for m in modalities:
        if (path := rd.feature_table(m)).is_file():
            manifest = manifest[manifest["sample_id"].isin(set(read_sample_ids(path)))]
    # the folds' unit: subjects, or samples under train.folds: clips (every subject is then in some test part)
    unit = "subject_id"
    if rd.splits.is_file():
        plan = load_fold_plan(rd.splits)
        folds = list(plan.shared or ()) + [f for _, f in plan.pairs(plan.seeds)]
        if any(f.unit == "sample_id" for f in folds):
            unit = "sample_id"
    per_unit = manifest.groupby(manifest[unit].astype(str)).size()
    records = []
    for (fold, seed), g in pred.groupby(["fold", "seed"], sort=True):
        test, val = g[g["split"] == "test"], g[g["split"] == "val"]
        held_out = set(test[unit].astype(str)) | set(val[unit].astype(str))
        n_train = int(per_unit[~per_unit.index.isin(held_out)].sum())
        n_test, n_val = int(test["sample_id"].nunique()), int(val["sample_id"].nunique())
        records.append((int(fold), int(seed), n_test, n_val, n_train))
    return pd.DataFrame.from_records(records, columns=["fold", "seed", "n_test", "n_val", "n_train"])


def order_models(models: Sequence[str]) -> list[str]:
    """Report order: ``teacher``, ``unimodal-*``, ``student-none``, other students, anything else."""

    def rank(name: str) -> tuple[int, str]:
        starts = name.startswith
        groups = (name == "teacher", starts("unimodal-"), name == BASELINE_STUDENT, starts("student-"), True)
        return groups.index(True), name

    return sorted(set(models), key=rank)


# ---- aggregation -------------------------------------------------------------------------------------------
def per_fold_metrics(
    pred: pd.DataFrame, *, regression: bool, num_classes: int, split: str = "test"
) -> pd.DataFrame:
    """One row per (model, fold, seed): ``n_samples`` and the task metrics on that run's ``split`` rows."""
    rows = pred[pred["split"] == split]
    if rows.empty:
        raise StageError(f"no {split!r} predictions to evaluate (models: {sorted(set(pred['model']))})")
    records: list[dict[str, Any]] = []
    for (model, fold, seed), g in rows.groupby(["model", "fold", "seed"], sort=True):
        y, p = g["y_true"].to_numpy(np.float64), g["y_pred"].to_numpy(np.float64)
        try:
            m = regression_metrics(y, p) if regression else classification_metrics(y, p, num_classes)
        except StageError as exc:
            raise StageError(f"model {model!r} fold {fold} seed {seed} ({split} predictions): {exc}") from exc
        rec: dict[str, Any] = {"model": model, "fold": int(fold), "seed": int(seed), "n_samples": int(len(g))}
        rec.update({k: float(v) for k, v in m.items() if isinstance(v, int | float)})
        records.append(rec)
    metrics = ["ccc", "mae", "rmse", "pearson"] if regression else ["accuracy", "macro_f1"]
    per_fold = pd.DataFrame.from_records(records)[["model", "fold", "seed", "n_samples", *metrics]]
    order = {m: i for i, m in enumerate(order_models(per_fold["model"]))}
    return per_fold.sort_values(
        ["model", "fold", "seed"], key=lambda s: s.map(order) if s.name == "model" else s, ignore_index=True
    )


def summary_table(
    per_fold: pd.DataFrame, *, regression: bool, level: float = 0.95, test_train_ratio: float | None = None
) -> pd.DataFrame:
    """One row per model: the primary metric's mean, std, corrected and naive CI, n, ``val_mean``, and
    ``macro_f1_mean``/``_std`` (classification) or ``mae_mean``, ``rmse_mean`` (regression)."""
    metric = primary_metric(regression)
    records = []
    for model in order_models(per_fold["model"]):
        g = per_fold[per_fold["model"] == model]
        stats_ = corrected_and_naive(g[metric].to_numpy(), None, level, test_train_ratio, metric)
        rec: dict[str, Any] = {"model": model, "metric": metric, **stats_, "n": int(len(g))}
        rec["val_mean"] = float(g[f"val_{metric}"].mean()) if f"val_{metric}" in g else math.nan
        if regression:
            rec |= {"mae_mean": float(g["mae"].mean()), "rmse_mean": float(g["rmse"].mean())}
        else:
            rec["macro_f1_mean"] = float(g["macro_f1"].mean())
            rec["macro_f1_std"] = float(g["macro_f1"].std(ddof=1)) if len(g) > 1 else 0.0
        records.append(rec)
    return pd.DataFrame.from_records(records)


def paired_table(
    per_fold: pd.DataFrame,
    *,
    metric: str,
    models: Sequence[str],
    baseline: str,
    level: float = 0.95,
    test_train_ratio: float | None = None,
) -> pd.DataFrame:
    """Each of ``models`` minus ``baseline``, paired on the (fold, seed) runs both have (others left out with a
    warning; no run in common: ``n = 0``, NaN)."""
    base = per_fold[per_fold["model"] == baseline].set_index(["fold", "seed"])[metric]
    records = []
    for model in models:
        other = per_fold[per_fold["model"] == model].set_index(["fold", "seed"])[metric]
        common = base.index.intersection(other.index).sort_values()
        if len(common) < max(len(base), len(other)):
            logger.warning(
                "paired %s vs %s: %d runs in common (of %d and %d); the others are left out",
                *(model, baseline, len(common), len(other), len(base)),
            )
        if len(common) == 0:
            rec: dict[str, Any] = {c: math.nan for c in PAIRED_COLUMNS[3:]} | {"n": 0}
        else:
            rec = corrected_and_naive(
                other.loc[common].to_numpy(), base.loc[common].to_numpy(), level, test_train_ratio
            )
        records.append({"model": model, "baseline": baseline, "metric": metric, **rec})
    return pd.DataFrame.from_records(records, columns=PAIRED_COLUMNS)


def aggregate(
    pred: pd.DataFrame,
    *,
    regression: bool,
    num_classes: int,
    level: float = 0.95,
    test_train_ratio: float | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-run test metrics (plus ``val_<metric>``), the summary per model and each student loss against
    ``student-none`` (empty without it)."""
    per_fold = per_fold_metrics(pred, regression=regression, num_classes=num_classes)
    metric = primary_metric(regression)
    if (pred["split"] == "val").any():  # each run's validation score, for selection (never the test score)
        val = per_fold_metrics(pred, regression=regression, num_classes=num_classes, split="val")
        val = val[["model", "fold", "seed", metric]].rename(columns={metric: f"val_{metric}"})
        per_fold = per_fold.merge(val, on=["model", "fold", "seed"], how="left")
    else:
        per_fold[f"val_{metric}"] = math.nan
    interval = {"level": level, "test_train_ratio": test_train_ratio}
    table = summary_table(per_fold, regression=regression, **interval)
    students = [m for m in order_models(per_fold["model"]) if m.startswith("student-")]
    students = [m for m in students if m != BASELINE_STUDENT]
    paired = pd.DataFrame(columns=PAIRED_COLUMNS)
    if BASELINE_STUDENT in set(per_fold["model"]):
        paired = paired_table(per_fold, metric=metric, models=students, baseline=BASELINE_STUDENT, **interval)
    elif students:
        logger.warning(
            "no %s predictions: the distillation losses are not compared with it", BASELINE_STUDENT
        )
    return per_fold, table, paired


# ---- selection ---------------------------------------------------------------------------------------------
SELECTION_RULE = (
    "the student with the highest mean validation {metric} over the (fold, seed) runs (validation subjects "
    "only; test scores play no part), ties going to the simpler model (`none` first, then the order of "
    "`distill.losses`)"
)


@dataclass(frozen=True)
class Selection:
    """The student to ship, chosen on validation scores only (:func:`select_student`)."""

    model: str  # student-<loss>
    loss: str
    fold: int  # the (fold, seed) run of that loss with the best validation score
    seed: int
    metric: str
    val_mean: float

    @property
    def rule(self) -> str:
        return SELECTION_RULE.format(metric=self.metric)


def select_student(per_fold: pd.DataFrame, metric: str, losses: Sequence[str] = ()) -> Selection | None:
    """The student with the highest mean ``val_<metric>`` over its runs (:data:`SELECTION_RULE`), and its run
    with the best validation score; None when ``per_fold`` has no student."""
    students = per_fold[per_fold["model"].str.startswith("student-")]
    if students.empty:
        return None
    column = f"val_{metric}"
    means = students.groupby("model")[column].mean().dropna().round(12)
    if means.empty:
        raise StageError(
            f"no validation predictions of any student (split 'val'): the model to ship is chosen on "
            f"validation {metric}"
        )
    order = ["none", *[loss for loss in losses if loss != "none"]]
    rank = {f"student-{loss}": i for i, loss in enumerate(order)}
    best = max(means.index, key=lambda m: (means[m], -rank.get(m, len(order))))
    runs = students[students["model"] == best].sort_values(["fold", "seed"])
    run = runs.loc[runs[column].idxmax()]
    return Selection(
        best, best.removeprefix("student-"), int(run["fold"]), int(run["seed"]), metric, means[best]
    )
