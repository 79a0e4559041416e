"""Task metrics: properties, and agreement with scikit-learn / direct formulas."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import f1_score

from pkdot.errors import StageError
from pkdot.metrics import (
    accuracy,
    ccc,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    pearson,
    regression_metrics,
    rmse,
)


def test_accuracy():
    assert accuracy(np.array([0, 1, 2, 1]), np.array([0, 1, 1, 1])) == 0.75
    # float-coded class indices, as stored in predictions.parquet
    assert accuracy(np.array([0.0, 1.0]), np.array([0.0, 0.0])) == 0.5
    with pytest.raises(StageError, match="integer class indices"):
        accuracy(np.array([0.5, 1.0]), np.array([0.0, 1.0]))
    with pytest.raises(StageError, match="equal length"):
        accuracy(np.array([0, 1]), np.array([0]))
    with pytest.raises(StageError, match="no samples"):
        accuracy(np.array([]), np.array([]))


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn_on_present_labels(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.choice([0, 2, 3], size=40)  # class 1 and 4 never occur in y_true
    y_pred = rng.choice([0, 2, 4], size=40)  # class 4 occurs only in the predictions
    present = np.union1d(y_true, y_pred)
    expected = f1_score(y_true, y_pred, average="macro", labels=present)
    assert macro_f1(y_true, y_pred, num_classes=5) == pytest.approx(expected)
    assert macro_f1(y_true, y_pred) == pytest.approx(expected)


def test_macro_f1_properties():
    y = np.array([0, 1, 1, 2, 2, 2])
    assert macro_f1(y, y) == 1.0
    assert macro_f1(y, (y + 1) % 3) == 0.0
    with pytest.raises(StageError, match=r"outside 0\.\.1"):
        macro_f1(y, y, num_classes=2)


def test_confusion_matrix():
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.shape == (4, 4) and cm.dtype == np.int64
    np.testing.assert_array_equal(cm, sk_confusion_matrix(y_true, y_pred, labels=[0, 1, 2, 3]))
    assert cm.sum() == 6 and cm[2, 0] == 1  # row = true class, column = predicted
    with pytest.raises(StageError, match="outside"):
        confusion_matrix(y_true, y_pred, 2)


def _ccc_direct(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x) / n
    vy = sum((b - my) ** 2 for b in y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / n
    return 2 * cov / (vx + vy + (mx - my) ** 2)


@pytest.mark.parametrize("seed", range(3))
def test_ccc_matches_the_formula(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, 50)
    y = 0.6 * x + rng.normal(0, 0.3, 50) + 0.1
    assert ccc(x, y) == pytest.approx(_ccc_direct(x, y))
    assert ccc(x, y) == pytest.approx(ccc(y, x))


def test_ccc_properties():
    x = np.sin(np.linspace(0, 6, 100))
    assert ccc(x, x) == pytest.approx(1.0)
    assert ccc(x, x + 0.3) < 1.0  # a shifted copy: perfectly correlated, not concordant
    assert ccc(x, 2 * x) < 1.0  # a scaled copy
    centred = x - x.mean()
    assert ccc(centred, -centred) == pytest.approx(-1.0)
    assert pearson(x, x + 0.3) == pytest.approx(1.0)


def test_ccc_constant_inputs():
    x = np.linspace(-1, 1, 20)
    assert ccc(np.full(20, 0.2), np.full(20, -0.4)) == 0.0  # both constant, means differ
    assert ccc(x, np.zeros(20)) == 0.0  # one constant
    assert ccc(np.full(20, 0.1), np.full(20, 0.1)) == 1.0  # identical constants agree exactly
    assert pearson(x, np.zeros(20)) == 0.0
    with pytest.raises(StageError, match="NaN"):
        ccc(np.array([0.1, np.nan]), np.array([0.1, 0.2]))


def test_rmse_and_pearson():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    assert rmse(x, x) == 0.0
    assert rmse(x, x + 0.5) == pytest.approx(0.5)
    y = np.array([0.1, 0.9, 2.2, 2.8])
    assert pearson(x, y) == pytest.approx(float(np.corrcoef(x, y)[0, 1]))


def test_metric_dicts():
    c = classification_metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), 2)
    assert set(c) == {"accuracy", "macro_f1", "confusion_matrix"}
    assert c["accuracy"] == 0.75 and c["confusion_matrix"] == [[2, 0], [1, 1]]
    r = regression_metrics(np.array([0.1, 0.5, -0.2]), np.array([0.0, 0.4, -0.1]))
    assert set(r) == {"ccc", "mae", "rmse", "pearson"} and all(isinstance(v, float) for v in r.values())


def test_mae_and_many_classes():
    from pkdot.metrics import mae

    x = np.array([0.0, 1.0, 2.0, 3.0])
    assert mae(x, x + np.array([0.5, -0.5, 1.0, 0.0])) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 12, size=200)  # a 12-class table: nothing assumes 5 classes
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 12, size=200))
    c = classification_metrics(y, p, 12)
    assert np.array(c["confusion_matrix"]).shape == (12, 12)
    assert c["accuracy"] == pytest.approx(float(np.mean(y == p)))
