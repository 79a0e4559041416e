"""pkdot.evaluate.aggregate: intervals, paired differences, per-run metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats
from sklearn.metrics import f1_score

from pkdot.errors import StageError
from pkdot.evaluate.aggregate import aggregate, collect_predictions, mean_ci, order_models, paired_difference


def test_mean_ci_matches_student_t_by_hand():
    values = [0.61, 0.70, 0.66, 0.58, 0.73]
    mean, std, low, high = mean_ci(values, level=0.95)
    n = len(values)
    x_bar = sum(values) / n
    s = math.sqrt(sum((v - x_bar) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    assert mean == pytest.approx(x_bar)
    assert std == pytest.approx(s)
    assert (low, high) == pytest.approx((x_bar - half, x_bar + half))
    # a 90 % interval is narrower than the 95 % one and still centred on the mean
    _, _, low90, high90 = mean_ci(values, level=0.90)
    assert low < low90 < mean < high90 < high
    assert (low90 + high90) / 2 == pytest.approx(mean)


def test_mean_ci_shrinks_with_n_and_single_value_convention():
    rng = np.random.default_rng(0)
    population = rng.normal(0.7, 0.05, size=4000)
    widths = []
    for n in (3, 10, 100, 1000):
        _, _, low, high = mean_ci(population[:n])
        widths.append(high - low)
    assert all(a > b for a, b in zip(widths, widths[1:], strict=False))
    assert mean_ci([0.42]) == (0.42, 0.0, 0.42, 0.42)
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0, 0.5, 0.5)


@pytest.mark.parametrize("bad", [[], [0.1, float("nan")], [float("inf"), 0.2]])
def test_mean_ci_rejects_bad_values(bad):
    with pytest.raises(StageError):
        mean_ci(bad)
    with pytest.raises(StageError, match="level"):
        mean_ci([0.1, 0.2], level=1.5)


def test_paired_difference_sign_ci_and_p_value():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 0.8, size=8)  # large between-run spread...
    gain = 0.03 + rng.normal(0, 0.005, size=8)  # ...small, consistent gain
    better = base + gain
    d = paired_difference(better, base)
    assert d["n"] == 8
    assert d["mean_diff"] == pytest.approx(gain.mean())
    assert 0 < d["ci_low"] < d["mean_diff"] < d["ci_high"]  # the CI excludes 0
    assert d["p_value"] == pytest.approx(stats.ttest_rel(better, base).pvalue)
    assert d["p_value"] < 0.001
    # pairing matters: an unpaired interval on the same numbers would include 0
    _, _, low_b, high_b = mean_ci(base)
    assert high_b - low_b > d["ci_high"] - d["ci_low"]
    flipped = paired_difference(base, better)
    assert flipped["mean_diff"] == pytest.approx(-d["mean_diff"])
    assert (flipped["ci_low"], flipped["ci_high"]) == pytest.approx((-d["ci_high"], -d["ci_low"]))
    # no difference on average: the CI includes 0 and the p-value is large
    noise = paired_difference(base + np.array([0.01, -0.01] * 4), base)
    assert noise["ci_low"] < 0 < noise["ci_high"] and noise["p_value"] > 0.5


def test_paired_difference_degenerate_cases():
    same = paired_difference([0.7, 0.8, 0.6], [0.6, 0.7, 0.5])  # every difference is exactly 0.1
    assert same["mean_diff"] == pytest.approx(0.1) and same["std_diff"] == pytest.approx(0.0, abs=1e-12)
    assert same["p_value"] == 0.0
    assert paired_difference([0.7, 0.8], [0.7, 0.8])["p_value"] == 1.0
    one = paired_difference([0.7], [0.6])
    assert (
        one["n"] == 1 and math.isnan(one["p_value"]) and one["ci_low"] == one["ci_high"] == pytest.approx(0.1)
    )
    with pytest.raises(StageError, match="one pair per run"):
        paired_difference([0.1, 0.2], [0.1])


def _classification_rows(model, fold, seed, y_true, y_pred, split="test"):
    n = len(y_true)
    return pd.DataFrame(
        {
            "sample_id": [f"s{i}" for i in range(n)],
            "subject_id": [f"p{i % 3}" for i in range(n)],
            "y_true": np.asarray(y_true, float),
            "y_pred": np.asarray(y_pred, float),
            "scores": [[0.5, 0.5]] * n,
            "embedding": [[0.0, 1.0]] * n,
            "model": model,
            "fold": fold,
            "seed": seed,
            "split": split,
        }
    )


def test_aggregate_classification_per_fold_metrics():
    y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 2])
    runs = {
        ("student-none", 0, 0): np.array([0, 1, 1, 1, 2, 0, 0, 1, 2, 2]),
        ("student-none", 1, 0): np.array([0, 0, 0, 1, 2, 1, 1, 1, 0, 2]),
        ("student-pkdot", 0, 0): np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0]),
        ("student-pkdot", 1, 0): np.array([0, 0, 1, 1, 2, 0, 0, 1, 2, 2]),
        ("teacher", 0, 0): y.copy(),
        ("teacher", 1, 0): y.copy(),
    }
    frames = [_classification_rows(m, f, s, y, p) for (m, f, s), p in runs.items()]
    # validation rows must be ignored: they are all wrong here
    frames.append(_classification_rows("student-pkdot", 0, 0, y, (y + 1) % 3, split="val"))
    per_fold, table, paired = aggregate(pd.concat(frames), regression=False, num_classes=3)

    assert list(table["model"]) == ["teacher", "student-none", "student-pkdot"]
    for (m, f, s), p in runs.items():
        row = per_fold[(per_fold["model"] == m) & (per_fold["fold"] == f) & (per_fold["seed"] == s)].iloc[0]
        assert row["accuracy"] == pytest.approx(np.mean(p == y))
        assert row["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
        assert row["n_samples"] == 10
    pk = table.set_index("model").loc["student-pkdot"]
    assert pk["n"] == 2 and pk["metric"] == "accuracy" and pk["mean"] == pytest.approx((0.9 + 0.9) / 2)
    assert pk["macro_f1_mean"] == pytest.approx(
        np.mean([f1_score(y, runs[("student-pkdot", f, 0)], average="macro") for f in (0, 1)])
    )
    teacher = table.set_index("model").loc["teacher"]
    assert teacher["mean"] == 1.0 and teacher["std"] == 0.0
    assert list(paired["model"]) == ["student-pkdot"] and paired.iloc[0]["baseline"] == "student-none"
    assert paired.iloc[0]["mean_diff"] == pytest.approx(((0.9 - 0.8) + (0.9 - 0.6)) / 2)


def test_aggregate_regression_ccc_per_fold():
    rng = np.random.default_rng(3)
    frames, truth = [], {}
    for model, noise in (("student-none", 0.5), ("student-rkd", 0.2)):
        for fold in (0, 1, 2):
            y = rng.uniform(-1, 1, size=30)
            p = y + rng.normal(0, noise, size=30)
            df = _classification_rows(model, fold, 7, y, p)
            df["scores"] = [[float(v)] for v in p]
            frames.append(df)
            cov = np.mean((y - y.mean()) * (p - p.mean()))
            truth[(model, fold)] = 2 * cov / (y.var() + p.var() + (y.mean() - p.mean()) ** 2)
    per_fold, table, paired = aggregate(pd.concat(frames), regression=True, num_classes=1)
    assert set(per_fold.columns) >= {"ccc", "rmse", "pearson"}
    for (model, fold), expected in truth.items():
        got = per_fold[(per_fold["model"] == model) & (per_fold["fold"] == fold)]["ccc"].item()
        assert got == pytest.approx(expected)
    assert (table["metric"] == "ccc").all()
    rkd = paired.set_index("model").loc["student-rkd"]
    assert rkd["n"] == 3
    assert rkd["mean_diff"] == pytest.approx(
        np.mean([truth[("student-rkd", f)] - truth[("student-none", f)] for f in range(3)])
    )


def test_aggregate_pairs_only_common_runs_and_handles_missing_baseline():
    y = np.array([0, 1, 0, 1])
    frames = [
        _classification_rows("student-none", 0, 0, y, y),
        _classification_rows("student-kd", 0, 0, y, 1 - y),
        _classification_rows("student-kd", 1, 0, y, y),
    ]
    _, _, paired = aggregate(pd.concat(frames), regression=False, num_classes=2)
    assert paired.iloc[0]["n"] == 1 and paired.iloc[0]["mean_diff"] == pytest.approx(-1.0)
    _, table, paired = aggregate(pd.concat(frames[1:]), regression=False, num_classes=2)
    assert paired.empty and list(paired.columns)[:2] == ["model", "baseline"]
    with pytest.raises(StageError, match="outside"):
        aggregate(_classification_rows("teacher", 0, 0, y, y + 5), regression=False, num_classes=2)


def test_order_models():
    assert order_models(
        ["student-pkdot", "x", "unimodal-video", "student-none", "teacher", "student-kd"]
    ) == ["teacher", "unimodal-video", "student-none", "student-kd", "student-pkdot", "x"]


def test_collect_predictions_reads_files_and_rejects_bad_ones(tmp_path):
    y = np.array([0, 1, 1])
    a = _classification_rows("teacher", 0, 0, y, y)
    b = _classification_rows("student-none", 0, 0, y, y)
    (tmp_path / "teacher/fold-0/seed-0").mkdir(parents=True)
    (tmp_path / "student/none/fold-0/seed-0").mkdir(parents=True)
    a.to_parquet(tmp_path / "teacher/fold-0/seed-0/predictions.parquet")
    b.to_parquet(tmp_path / "student/none/fold-0/seed-0/predictions.parquet")
    pred = collect_predictions(tmp_path)
    assert len(pred) == 6 and set(pred["model"]) == {"teacher", "student-none"}

    b.to_parquet(tmp_path / "student/none/fold-0/seed-0/predictions-copy.parquet")
    with pytest.raises(StageError, match="more than once"):
        collect_predictions(tmp_path)
    (tmp_path / "student/none/fold-0/seed-0/predictions-copy.parquet").unlink()

    pq.write_table(
        pa.table({"sample_id": ["x"]}), tmp_path / "student/none/fold-0/seed-0/predictions-bad.parquet"
    )
    with pytest.raises(StageError, match="missing columns"):
        collect_predictions(tmp_path)
    with pytest.raises(StageError, match="no predictions"):
        collect_predictions(tmp_path / "empty")


def test_nadeau_bengio_corrected_interval_by_hand_and_wider_than_naive():
    from pkdot.evaluate.aggregate import fold_size_ratio

    # 3 folds x 2 seeds of paired differences; each run trains on 40 samples and tests on 10
    d = [0.02, 0.05, -0.01, 0.04, 0.03, 0.00]
    sizes = pd.DataFrame({"fold": [0, 1, 2] * 2, "seed": [0] * 3 + [1] * 3, "n_test": 10, "n_train": 40})
    ratio = fold_size_ratio(sizes)
    assert ratio == 0.25
    zeros = [0.0] * 6
    corrected = paired_difference(d, zeros, test_train_ratio=ratio)
    naive = paired_difference(d, zeros)
    # by hand: mean 0.021667, s = 0.023166, se = s * sqrt(1/6 + 10/40), t_{0.975, 5} = 2.5706
    assert corrected["mean_diff"] == pytest.approx(0.0216667, abs=1e-6)
    assert corrected["ci_low"] == pytest.approx(-0.0167729, abs=1e-6)
    assert corrected["ci_high"] == pytest.approx(0.0601062, abs=1e-6)
    assert corrected["p_value"] == pytest.approx(0.207034, abs=1e-5)
    # the naive interval excludes 0 here; the corrected one, rightly, does not
    assert naive["ci_low"] == pytest.approx(-0.0026446, abs=1e-6)
    assert corrected["ci_low"] < naive["ci_low"] and corrected["ci_high"] > naive["ci_high"]
    assert corrected["p_value"] > naive["p_value"]
    _, _, low, high = mean_ci(d, test_train_ratio=ratio)
    assert (low, high) == pytest.approx((corrected["ci_low"], corrected["ci_high"]))
    with pytest.raises(StageError, match="training samples"):
        fold_size_ratio(sizes.assign(n_train=0))
    with pytest.raises(StageError, match="test_train_ratio"):
        mean_ci(d, test_train_ratio=-1.0)


def test_aggregate_reports_corrected_and_naive_columns():
    rng = np.random.default_rng(3)
    y = np.tile([0, 1], 10)
    frames = []
    for fold in range(3):
        for seed in range(2):
            for model, p_correct in (("student-none", 0.6), ("student-pkdot", 0.7)):
                pred = np.where(rng.random(20) < p_correct, y, 1 - y)
                frames.append(_classification_rows(model, fold, seed, y, pred))
    pred = pd.concat(frames, ignore_index=True)
    _, table, paired = aggregate(pred, regression=False, num_classes=2, test_train_ratio=0.5)
    _, table_naive, paired_naive = aggregate(pred, regression=False, num_classes=2)
    for t in (table, paired):
        assert ((t["ci_high"] - t["ci_low"]) > (t["naive_ci_high"] - t["naive_ci_low"])).all()
    np.testing.assert_allclose(table["naive_ci_low"], table_naive["ci_low"])
    np.testing.assert_allclose(paired["naive_p_value"], paired_naive["p_value"])
    assert (paired["p_value"] > paired["naive_p_value"]).all()
