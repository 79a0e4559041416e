"""Task metrics on numpy arrays: scikit-learn and scipy, plus Lin's CCC (no library has it; Lin, Biometrics 45,
1989). Classification inputs are class indices (integers, or floats holding integers), regression inputs real
values; inputs are checked first and a :class:`~pkdot.errors.StageError` names the metric."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from pkdot.errors import StageError

log = logging.getLogger(__name__)


def _pair(y_true: Any, y_pred: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(y_true), np.asarray(y_pred)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise StageError(
            f"{what}: expected two 1-D arrays of equal length, got shapes {a.shape} and {b.shape}"
        )
    if a.size == 0:
        raise StageError(f"{what}: no samples")
    return a, b


def _class_pair(
    y_true: Any, y_pred: Any, what: str, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    a, b = _pair(y_true, y_pred, what)
    for name, v in (("y_true", a), ("y_pred", b)):
        kind = v.dtype.kind
        if kind not in "iub" and not (kind == "f" and np.all(np.isfinite(v) & (v == np.round(v)))):
            raise StageError(
                f"{what}: {name} must hold integer class indices, got dtype {v.dtype} with non-integer values"
            )
    a, b = a.astype(np.int64), b.astype(np.int64)
    if num_classes is not None:
        for name, v in (("y_true", a), ("y_pred", b)):
            if v.min() < 0 or v.max() >= num_classes:
                raise StageError(f"{what}: {name} has class indices outside 0..{num_classes - 1}")
    elif min(a.min(), b.min()) < 0:
        raise StageError(f"{what}: class indices must be >= 0")
    return a, b


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of samples whose predicted class equals the true class."""
    return float(skm.accuracy_score(*_class_pair(y_true, y_pred, "accuracy", None)))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 counts; entry ``[i, j]`` = samples of true class ``i`` predicted ``j``."""
    if num_classes < 1:
        raise StageError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
    pair = _class_pair(y_true, y_pred, "confusion_matrix", num_classes)
    return skm.confusion_matrix(*pair, labels=np.arange(num_classes)).astype(np.int64)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred`` (classes absent from
    both count as nothing); ``num_classes`` only checks the range."""
    a, b = _class_pair(y_true, y_pred, "macro_f1", num_classes)
    return float(skm.f1_score(a, b, average="macro", labels=np.union1d(a, b), zero_division=0.0))


def _real_pair(x: Any, y: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _pair(x, y, what)
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise StageError(f"{what}: inputs contain NaN or infinite values")
    return a, b


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    r"""Lin's concordance correlation coefficient
    :math:`\rho_c = 2\sigma_{xy} / (\sigma_x^2 + \sigma_y^2 + (\mu_x - \mu_y)^2)` (``ddof=0`` moments), in
    [-1, 1]: 0.0 when one series is constant, 1.0 for two equal constants (0/0: they agree exactly)."""
    a, b = _real_pair(x, y, "ccc")
    constant_a, constant_b = np.ptp(a) == 0.0, np.ptp(b) == 0.0  # exact test (a mean is not exact)
    if constant_a or constant_b:
        return 1.0 if constant_a and constant_b and a[0] == b[0] else 0.0
    mean_a, mean_b = a.mean(), b.mean()
    cov = np.mean((a - mean_a) * (b - mean_b))
    return float(2.0 * cov / (a.var() + b.var() + (mean_a - mean_b) ** 2))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's correlation (:func:`scipy.stats.pearsonr`); 0.0 when either series is constant (undefined)."""
    a, b = _real_pair(x, y, "pearson")
    if np.ptp(a) == 0.0 or np.ptp(b) == 0.0 or a.size < 2:
        log.debug("pearson: a constant series has no correlation; returning 0.0")
        return 0.0
    return float(np.clip(stats.pearsonr(a, b).statistic, -1.0, 1.0))


def rmse(x: np.ndarray, y: np.ndarray) -> float:
    """Root mean squared error ``sqrt(mean((x - y)^2))``."""
    return float(skm.root_mean_squared_error(*_real_pair(x, y, "rmse")))


def mae(x: np.ndarray, y: np.ndarray) -> float:
    """Mean absolute error ``mean(|x - y|)``."""
    return float(skm.mean_absolute_error(*_real_pair(x, y, "mae")))


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """``{"accuracy": float, "macro_f1": float, "confusion_matrix": list[list[int]]}`` (JSON-ready)."""
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, num_classes),
        "confusion_matrix": confusion_matrix(y_true, y_pred, num_classes).tolist(),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """``{"ccc": float, "mae": float, "rmse": float, "pearson": float}``."""
    return {metric.__name__: metric(y_true, y_pred) for metric in (ccc, mae, rmse, pearson)}
