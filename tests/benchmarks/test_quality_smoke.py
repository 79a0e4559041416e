"""Smoke tests of the benchmark scripts, so that they cannot rot.

``benchmarks/quality.py``: its core on a tiny configuration -- synthetic Biovid binary (5 subjects, 3-fold
subject k-fold, 1 seed, --quick sizes) in two grid cells (the base cell with every loss, and a ``scratch``
student on the base run's linked teachers; cross-fitting is tested in tests/train/test_crossfit.py), plus one PKDOT ablation variant on a
linked run directory; the checks are on the structure and internal consistency of the tables, not on the (meaningless at
this size) scores. ``benchmarks/speed.py``: its measurement helpers on the same tiny run, and its report.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from pkdot.config import load_config
from pkdot.errors import ConfigError, StageError
from tests.benchmarks.bench_loader import load_benchmark
from tests.train.conftest import jobs_in_process

quality = load_benchmark("quality")
speed = load_benchmark("speed")

#: The base cell's losses: the grid's plus one it does not train (sp), so the cells' loss lists differ; the
#: default (every loss) is checked by test_base_losses_option_trains_only_those_losses_in_the_base_cell.
BASE_LOSSES = (*quality.GRID_LOSSES, "sp")
EXPECTED_MODELS = {"teacher", "unimodal-video", "unimodal-physio"} | {
    f"student-{loss}" for loss in BASE_LOSSES
}


GRID_SCRATCH = ("scratch", "fit")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """The benchmark's tables are the subject here, not Ray Train: its jobs run in this process."""
    work = tmp_path_factory.mktemp("bench-quality")
    settings = quality.QualitySettings(
        tasks=("binary",),
        seeds=1,
        subjects=5,
        folds=2,  # (the smallest that still pairs runs; kept small: CI time)
        ablations=("k=5", "k=10"),
        quick=True,
        work_dir=work,
        cells=(GRID_SCRATCH,),
        base_losses=BASE_LOSSES,
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        ran = jobs_in_process(monkeypatch)
        report = quality.run_quality(settings)
    assert "teacher" in ran and "student" in ran
    return report


def test_task_table_has_every_model_and_the_paired_columns(tiny_report):
    assert tiny_report.failures == {}
    (result,) = tiny_report.tasks
    table = result.table
    assert set(table["model"]) == EXPECTED_MODELS
    assert table["model"].iloc[0] == "teacher"
    for col in (
        "mean",
        "ci_low",
        "ci_high",
        "n",
        "diff",
        "diff_ci_low",
        "diff_ci_high",
        "p_value",
        "n_pairs",
    ):
        assert col in table.columns
    # every fold of the protocol is evaluated: the benchmark lifts the demo preset's train.max_folds
    assert sorted(result.per_fold["fold"].unique()) == [0, 1]
    assert result.cfg.train.max_folds in (None, result.cfg.train.folds)
    assert (table["n"] == 2).all()
    assert (table["ci_low"] <= table["mean"] + 1e-12).all() and (
        table["mean"] <= table["ci_high"] + 1e-12
    ).all()
    none = table[table["model"] == "student-none"].iloc[0]
    assert math.isnan(none["diff"]) and none["n_pairs"] == 0
    others = table[table["model"] != "student-none"]
    assert (others["n_pairs"] == 2).all()
    assert (others["diff_ci_low"] <= others["diff"] + 1e-12).all()
    assert (others["diff"] <= others["diff_ci_high"] + 1e-12).all()
    # the paired difference is the mean of per-run differences to student-none
    pf = result.per_fold.set_index(["model", "fold", "seed"])["accuracy"]
    pkdot = table.set_index("model").loc["student-pkdot", "diff"]
    assert pkdot == pytest.approx((pf.loc["student-pkdot"] - pf.loc["student-none"]).mean())
    assert set(result.base.stage_seconds) == {"synthetic data", *quality.EARLIER_STAGES}
    # the table's intervals are the corrected ones (Nadeau-Bengio): wider than the naive t interval
    assert result.base.test_train_ratio > 0
    assert "naive_ci_low" in table.columns
    with_naive = table.dropna(subset=["ci_low", "naive_ci_low"])
    assert (
        (with_naive["ci_high"] - with_naive["ci_low"])
        >= (with_naive["naive_ci_high"] - with_naive["naive_ci_low"]) - 1e-12
    ).all()


def test_grid_cells_train_the_grid_losses_on_their_own_or_linked_teachers(tiny_report):
    (result,) = tiny_report.tasks
    assert set(result.runs) == {quality.BASE_CELL, GRID_SCRATCH}
    grid_models = {f"student-{loss}" for loss in quality.GRID_LOSSES}
    for cell in (GRID_SCRATCH,):
        run = result.runs[cell]
        assert grid_models <= set(run.per_fold["model"])
        assert "student-sp" not in set(run.per_fold["model"])
        assert run.cfg.train.student_init == cell[0] and run.cfg.distill.teacher_targets == cell[1]
        assert set(run.per_fold_val["model"]) >= grid_models  # validation scores exist for the selection
    base_dir = Path(result.base.cfg.run_dir)
    scratch_dir = Path(result.runs[GRID_SCRATCH].cfg.run_dir)
    assert (scratch_dir / "teacher").resolve() == (base_dir / "teacher").resolve()  # linked, not retrained
    # selection reads validation scores only: it is one of the cells run
    assert tiny_report.selected["binary"] in result.runs
    assert quality.select_cell(result) == tiny_report.selected["binary"]


def test_ablation_variant_shares_the_base_run_and_reproduces_its_none_student(tiny_report):
    df = tiny_report.ablations
    assert list(zip(df["factor"], df["setting"], df["base"], strict=True)) == [
        ("k", "5", False),
        ("k", "10", True),
    ]
    variant = Path(df.iloc[0]["run_dir"])
    base = Path(tiny_report.tasks[0].cfg.run_dir)
    for entry in ("teacher", "embeddings", "features", "splits.json", "manifest.parquet"):
        assert (variant / entry).is_symlink() and (variant / entry).resolve() == (base / entry).resolve()
    assert (variant / "stages" / "cache.json").is_symlink()
    assert not (variant / "stages" / "distill.json").is_symlink()
    assert not (variant / "student").is_symlink()
    assert sorted(p.name for p in (variant / "student").iterdir()) == ["none", "pkdot"]
    assert load_config(variant / "config.yaml").distill.pkdot.k == 5
    # k does not touch the no-distillation student: same teacher, cache and seed -> the same scores
    assert df.iloc[0]["none_vs_base"] == 0.0
    assert (df["n"] == 2).all()
    assert (df["diff_ci_low"] <= df["diff"] + 1e-12).all() and (
        df["diff"] <= df["diff_ci_high"] + 1e-12
    ).all()


def test_markdown_report_lists_every_row(tiny_report):
    machine = {
        "date": "d",
        "platform": "p",
        "processor": "x",
        "cpu_count": 2,
        "python": "3",
        "torch": "t",
        "torch_threads": 1,
        "accelerator": "none",
        "load_average": (0.0, 0.0, 0.0),
    }
    text = quality.report_markdown(tiny_report, machine, "python benchmarks/quality.py --quick")
    for model in EXPECTED_MODELS:
        assert f"| `{model}` |" in text
    assert "## binary" in text and "## PKDOT ablations" in text
    assert "### Grid: student initialisation x teacher targets" in text
    assert "`scratch/fit`" in text
    assert "Nadeau and Bengio" in text
    assert "| k | 5 |" in text and "| k | 10 (base run) |" in text
    # every table line has the same number of cells as its header
    for block in text.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count("|") for ln in lines}) == 1, block


def test_ablation_config_only_changes_the_distill_section(tmp_path):
    base = load_config(preset="demo", overrides={"run_dir": str(tmp_path / "base")})
    (tmp_path / "base").mkdir(parents=True, exist_ok=True)
    (tmp_path / "base" / "config.yaml").write_text(base.yaml_text())
    variant = quality.ablation_config(
        base, quality.Ablation("k", "all", {"distill.pkdot.k": "all"}), tmp_path / "v"
    )
    assert variant.distill.pkdot.k == "all" and variant.distill.losses == ["none", "pkdot"]
    assert variant.model == base.model and variant.train == base.train
    with pytest.raises(ConfigError, match="outside the distill section"):
        quality.ablation_config(
            base, quality.Ablation("epochs", "3", {"train.epochs_student": 3}), tmp_path / "w"
        )


def test_settings_reject_unknown_tasks_and_too_few_subjects(tmp_path):
    with pytest.raises(ConfigError, match="unknown task"):
        quality.QualitySettings(tasks=("pain",))
    with pytest.raises(ConfigError, match="--subjects"):
        quality.QualitySettings(subjects=5, folds=5)
    with pytest.raises(ConfigError, match="--ablations"):
        quality.QualitySettings(ablations=("k=7",))
    settings, out = quality.parse_args(["--quick", "--work-dir", str(tmp_path)])
    assert out == tmp_path / "quality.md"  # a quick run never overwrites benchmarks/results/quality.md
    assert settings.quick and settings.ablations == () and settings.grid
    settings, _ = quality.parse_args(["--quick", "--ablations", "--no-grid", "--work-dir", str(tmp_path)])
    assert settings.ablations == quality.QUICK_ABLATIONS and not settings.grid
    assert settings.tasks == quality.DEFAULT_TASKS and "control" in settings.tasks


def test_cells_option_names_grid_cells(capsys):
    settings, _ = quality.parse_args(["--cells", "scratch/fit", "teacher-finetune/crossfit"])
    assert settings.cells == (("scratch", "fit"), ("teacher-finetune", "crossfit")) and settings.grid
    assert quality.parse_args([])[0].cells is None  # every cell
    with pytest.raises(SystemExit):
        quality.parse_args(["--cells", "scratch/kd"])
    assert "unknown cell(s) ['scratch/kd']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality.parse_args(["--cells", "scratch/fit", "--no-grid"])
    assert "exclude each other" in capsys.readouterr().err


def test_base_losses_option_trains_only_those_losses_in_the_base_cell(tmp_path, monkeypatch):
    settings, _ = quality.parse_args(["--base-losses", "none", "kd", "pkdot", "--cells", "scratch/fit"])
    assert settings.base_losses == ("none", "kd", "pkdot")
    assert quality.parse_args([])[0].base_losses == quality.LOSSES
    with pytest.raises(ConfigError, match="including none and pkdot"):
        quality.parse_args(["--base-losses", "kd", "sp"])
    trained: dict = {}

    def full(spec, settings, data_roots, cell, losses):
        trained[cell] = tuple(losses)
        return cell

    def variant(base, cell, losses, work_dir, report_only):
        trained[cell] = tuple(losses)
        return cell

    monkeypatch.setattr(quality, "run_full", full)
    monkeypatch.setattr(quality, "run_variant", variant)
    quality.run_task(quality.TASKS["relevant"], settings, {})
    assert trained == {quality.BASE_CELL: ("none", "kd", "pkdot"), ("scratch", "fit"): quality.GRID_LOSSES}


def test_positive_control_tasks_read_their_own_tables():
    small, large = quality.TASKS["relevant"], quality.TASKS["relevant-large"]
    assert (small.table_size, small.data_seed) == ((20, 10), 0)
    assert (large.table_size, large.data_seed) == ((20, 30), 1)
    keys = {quality.data_key(quality.TASKS[n]) for n in ("relevant", "relevant-control", "relevant-large")}
    assert len(keys) == 3
    # a task's data key is its generating overrides only: the recipe does not make another data set
    assert quality.data_key(quality.TASKS["landmarks"]) == quality.data_key(
        quality.TASKS["landmarks-imitation"]
    )


def test_every_control_is_its_task_at_coupling_zero():
    """A negative control reads the same data set, task and views as the task it controls; only the coupling
    differs (1 there, 0 here); and every coupling-1 synthetic task has its control."""
    controls = {spec.control_of: spec for spec in quality.TASKS.values() if spec.control_of is not None}
    for source, control in controls.items():
        task = quality.TASKS[source]
        assert (
            control.dataset,
            control.task,
            control.privileged,
            control.student,
            control.data,
            control.table_size,
        ) == (
            task.dataset,
            task.task,
            task.privileged,
            task.student,
            task.data,
            task.table_size,
        ), control.name
        assert dict(task.overrides)["synth.coupling"] == 1.0
        assert dict(control.overrides)["synth.coupling"] == 0.0
        others = {k: v for k, v in task.overrides if k != "synth.coupling"}
        assert {k: v for k, v in control.overrides if k != "synth.coupling"} == others, control.name
    assert {"binary", "features", "landmarks", "valence", "arousal", "relevant"} <= set(controls)


def _table(diff: float, low: float, high: float) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": ["student-none", "student-pkdot", "student-kd"],
            "mean": [0.6, 0.6 + diff, 0.65],
            "diff": [math.nan, diff, 0.05],
            "diff_ci_low": [math.nan, low, 0.0],
            "diff_ci_high": [math.nan, high, 0.1],
            "p_value": [math.nan, 0.01, 0.5],
            "n_pairs": [0, 10, 10],
        }
    )


def test_verdict_reads_the_paired_interval():
    assert "**beats**" in quality.verdict(_table(0.05, 0.01, 0.09), "accuracy")
    assert "**worse**" in quality.verdict(_table(-0.05, -0.09, -0.01), "accuracy")
    text = quality.verdict(_table(0.01, -0.02, 0.04), "accuracy")
    assert "does **not** beat" in text and "ranks 2 of 3" in text


def test_link_upstream_refuses_missing_or_foreign_entries(tmp_path):
    common = sys.modules["common"]
    with pytest.raises(StageError, match="does not exist"):
        common.link_upstream(tmp_path / "empty-base", tmp_path / "sibling")
    base = tmp_path / "base"
    for entry in common.UPSTREAM_ENTRIES:
        (base / entry).mkdir(parents=True)
    (base / "stages").mkdir()
    for marker in common.UPSTREAM_STAGE_MARKERS:
        (base / "stages" / f"{marker}.json").write_text("{}")
    sibling = tmp_path / "sibling2"
    (sibling / "teacher").mkdir(parents=True)  # a real folder where a link should go
    with pytest.raises(StageError, match="is not a link"):
        common.link_upstream(base, sibling)
    links = common.link_upstream(base, tmp_path / "sibling3")
    assert all(p.is_symlink() for p in links)
    assert common.link_upstream(base, tmp_path / "sibling3") == links  # idempotent


def test_a_failing_task_is_reported_and_fails_the_command(tmp_path, monkeypatch):
    def broken(spec, settings, data_roots, cells=None):
        raise StageError(f"stage extract failed for {spec.name}")

    monkeypatch.setattr(quality, "run_task", broken)
    out = tmp_path / "q.md"
    argv = ["--tasks", "valence", "arousal", "--work-dir", str(tmp_path), "--out", str(out)]
    with pytest.raises(SystemExit, match="valence, arousal"):
        quality.main(argv)
    text = out.read_text()
    assert "## Failures" in text
    assert "stage extract failed for valence" in text and "stage extract failed for arousal" in text


# ---- benchmarks/speed.py ---------------------------------------------------------------------------------------
def test_speed_training_and_extraction_throughput_on_the_tiny_run(tiny_report):
    run_dir = Path(tiny_report.tasks[0].cfg.run_dir)
    rows = speed.training_throughput(run_dir, epochs=1)
    assert [r["model"] for r in rows] == ["unimodal-video", "unimodal-physio", "teacher (fusion)"]
    for r in rows:
        assert r["samples_per_epoch"] > 0 and r["epoch_s"] > 0
        assert r["samples_per_s"] == pytest.approx(r["samples_per_epoch"] / r["epoch_s"])
    ex = speed.extraction_throughput(run_dir)
    # samples with every modality extracted (a video whose face was never found is quarantined)
    assert 0 < ex["samples"] <= tiny_report.tasks[0].base.samples
    assert (
        ex["face_frames"]
        >= ex["samples"] * tiny_report.tasks[0].cfg.features.n_frames * ex["face_detection_rate"]
    )
    assert ex["face_frames"] <= tiny_report.tasks[0].base.samples * tiny_report.tasks[0].cfg.features.n_frames
    assert ex["face_frames_per_s_per_worker"] > 0 and ex["physio_windows_per_s_per_worker"] > 0


def test_speed_reads_the_cache_benchmark(tiny_report):
    res = speed.student_cache_throughput(Path(tiny_report.tasks[0].cfg.run_dir), epochs=1)
    assert res["loss"] == "pkdot" and res["samples"] > 0
    assert res["speedup"] == pytest.approx(res["live_epoch_s"] / res["cached_epoch_s"])


def test_speed_concurrency_times_the_jobs_in_process(tiny_report, tmp_path):
    """The concurrent-jobs section's in-process way (the Ray ways add Ray Train runs: ``--only jobs``)."""
    base = Path(tiny_report.tasks[0].cfg.run_dir)
    res = speed.child_concurrency(base, tmp_path, n_jobs=2, ways=(("local", None, 1),))
    per_job = res["ways"]["local"]["per_job_s"]
    assert len(per_job) == 2 and all(k.startswith("student/") and v > 0 for k, v in per_job.items())
    assert res["job_samples"] > 0 and res["epochs_student"] == tiny_report.tasks[0].cfg.train.epochs_student
    for key in per_job:  # each job trained for real, in its own sibling run directory
        assert (tmp_path / "concurrency-local" / key / "metrics.json").is_file()


def test_speed_ot_timings_agree_with_geomloss():
    (row,) = speed.ot_timings([16], repeats=1, pot_repeats=1, k=8)
    assert row["B"] == 16
    for name in ("ours", "geomloss", "pot-log", "pot-emp", "pkdot_loss"):
        assert row[f"{name}_ms"] > 0
    assert row["rel_diff_ours"] < 1e-4  # the same debiased Sinkhorn divergence as GeomLoss


def test_speed_report_tables_are_well_formed():
    stages = {s: 1.0 for s in speed.PIPELINE_STAGES}
    scaling = [
        {
            "subjects": n,
            "samples": 16 * n,
            "synthetic_s": 2.0 * n,
            "stages": stages,
            "total_s": 10.0 * n,
            "train_workers": 2,
            "folds": 5,
            "seeds": 1,
        }
        for n in (5, 10, 20)
    ]
    training = [
        {
            "model": "teacher (fusion)",
            "samples_per_epoch": 96,
            "epoch_s": 0.5,
            "samples_per_s": 192.0,
            "device": "cpu",
        }
    ]
    student = {
        "samples": 96,
        "batch": 32,
        "loss": "pkdot",
        "live_epoch_s": 1.0,
        "cached_epoch_s": 0.1,
        "live_samples_per_s": 96.0,
        "cached_samples_per_s": 960.0,
        "speedup": 10.0,
    }
    extraction = {
        "samples": 80,
        "workers": 2,
        "face_frames": 640,
        "face_frames_per_s_per_worker": 50.0,
        "physio_windows": 80,
        "physio_windows_per_s_per_worker": 100.0,
    }
    workers = {
        "subjects": 10,
        "1": {s: 10.0 for s in speed.RETRAIN_STAGES},
        "2": {s: 15.0 for s in speed.RETRAIN_STAGES},
    }
    ot = [
        {
            "B": 64,
            "ours_ms": 1.0,
            "geomloss_ms": 2.0,
            "pot-log_ms": 100.0,
            "pot-emp_ms": 90.0,
            "pkdot_loss_ms": 1.5,
            "ours_over_geomloss": 0.5,
            "rel_diff_ours": 0.0,
            "rel_diff_pot-log": 0.02,
        }
    ]
    results = {
        "scaling": scaling,
        "extraction": extraction,
        "workers": workers,
        "training": training,
        "student": student,
        "ot": ot,
    }
    machine = {
        "date": "d",
        "platform": "p",
        "processor": "x",
        "cpu_count": 2,
        "python": "3",
        "torch": "t",
        "torch_threads": 1,
        "accelerator": "none",
        "load_average": (0.0, 0.0, 0.0),
    }
    text = speed.report_markdown(results, machine, "python benchmarks/speed.py", 60.0)
    for heading in (
        "## Whole demo vs data-set size",
        "## Stage throughput",
        "## Ray Train workers",
        "## OT loss",
    ):
        assert heading in text
    assert "| 20 | 320 | 40.0 |" in text and "| 200.0 | 4.00 |" in text  # totals relative to the smallest
    workers_section = text.split("## Ray Train workers")[1].split("## OT loss")[0]
    assert "| train-teacher | 10.0 | 15.0 | 1.50 |" in workers_section
    assert "| cache |" not in workers_section  # built in the driver: the worker count does not apply
    assert "10.0x" in text
    for block in text.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count("|") for ln in lines}) == 1, block


def test_variant_choice_takes_each_runs_best_validation_variant_and_scores_it_on_test():
    rows, val = [], []
    # run (0, 0): pkdot-most best on validation, worst on test; run (1, 0): a tie on validation -> pkdot
    scores = {
        (0, "student-pkdot"): (0.6, 0.7),
        (0, "student-pkdot-most"): (0.9, 0.5),
        (1, "student-pkdot"): (0.8, 0.6),
        (1, "student-pkdot-most"): (0.8, 0.9),
    }
    for (fold, model), (v, t) in scores.items():
        rows.append({"model": model, "fold": fold, "seed": 0, "accuracy": t})
        val.append({"model": model, "fold": fold, "seed": 0, "accuracy": v})
    for fold in (0, 1):
        rows.append({"model": "student-none", "fold": fold, "seed": 0, "accuracy": 0.5})
    run = quality.RunResult(
        spec=None, cell=("scratch", "fit"), cfg=load_config(preset="demo"), per_fold=pd.DataFrame(rows),
        per_fold_val=pd.DataFrame(val), table=pd.DataFrame(), test_train_ratio=0.25, wall_s=0.0,
    )  # fmt: skip
    picked = quality.variant_choice(run).sort_values("fold")
    assert list(picked["variant"]) == ["student-pkdot-most", "student-pkdot"]
    assert list(picked["accuracy"]) == [0.5, 0.6] and set(picked["model"]) == {quality.VARIANT_CHOICE}
    line = quality.variant_choice_lines(quality.TaskResult(None, {run.cell: run}, 0.0))[-1]
    assert "`scratch/fit`" in line and "− `none` +0.0500" in line
    one = quality.RunResult(
        **{**run.__dict__, "per_fold": run.per_fold[run.per_fold["model"] != "student-pkdot-most"]}
    )
    assert quality.variant_choice(one) is None  # a single variant: nothing to choose


def test_demo_breakdown_reads_stages_jobs_and_the_ray_train_runs_from_the_driver_log(tmp_path):
    """``speed.py --only demo``'s breakdown of a finished run: stage markers, the synthetic set's seconds from the
    log, job seconds from ``DONE.json`` and the Ray Train runs per job kind from the driver's lines (local mode
    stores no run folder)."""
    from pkdot.pipeline import STAGES

    for i, s in enumerate(STAGES):
        (tmp_path / "stages").mkdir(exist_ok=True)
        (tmp_path / "stages" / f"{s.name}.json").write_text(json.dumps({"seconds": float(i + 1)}))
    for kind, seconds in (("teacher/fold-0/seed-0", 3.0), ("teacher/fold-1/seed-0", 5.0)):
        (tmp_path / kind).mkdir(parents=True)
        (tmp_path / kind / "DONE.json").write_text(json.dumps({"seconds": seconds}))
    (tmp_path / "logs").mkdir()
    runner = "INFO pkdot.train.ray_runner:"
    (tmp_path / "logs" / "pkdot.log").write_text(
        "2026-12-06 14:00:00,000 INFO pkdot.data.synthetic: generating a synthetic Biovid set\n"
        "2026-12-06 14:00:06,500 INFO pkdot.data.synthetic: synthetic set written\n"
        f"2026-12-06 14:00:10,000 {runner} teacher: 4 pending jobs in 2 Ray Train runs, up to 2 at once (x)\n"
        f"2026-12-06 14:00:40,000 {runner} student: 12 pending jobs in 2 Ray Train runs, up to 2 at once (x)\n"
        f"2026-12-06 14:01:00,000 {runner} student: 1 pending jobs in 1 Ray Train runs, up to 2 at once (x)\n"
    )
    wall = float(sum(range(1, len(STAGES) + 1))) + 20.0
    out = speed.demo_breakdown(tmp_path, wall)
    assert out["ray_train_runs"] == {"teacher": 2, "student": 3}
    assert out["synthetic_s"] == pytest.approx(6.5) and out["outside_stages_s"] == pytest.approx(20.0)
    assert out["jobs_s"] == {"teacher": {"n": 2, "sum": 8.0, "median": 4.0}}
    table = speed.demo_markdown([out], "python benchmarks/speed.py --only demo", {"cpu_count": 2})
    assert "| teacher 2; student 3 |" in table and "| 20.0 |" in table
    log = tmp_path / "logs" / "pkdot.log"
    log.write_text(log.read_text().replace("Ray Train runs", "runs"))
    with pytest.raises(StageError, match="no 'N pending jobs in M Ray Train runs' line"):
        speed.demo_breakdown(tmp_path, wall)
