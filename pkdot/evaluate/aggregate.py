r"""Fold/seed aggregation: per-run metrics, means with confidence intervals corrected for repeated CV, paired
comparisons.

Every model (``teacher``, ``unimodal-<modality>``, ``student-<loss>``) is trained once per (fold, seed), so a
model has :math:`J = \text{folds} \times \text{seeds}` test scores :math:`x_1..x_J` (one per run, computed
on that run's test subjects). The runs are *not* independent: their training sets overlap (repeated
subject k-fold), so the plain Student-t interval :math:`s/\sqrt J` is too narrow. Intervals and p-values use
Nadeau and Bengio's corrected resampled t statistic,

.. math:: \bar x \pm t_{1-\alpha/2,\,J-1}\, s\,\sqrt{\tfrac{1}{J} + \tfrac{n_{test}}{n_{train}}},
          \qquad s^2 = \frac{1}{J-1}\sum_j (x_j - \bar x)^2,

with :math:`n_{test}/n_{train}` the ratio of test to training samples of a run (mean over runs). Each
distillation loss is compared with the student trained without distillation (``student-none``) *paired by
(fold, seed)*: :math:`d_j = x^{\text{loss}}_j - x^{\text{none}}_j` get the same corrected interval and the
two-sided p-value of :math:`t = \bar d / (s_d \sqrt{1/J + n_{test}/n_{train}})` with :math:`J-1` degrees of
freedom (:mod:`scipy.stats`). The uncorrected numbers are kept next to them as ``naive_*`` (labelled so).

References
----------
C. Nadeau, Y. Bengio. "Inference for the Generalization Error." Machine Learning 52, 239-281, 2003.
R. Bouckaert, E. Frank. "Evaluating the Replicability of Significance Tests for Comparing Learning
Algorithms." PAKDD 2004 (the corrected repeated k-fold t-test).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import stats

from pkdot.errors import StageError
from pkdot.evaluate.metrics import classification_metrics, regression_metrics

logger = logging.getLogger(__name__)

#: Columns every ``predictions.parquet`` has (docs/interfaces.md).
PREDICTION_COLUMNS = (
    "sample_id",
    "subject_id",
    "y_true",
    "y_pred",
    "scores",
    "embedding",
    "model",
    "fold",
    "seed",
    "split",
)
BASELINE_STUDENT = "student-none"

PER_FOLD_COLUMNS_CLASSIFICATION = ["model", "fold", "seed", "n_samples", "accuracy", "macro_f1"]
PER_FOLD_COLUMNS_REGRESSION = ["model", "fold", "seed", "n_samples", "ccc", "mae", "rmse", "pearson"]
TABLE_COLUMNS = ["model", "metric", "mean", "std", "ci_low", "ci_high", "naive_ci_low", "naive_ci_high", "n"]
PAIRED_COLUMNS = [
    "model",
    "baseline",
    "metric",
    "mean_diff",
    "std_diff",
    "ci_low",
    "ci_high",
    "n",
    "p_value",
    "naive_ci_low",
    "naive_ci_high",
    "naive_p_value",
]


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


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise StageError(f"confidence level must be in (0, 1), got {level}")


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
    r"""Mean, standard deviation and a Student-t confidence interval of the mean.

    .. math:: \text{ci} = \bar x \mp t_{(1+\text{level})/2,\,n-1} \cdot s \cdot \sqrt{c},
              \quad s \text{ with ddof}=1,

    with :math:`c = 1/n` (plain t, ``test_train_ratio=None``) or :math:`c = 1/n + n_{test}/n_{train}`
    (Nadeau and Bengio's correction for runs with overlapping training sets). Computed with
    :func:`scipy.stats.t.interval`.

    Parameters
    ----------
    values : sequence of float, length n >= 1
        One score per run (fold x seed).
    level : float in (0, 1)
        Coverage of the interval (0.95 -> 95 %).
    test_train_ratio : float, optional
        :math:`n_{test}/n_{train}` of a run; None gives the uncorrected interval.

    Returns
    -------
    (mean, std, ci_low, ci_high)
        With ``n == 1`` the spread is unknown: ``std`` is reported as 0 and the interval collapses to
        ``(mean, mean)`` (a documented convention, not a claim of certainty).

    Raises
    ------
    StageError
        On an empty sequence, NaN/inf values, a level outside (0, 1) or a negative ratio.
    """
    _check_level(level)
    x = _finite_values(values, "mean_ci")
    mean = float(x.mean())
    if x.size == 1:
        return mean, 0.0, mean, mean
    std = float(x.std(ddof=1))
    if std == 0.0:
        return mean, 0.0, mean, mean
    scale = std * math.sqrt(_variance_factor(x.size, test_train_ratio))
    low, high = stats.t.interval(level, df=x.size - 1, loc=mean, scale=scale)
    return mean, std, float(low), float(high)


def paired_difference(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, *, test_train_ratio: float | None = None
) -> dict[str, float]:
    r"""Paired comparison of two models scored on the same runs (``a[i]`` and ``b[i]`` share fold and seed).

    Differences :math:`d_i = a_i - b_i`; returns ``mean_diff`` :math:`\bar d`, ``std_diff`` (ddof=1), the
    interval of :math:`\bar d` (:func:`mean_ci`, with the same ``test_train_ratio``), ``n`` and the
    two-sided ``p_value`` of :math:`t = \bar d / (s_d \sqrt{c})`, ``c`` as in :func:`mean_ci`, with
    ``n - 1`` degrees of freedom. Uncorrected (``test_train_ratio=None``) this is
    :func:`scipy.stats.ttest_rel`; corrected, :func:`scipy.stats.t.sf` of the corrected statistic.

    Conventions: with ``n == 1`` the p-value is NaN (no test is possible) and the interval is
    ``(d, d)``; when every difference is the same value (``s_d = 0``) the p-value is 0 if that value is
    non-zero and 1 if it is zero (equal up to a relative 1e-12; the limits of the t-test as the spread
    goes to 0).

    Raises
    ------
    StageError
        When the sequences differ in length, are empty or hold NaN/inf.
    """
    x = _finite_values(a, "paired_difference(a)")
    y = _finite_values(b, "paired_difference(b)")
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


def corrected_and_naive(
    a: Sequence[float], b: Sequence[float] | None, level: float, test_train_ratio: float | None
) -> dict[str, float]:
    """:func:`paired_difference` (``b`` given) or :func:`mean_ci` of ``a``, corrected, plus the uncorrected
    interval (and p-value) as ``naive_ci_low``, ``naive_ci_high`` (``naive_p_value``)."""
    if b is None:
        mean, std, low, high = mean_ci(a, level, test_train_ratio=test_train_ratio)
        _, _, nlow, nhigh = mean_ci(a, level)
        return {
            "mean": mean,
            "std": std,
            "ci_low": low,
            "ci_high": high,
            "naive_ci_low": nlow,
            "naive_ci_high": nhigh,
        }
    rec = paired_difference(a, b, level, test_train_ratio=test_train_ratio)
    naive = paired_difference(a, b, level)
    rec.update(
        {
            "naive_ci_low": naive["ci_low"],
            "naive_ci_high": naive["ci_high"],
            "naive_p_value": naive["p_value"],
        }
    )
    return rec


def fold_size_ratio(sizes: pd.DataFrame) -> float:
    r"""Mean over runs of :math:`n_{test}/n_{train}` from a frame with columns ``n_test`` and ``n_train``.

    Raises
    ------
    StageError
        When the frame is empty or a run has no training samples.
    """
    if sizes.empty or not {"n_test", "n_train"} <= set(sizes.columns):
        raise StageError("fold_size_ratio: expected one row per run with columns n_test and n_train")
    bad = sizes[~(sizes["n_train"] > 0)]
    if not bad.empty:
        r = bad.iloc[0]
        raise StageError(
            f"fold {r.get('fold')} seed {r.get('seed')}: {r['n_train']} training samples; cannot compute "
            "n_test/n_train for the corrected t interval"
        )
    return float((sizes["n_test"] / sizes["n_train"]).mean())


# ---- predictions -------------------------------------------------------------------------------------------
def prediction_files(run_dir: Path) -> list[Path]:
    """Every ``predictions*.parquet`` under ``RUN/teacher/`` and ``RUN/student/`` (sorted)."""
    run_dir = Path(run_dir)
    files: list[Path] = []
    for stage in ("teacher", "student"):
        root = run_dir / stage
        if root.is_dir():
            files += [p for p in root.rglob("predictions*.parquet") if not p.name.startswith(".")]
    return sorted(files)


def _read_predictions(path: Path) -> pd.DataFrame:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise StageError(f"predictions file {path} is not a readable Parquet file: {exc}") from exc
    missing = [c for c in PREDICTION_COLUMNS if c not in table.column_names]
    if missing:
        raise StageError(
            f"predictions file {path}: missing columns {missing} (expected {list(PREDICTION_COLUMNS)})"
        )
    df = table.to_pandas()
    bad_split = sorted(set(df["split"]) - {"test", "val"})
    if bad_split:
        raise StageError(f"predictions file {path}: column split has {bad_split}; expected 'test' or 'val'")
    for col in ("y_true", "y_pred"):
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise StageError(
                f"predictions file {path}: column {col} has dtype {df[col].dtype}; expected float64"
            )
    df["source"] = str(path)
    return df


def collect_predictions(run_dir: Path) -> pd.DataFrame:
    """All rows of every predictions file of a run (teacher, unimodal and student models).

    Reads ``RUN/teacher/fold-k/seed-s/predictions*.parquet`` and ``RUN/student/<loss>/fold-k/seed-s/
    predictions.parquet`` (docs/interfaces.md), adds a ``source`` column (the file), and checks that no
    (model, fold, seed, split, sample_id) appears twice.

    Raises
    ------
    StageError
        When the run has no predictions, a file is unreadable or lacks columns, or rows are duplicated.
    """
    run_dir = Path(run_dir)
    files = prediction_files(run_dir)
    if not files:
        teacher_files = run_dir / "teacher" / "fold-<k>" / "seed-<s>" / "predictions.parquet"
        student_files = run_dir / "student" / "<loss>" / "fold-<k>" / "seed-<s>" / "predictions.parquet"
        raise StageError(
            f"no predictions under {run_dir}: expected {teacher_files} and {student_files} "
            "(run the teacher and distill stages)"
        )
    pred = pd.concat([_read_predictions(p) for p in files], ignore_index=True)
    key = ["model", "fold", "seed", "split", "sample_id"]
    dup = pred.duplicated(key, keep=False)
    if dup.any():
        row = pred.loc[dup].iloc[0]
        sources = sorted(set(pred.loc[dup & (pred["model"] == row["model"]), "source"]))
        raise StageError(
            f"predictions of model {row['model']!r} fold {row['fold']} seed {row['seed']} "
            f"split {row['split']} "
            f"list sample {row['sample_id']!r} more than once (files {sources})"
        )
    logger.info(
        "read %d prediction rows of %d models from %d files", len(pred), pred["model"].nunique(), len(files)
    )
    return pred


def fold_sizes(run_dir: Path, pred: pd.DataFrame, modalities: Sequence[str] = ()) -> pd.DataFrame | None:
    """Test and training set sizes of every (fold, seed) run, for the corrected t interval.

    ``n_test`` = distinct test samples of the run (its prediction rows); ``n_train`` = samples of the run's
    *training* subjects, i.e. every subject of ``RUN/manifest.parquet`` that is neither a test nor a
    validation subject of that run (subject-independent folds: k-fold, LOSO and the official partition
    all train on the rest), counting only samples that have features for every one of ``modalities`` (the
    rows training saw). Works with folds that differ between seeds.

    Returns
    -------
    DataFrame or None
        Columns ``fold``, ``seed``, ``n_test``, ``n_val``, ``n_train``; None when the run has no manifest
        (the caller then states its fallback).
    """
    from pkdot.data.manifest import read_manifest
    from pkdot.features.schema import feature_path, read_sample_ids

    manifest_path = Path(run_dir) / "manifest.parquet"
    if not manifest_path.is_file():
        return None
    manifest = read_manifest(manifest_path)
    for m in modalities:
        path = feature_path(run_dir, m)
        if path.is_file():
            manifest = manifest[manifest["sample_id"].isin(set(read_sample_ids(path)))]
    per_subject = manifest.groupby(manifest["subject_id"].astype(str)).size()
    records = []
    for (fold, seed), g in pred.groupby(["fold", "seed"], sort=True):
        test = g[g["split"] == "test"]
        val = g[g["split"] == "val"]
        held_out = set(test["subject_id"].astype(str)) | set(val["subject_id"].astype(str))
        n_train = int(per_subject[~per_subject.index.isin(held_out)].sum())
        records.append(
            {
                "fold": int(fold),
                "seed": int(seed),
                "n_test": int(test["sample_id"].nunique()),
                "n_val": int(val["sample_id"].nunique()),
                "n_train": n_train,
            }
        )
    return pd.DataFrame.from_records(records, columns=["fold", "seed", "n_test", "n_val", "n_train"])


def order_models(models: Sequence[str]) -> list[str]:
    """Report order: ``teacher``, ``unimodal-*``, ``student-none``, other students, anything else."""

    def rank(name: str) -> tuple[int, str]:
        if name == "teacher":
            return 0, name
        if name.startswith("unimodal-"):
            return 1, name
        if name == BASELINE_STUDENT:
            return 2, name
        if name.startswith("student-"):
            return 3, name
        return 4, name

    return sorted(set(models), key=rank)


# ---- aggregation -------------------------------------------------------------------------------------------
def per_fold_metrics(
    pred: pd.DataFrame, *, regression: bool, num_classes: int, split: str = "test"
) -> pd.DataFrame:
    """One row per (model, fold, seed): the task metrics on that run's ``split`` rows.

    Classification: ``accuracy``, ``macro_f1`` (``y_true``/``y_pred`` are class indices in
    ``0..num_classes-1``); regression: ``ccc``, ``mae``, ``rmse``, ``pearson``. Also ``n_samples``.
    """
    rows = pred[pred["split"] == split]
    if rows.empty:
        raise StageError(f"no {split!r} predictions to evaluate (models: {sorted(set(pred['model']))})")
    records: list[dict[str, Any]] = []
    for (model, fold, seed), g in rows.groupby(["model", "fold", "seed"], sort=True):
        y_true, y_pred = g["y_true"].to_numpy(np.float64), g["y_pred"].to_numpy(np.float64)
        try:
            if regression:
                m = regression_metrics(y_true, y_pred)
            else:
                m = classification_metrics(y_true, y_pred, num_classes)
        except StageError as exc:
            raise StageError(f"model {model!r} fold {fold} seed {seed} ({split} predictions): {exc}") from exc
        rec: dict[str, Any] = {"model": model, "fold": int(fold), "seed": int(seed), "n_samples": int(len(g))}
        rec.update({k: float(v) for k, v in m.items() if isinstance(v, int | float)})
        records.append(rec)
    columns = PER_FOLD_COLUMNS_REGRESSION if regression else PER_FOLD_COLUMNS_CLASSIFICATION
    per_fold = pd.DataFrame.from_records(records)[columns]
    order = {m: i for i, m in enumerate(order_models(per_fold["model"]))}
    return per_fold.sort_values(
        ["model", "fold", "seed"], key=lambda s: s.map(order) if s.name == "model" else s, ignore_index=True
    )


def summary_table(
    per_fold: pd.DataFrame, *, regression: bool, level: float = 0.95, test_train_ratio: float | None = None
) -> pd.DataFrame:
    """One row per model: the primary metric's mean, std, CI (corrected with ``test_train_ratio``, see
    :func:`mean_ci`), the uncorrected CI (``naive_ci_*``) and n (runs); classification adds ``macro_f1_mean``
    and ``macro_f1_std``, regression ``mae_mean`` and ``rmse_mean``."""
    metric = primary_metric(regression)
    records = []
    for model in order_models(per_fold["model"]):
        g = per_fold[per_fold["model"] == model]
        stats_ = corrected_and_naive(g[metric].to_numpy(), None, level, test_train_ratio)
        rec: dict[str, Any] = {"model": model, "metric": metric, **stats_, "n": int(len(g))}
        if regression:
            rec["mae_mean"] = float(g["mae"].mean())
            rec["rmse_mean"] = float(g["rmse"].mean())
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
    """Each of ``models`` minus ``baseline``, paired on (fold, seed) runs both have (:func:`paired_difference`,
    corrected with ``test_train_ratio``; the uncorrected interval and p-value as ``naive_*``).

    Runs present for only one side are left out (with a warning); a model sharing no run with the baseline
    gets ``n = 0`` and NaN statistics.
    """
    base = per_fold[per_fold["model"] == baseline].set_index(["fold", "seed"])[metric]
    records = []
    for model in models:
        other = per_fold[per_fold["model"] == model].set_index(["fold", "seed"])[metric]
        common = base.index.intersection(other.index).sort_values()
        if len(common) < max(len(base), len(other)):
            logger.warning(
                "paired %s vs %s: %d runs in common (of %d and %d); the others are left out",
                model,
                baseline,
                len(common),
                len(other),
                len(base),
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
    """Test-split metrics per run, their summary per model, and each student loss against ``student-none``.

    Parameters
    ----------
    pred : DataFrame
        Rows of ``predictions.parquet`` files (:func:`collect_predictions`); only ``split == "test"`` is used.
    regression : bool
        CCC (regression) or accuracy/macro-F1 (classification).
    num_classes : int
        Number of classes (checks the label range; ignored for regression).
    level : float
        Confidence level of the intervals.
    test_train_ratio : float, optional
        :math:`n_{test}/n_{train}` of a run (:func:`fold_size_ratio`) for Nadeau and Bengio's correction;
        None gives uncorrected intervals (then the ``naive_*`` columns equal the others).

    Returns
    -------
    per_fold : DataFrame
        model, fold, seed, n_samples and the metrics (:func:`per_fold_metrics`).
    table : DataFrame
        One row per model (:func:`summary_table`).
    paired : DataFrame
        One row per ``student-<loss>`` other than ``student-none`` (:func:`paired_table`); empty (with its
        columns) when the run has no ``student-none``.
    """
    missing = [c for c in ("model", "fold", "seed", "split", "y_true", "y_pred") if c not in pred.columns]
    if missing:
        raise StageError(f"aggregate: predictions lack columns {missing}")
    per_fold = per_fold_metrics(pred, regression=regression, num_classes=num_classes)
    table = summary_table(per_fold, regression=regression, level=level, test_train_ratio=test_train_ratio)
    students = [
        m for m in order_models(per_fold["model"]) if m.startswith("student-") and m != BASELINE_STUDENT
    ]
    if BASELINE_STUDENT in set(per_fold["model"]):
        paired = paired_table(
            per_fold,
            metric=primary_metric(regression),
            models=students,
            baseline=BASELINE_STUDENT,
            level=level,
            test_train_ratio=test_train_ratio,
        )
    else:
        if students:
            logger.warning(
                "no %s predictions: the distillation losses are not compared with it", BASELINE_STUDENT
            )
        paired = pd.DataFrame(columns=PAIRED_COLUMNS)
    return per_fold, table, paired
