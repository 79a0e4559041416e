"""pkdot diagnose (pkdot/evaluate/diagnose.py): the positive control and its coupling-0 control, a run
directory, a feature table, the verdict rule and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pkdot.cli import main
from pkdot.errors import DatasetError, StageError
from pkdot.evaluate import diagnose as dg
from tests.benchmarks.bench_loader import load_benchmark
from tests.train.conftest import make_tiny_run

control = load_benchmark("lupi_control")


def _control_views(coupling: float, subjects: int = 20, per_subject: int = 10) -> dg.Views:
    t = control.draw_relevant_table(subjects=subjects, per_subject=per_subject, coupling=coupling, seed=0)
    return dg.Views(t["observed"], t["relevant"], t["label"], np.asarray(t["subject_id"]))


@pytest.fixture(scope="module")
def positive() -> dg.Diagnosis:
    return dg.diagnose(_control_views(1.0), repeats=2)


@pytest.fixture(scope="module")
def negative() -> dg.Diagnosis:
    return dg.diagnose(_control_views(0.0), repeats=2)


def test_positive_control_can_help(positive):
    s = positive.summary()
    assert positive.verdict == "can help", positive.text()
    assert s["gain"]["ci_low"] > 0 and s["r2_beyond_label"]["mean"] > dg.MIN_TRANSFER_R2
    assert s["privileged"]["mean"] > s["student"]["mean"]
    assert len(positive.runs["student"]) == 10 and positive.subjects == 20


def test_coupling_zero_control_does_not_say_can_help(negative, positive):
    s = negative.summary()
    assert negative.verdict != "can help", negative.text()
    # the teacher still knows the task, but nothing beyond the label is readable from the student view
    assert s["privileged"]["mean"] > 0.9 and s["r2_beyond_label"]["mean"] < dg.MIN_TRANSFER_R2
    np.testing.assert_array_equal(negative.runs["student"], positive.runs["student"])  # same student view
    for name in dg.PROBES:
        assert all(0.0 <= v <= 1.0 for v in negative.runs[name])


@pytest.mark.parametrize(
    ("subjects", "gain", "r2", "verdict"),
    [
        (9, (0.05, 0.10), 0.5, "too few subjects to tell"),
        (20, (0.01, 0.10), 0.5, "can help"),
        (20, (-0.03, 0.015), 0.5, "unlikely to help"),
        (20, (-0.03, 0.08), 0.0, "unlikely to help"),
        (20, (-0.03, 0.08), 0.5, "too few subjects to tell"),
    ],
)
def test_verdict_rule(subjects, gain, r2, verdict):
    summary = {"gain": {"ci_low": gain[0], "ci_high": gain[1]}, "r2_beyond_label": {"mean": r2}}
    assert dg.decide(subjects, summary) == verdict


def test_soft_student_with_alpha_one_is_the_label_student():
    v = _control_views(1.0, subjects=6)
    out = dg.crossfit_outputs(v.privileged, v.target, np.arange(60) % 3)
    assert out.shape == (60, 2)
    soft = dg.fit_soft_student(v.student, v.target, out, alpha=1.0)
    np.testing.assert_array_equal(
        soft.predict(v.student), dg.fit_probe(v.student, v.target).predict(v.student)
    )
    with pytest.raises(StageError, match="miss a class"):
        dg.crossfit_outputs(
            v.privileged, (np.arange(60) >= 20).astype(int), (np.arange(60) >= 20).astype(int)
        )


def test_regression_target(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((120, 2))
    x = np.c_[z[:, :1] + 0.5 * rng.standard_normal((120, 1)), rng.standard_normal((120, 3))]
    result = dg.diagnose(dg.Views(x, z, z.sum(1), np.repeat(np.arange(12), 10), True), repeats=1)
    assert result.metric == "ccc" and result.verdict in (
        "can help",
        "unlikely to help",
        "too few subjects to tell",
    )
    assert result.summary()["privileged"]["mean"] > 0.9


def test_table_views_and_cli(tmp_path, capsys):
    path = control.write_relevant_table(tmp_path / "t.parquet", subjects=6, per_subject=8, coupling=1.0)
    views = dg.table_views(path)
    assert views.names == (["observed"], ["relevant"]) and views.student.shape == (48, control.DIMS)
    with pytest.raises(DatasetError, match="no column 'eeg'"):
        dg.table_views(path, privileged=["eeg"])
    with pytest.raises(StageError, match="at least 4 subjects"):
        dg.diagnose(
            dg.Views(views.student[:16], views.privileged[:16], views.target[:16], views.subject[:16])
        )
    code = main(["diagnose", "--table", str(path), "--repeats", "1", "--out", str(tmp_path / "d")])
    printed = capsys.readouterr().out
    assert code == 0 and printed.startswith("verdict: too few subjects to tell")  # 6 < MIN_SUBJECTS
    payload = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert payload["verdict"] == "too few subjects to tell" and set(payload["summary"]) >= {
        "gain",
        "headroom",
    }
    assert (tmp_path / "d" / "diagnose.png").stat().st_size > 0


def test_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    make_tiny_run(run, subjects=6, per_class=5)
    views = dg.run_views(run)
    assert views.names == (["video"], ["physio"]) and len(views.target) == 60
    assert views.student.shape[1] == dg.MAX_DIMS  # 16 x 16 mean grey frames -> PCA
    assert views.privileged.shape == (60, dg.MAX_DIMS)  # 3 x 9 x 12 spectrograms -> PCA
    assert main(["diagnose", "--run", str(run), "--repeats", "1"]) == 0
    assert capsys.readouterr().out.startswith("verdict: ")
    assert (run / "diagnose" / "diagnose.json").is_file() and (run / "diagnose" / "diagnose.png").is_file()


def test_synthetic_feature_table_agrees_with_the_benchmark(tmp_path):
    """The quality benchmark measured no gain on the synthetic Biovid feature table (README "Results")."""
    from pkdot.data.synthetic_features import write_feature_table

    path = write_feature_table(tmp_path / "f.parquet", subjects=30, per_class=10, coupling=1.0, seed=0)
    result = dg.diagnose(dg.table_views(path, ["face_au"], ["physio"]), repeats=1)
    assert result.verdict != "can help", result.text()
