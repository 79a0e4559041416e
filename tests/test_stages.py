"""Stages 2-5 end to end on a tiny run (MLflow in SQLite), twice, one registry.

The training jobs run in this process (:func:`tests.train.conftest.jobs_in_process`); the same stages on Ray Train
are run by tests/test_console.py (``pkdot run``), tests/integration/servers/test_deployment.py (with the refit) and
tests/integration/test_two_node.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pkdot import pipeline
from pkdot.errors import StageError
from tests.train.conftest import jobs_in_process, make_tiny_run


def _pipeline(cfg):
    extract = pipeline.stage("extract")  # stage 1 stands in: features are written
    pipeline.base.mark_done(cfg, extract, "test", "features-v1", pipeline.base.StageOutput([]), 0.0)
    results = {}
    upstream = "features-v1"
    for name in ("train-teacher", "cache", "distill", "evaluate", "refit"):
        results[name] = pipeline.run_stage(name, cfg, upstream)
        upstream = results[name].fingerprint
    return results


def test_stages_register_the_better_student_as_champion(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    overrides = {"tracking": {"tracking_uri": uri}, "train": {"num_workers": 1, "jobs_per_run": 2}}
    first = make_tiny_run(tmp_path / "a", overrides=overrides)  # refit on every subject (the default)
    second = make_tiny_run(  # registers its best-validation fold model
        tmp_path / "b",
        seed=5,
        overrides=overrides | {"seed": 1, "train": {"num_workers": 1, "jobs_per_run": 2, "refit": False}},
    )
    ran = jobs_in_process(monkeypatch)
    res_a = _pipeline(first)
    res_b = _pipeline(second)
    # the first run refits (its teacher beside the fold teachers, its student in the refit stage), the second not
    assert ran == ["teacher", "student", "student", "teacher", "student"]
    assert (
        res_a["train-teacher"].details["refit_jobs"] == 1
        and res_b["train-teacher"].details["refit_jobs"] == 0
    )
    assert (Path(first.run_dir) / "refit" / "teacher" / "fold-0" / "seed-0" / "DONE.json").is_file()

    # files of every stage
    for cfg in (first, second):
        run = Path(cfg.run_dir)
        assert (run / "report" / "report.md").is_file()
        # robustness curves by default (the student watches video: evaluate.robustness null = on)
        assert (run / "report" / "robustness.png").is_file() and (run / "report" / "robustness.csv").is_file()
        assert "## Robustness" in (run / "report" / "report.md").read_text()
        assert len(list((run / "embeddings").glob("fold-*-seed-*.parquet"))) == 1
        for loss in ("none", "pkdot"):
            assert (run / "student" / loss / "fold-0" / "seed-0" / "student.pt").is_file()

    client = MlflowClient(tracking_uri=uri)
    name = "pkdot-student-biovid"
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    assert len(versions) == 2
    metric = res_a["refit"].details  # the refit registers; evaluate does not
    assert "model_version" not in res_a["evaluate"].details
    assert "model_version" in res_b["evaluate"].details and res_b["refit"].details["refit"].startswith("off")
    scores = {}
    for (
        v
    ) in versions.values():  # the metric the registry compares: the chosen loss's cross-validated estimate
        scores[str(v.version)] = float(v.tags["cv_accuracy"])
    champion = client.get_model_version_by_alias(name, "champion")
    champion_version = str(champion.version)
    challenger_versions = [v for v in versions if v != champion_version]
    assert metric["alias"] == "champion"  # the first registration is always the champion
    # the refit model: trained on every subject of the data set (a validation carve-out for epoch selection)
    manifest_subjects = {f"s{i}" for i in range(6)}
    refit_fold = json.loads((Path(first.run_dir) / "refit" / "splits.json").read_text())[0]
    assert set(refit_fold["train"]) | set(refit_fold["val"]) == manifest_subjects and refit_fold["refit"]
    loss = res_a["refit"].details["registered_loss"]
    assert (Path(first.run_dir) / "refit" / "student" / loss / "fold-0" / "seed-0" / "student.pt").is_file()
    refit_version = versions[res_a["refit"].details["model_version"]]
    assert refit_version.tags["pkdot.trained_on"].startswith("all 6 subjects (refit")
    assert (
        "Trained on" in refit_version.description
        and "Cross-validated test accuracy" in refit_version.description
    )
    from pkdot.predict import describe_model

    line = describe_model(f"models:/{name}/{refit_version.version}", tracking_uri=uri)
    assert f"(loss {loss}, input video)" in line and "trained on" in line
    if res_b["evaluate"].details["alias"] == "champion":
        assert champion_version == res_b["evaluate"].details["model_version"]
        assert scores[champion_version] > scores[challenger_versions[0]]
    else:
        assert res_b["evaluate"].details["alias"] == "challenger"
        assert champion_version == res_a["refit"].details["model_version"]
        challenger = client.get_model_version_by_alias(name, "challenger")
        assert str(challenger.version) == res_b["evaluate"].details["model_version"]
        assert scores[champion_version] >= scores[str(challenger.version)]

    # parent and nested runs, per-epoch metrics, artifacts (checkpoints, history, report)
    parent_id = json.loads((Path(first.run_dir) / "mlflow_parent.json").read_text())["run_id"]
    exp = client.get_experiment_by_name("pkdot")
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    names = {r.info.run_name for r in children}
    assert any(n.startswith("train-teacher") for n in names) and any(n.startswith("distill") for n in names)
    assert any(n.startswith("evaluate") for n in names)
    teacher_run = next(r for r in children if r.info.run_name.startswith("train-teacher"))
    history = client.get_metric_history(teacher_run.info.run_id, "teacher/val_metric")
    assert len(history) == first.train.epochs_teacher
    artifacts = {a.path for a in client.list_artifacts(teacher_run.info.run_id, "checkpoints")}
    assert {"checkpoints/teacher.pt", "checkpoints/tnet.pt"} <= artifacts
    eval_run = next(r for r in children if r.info.run_name.startswith("evaluate"))
    assert any(a.path == "report" for a in client.list_artifacts(eval_run.info.run_id))

    # every stage is idempotent: a second call does nothing
    again = pipeline.run_stage("distill", first, res_a["cache"].fingerprint)
    assert again.skipped and again.fingerprint == res_a["distill"].fingerprint


def test_a_stage_refuses_to_run_before_its_upstream(tmp_path):
    cfg = make_tiny_run(tmp_path / "run")
    with pytest.raises(StageError, match="extract"):
        pipeline.run_stage("train-teacher", cfg)
