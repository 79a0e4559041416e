"""Smoke test of ``benchmarks/protocol.py`` (issue 25): its ``--quick`` run on the synthetic feature table.

A real ``--quick`` run trains 5 protocols through Ray Train (minutes on 2 cores); CI time is scarce, so the CI
test replaces the training stages by a stand-in that keeps everything else real: the configs the benchmark
builds (the switches validated by pkdot's config), the manifest stage on the real table, the fold planning of
each protocol (``pkdot.folds.plan_run_folds``: clip folds, test-as-validation), the evaluate stage's report (its
banner) and the quality benchmark's aggregation (corrected intervals). The stand-in scores each sample right
with a probability that rises with each switch, so the inflation table must find those rises. The whole real
run (training included) is the ``slow`` test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.benchmarks.bench_loader import load_benchmark

protocol = load_benchmark("protocol")

#: The stand-in's probability of a right answer: per model, plus a bump per switch.
BASE_ACCURACY = {
    "teacher": 0.8,
    "unimodal-face_au": 0.6,
    "unimodal-physio": 0.7,
    "student-none": 0.6,
    "student-kd": 0.62,
    "student-pkdot": 0.6,
}
BUMP = {"train.folds": 0.2, "train.select_on": 0.05, "train.teacher_scope": 0.0}


def _accuracy(cfg, model: str) -> float:
    p = BASE_ACCURACY[model]
    for switch in cfg.train.optimistic_switches:
        p += BUMP[switch.split("=")[0]]
    return min(p, 0.99)


def _write_predictions(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame.from_records(rows).to_parquet(path)


def fake_run_all(cfg):
    """The pipeline with its training replaced: real manifest, folds and evaluation; drawn predictions."""
    from pkdot.data.manifest import read_manifest
    from pkdot.evaluate.report import evaluate_run
    from pkdot.folds import plan_run_folds, save_folds
    from pkdot.pipeline import prepare_run, run_stage
    from pkdot.rundir import RunDir

    cfg = prepare_run(cfg)
    results = {"manifest": run_stage("manifest", cfg)}
    rd = RunDir(cfg.run_dir)
    frame = read_manifest(rd.manifest)
    plan = plan_run_folds(cfg, frame)
    save_folds(plan, rd.splits)
    y = frame["label"].to_numpy(dtype=float)
    for seed, fold in plan.pairs(plan.seeds):
        ids = frame[fold.unit].astype(str).to_numpy()
        # (under select_on: test the carved validation subjects are in no split, as in pkdot.train.data)
        masks = {split: np.isin(ids, list(getattr(fold, split))) for split in ("val", "test")}
        rng = np.random.default_rng([seed, fold.index])
        files: dict[Path, list[dict]] = {}
        for model in BASE_ACCURACY:
            loss = model.removeprefix("student-")
            folder = rd.students / loss if model.startswith("student-") else rd.teachers
            path = folder / f"fold-{fold.index}" / f"seed-{seed}" / "predictions.parquet"
            for split in ("val", "test"):
                idx = np.flatnonzero(masks[split])
                right = rng.random(idx.size) < _accuracy(cfg, model)
                pred = np.where(right, y[idx], 1.0 - y[idx])
                files.setdefault(path, []).extend(
                    {
                        "sample_id": str(frame["sample_id"].iloc[i]),
                        "subject_id": str(frame["subject_id"].iloc[i]),
                        "y_true": y[i],
                        "y_pred": p,
                        "scores": [1.0 - p, p],
                        "embedding": [0.0, 1.0],
                        "model": model,
                        "fold": fold.index,
                        "seed": seed,
                        "split": split,
                    }
                    for i, p in zip(idx, pred, strict=True)
                )
        for path, rows in files.items():
            _write_predictions(path, rows)
    evaluate_run(cfg)
    return results


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench-protocol")
    out = work / "protocol.md"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pkdot.pipeline.run_all", fake_run_all)
        mp.setattr("pkdot.evaluate.report._draw_plots", lambda *a, **k: [])  # plots: tests/evaluate (CI time)
        protocol.main(
            ["--data", "features", "--quick", "--seeds", "2", "--work-dir", str(work), "--out", str(out)]
        )
    return out


def test_table_has_every_protocol_and_flags_the_switched_reports(quick_run):
    text = quick_run.read_text()
    doc = json.loads(quick_run.with_suffix(".json").read_text())
    table = pd.DataFrame(doc["table"]).set_index("protocol")
    assert list(table.index) == list(protocol.PROTOCOL_NAMES)
    for name in protocol.PROTOCOL_NAMES:
        assert f"| `{name}` |" in text
    # every run's own report opens with the banner exactly when its protocol sets a switch
    assert table["flagged"].to_dict() == {p.name: not p.sound for p in protocol.PROTOCOLS}
    for name, run_dir in doc["run_dirs"].items():
        first_line = (Path(run_dir) / "report" / "report.md").read_text().split("\n", 1)[0]
        assert (protocol.BANNER in first_line) == (name != "sound"), name
    assert "## Failures" not in text
    # clip folds are folds over samples: their n_test/n_train counts samples (a subject count would be 0)
    splits = json.loads((Path(doc["run_dirs"]["clips"]) / "splits.json").read_text())
    assert {e.get("unit") for e in splits} == {"sample_id"}
    assert all(0 < r < math.inf for r in table["test_train_ratio"])
    # 2 folds x 2 seeds, every model, each mean inside its corrected interval
    assert (table["n"] == 4).all()
    for model in ("teacher", *protocol.STUDENTS):
        assert (table[f"{model}_low"] <= table[model] + 1e-12).all()
        assert (table[model] <= table[f"{model}_high"] + 1e-12).all()
    # every table line has as many cells as its header
    for block in text.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.startswith("|")]
        if lines:
            assert len({ln.count("|") for ln in lines}) == 1, block


def test_inflation_is_each_protocol_minus_sound_per_run(quick_run):
    doc = json.loads(quick_run.with_suffix(".json").read_text())
    per_fold = {k: pd.DataFrame(v) for k, v in doc["per_fold"].items()}
    inflation = pd.DataFrame(doc["inflation"]).set_index("protocol")
    assert list(inflation.index) == [p for p in protocol.PROTOCOL_NAMES if p != "sound"]

    def mean(name: str, model: str) -> float:
        pf = per_fold[name]
        return float(pf.loc[pf["model"] == model, "accuracy"].mean())

    for name in inflation.index:
        for model in protocol.STUDENTS:
            assert inflation.loc[name, model] == pytest.approx(mean(name, model) - mean("sound", model))
        gap = (mean(name, "student-pkdot") - mean(name, "student-none")) - (
            mean("sound", "student-pkdot") - mean("sound", "student-none")
        )
        assert inflation.loc[name, "pkdot_gap"] == pytest.approx(gap)
        assert inflation.loc[name, "pkdot_gap_low"] <= inflation.loc[name, "pkdot_gap"] + 1e-12
    # the stand-in's clip folds score +0.2 per sample: the benchmark finds a large rise there, none elsewhere
    assert inflation.loc["clips", "student-none"] > 0.05
    assert inflation.loc["authors", "student-none"] > 0.05
    assert abs(inflation.loc["teacher-all", "student-none"]) < 0.2
    assert "sum of the three single switches" in quick_run.read_text()


def test_report_only_rereads_the_finished_runs_without_running_a_stage(quick_run, monkeypatch):
    doc = json.loads(quick_run.with_suffix(".json").read_text())

    def no_stage(*args, **kwargs):
        raise AssertionError("--report-only ran a stage")

    monkeypatch.setattr("pkdot.pipeline.run_all", no_stage)
    monkeypatch.setattr("pkdot.pipeline.run_stage", no_stage)
    _mark_evaluated(doc)
    work = quick_run.parent
    argv = ["--data", "features", "--quick", "--seeds", "2", "--work-dir", str(work), "--report-only"]
    again = protocol.main([*argv, "--out", str(work / "again.md")])
    redone = json.loads(again.with_suffix(".json").read_text())
    assert redone["table"] == doc["table"] and redone["inflation"] == doc["inflation"]

    # a stage re-running in one of the runs (its marker pending; here an interrupted re-run): that run's old
    # outputs are refused, not read half-rewritten; the report names the run, the stage and what to re-run
    marker = Path(doc["run_dirs"]["clips"]) / "stages" / "manifest.json"
    done = marker.read_text()
    marker.write_text(json.dumps({"inputs": "pending:0"}))
    try:
        with pytest.raises(SystemExit, match=r"failed: clips \("):
            protocol.main([*argv, "--out", str(work / "refused.md")])
    finally:
        marker.write_text(done)
    refused = " ".join((work / "refused.md").read_text().split())
    assert re.search(r"\*\*clips\*\*: `StageError: stage 'manifest' did not complete in \S*clips", refused)
    assert "re-run `pkdot extract`" in refused


def _stand_in(argv: list[str]) -> dict:
    """``protocol.main(argv)`` with the stand-in pipeline: its JSON; ``--report-only`` can read its runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pkdot.pipeline.run_all", fake_run_all)
        mp.setattr("pkdot.evaluate.report._draw_plots", lambda *a, **k: [])
        out = protocol.main(argv)
    doc = json.loads(out.with_suffix(".json").read_text())
    _mark_evaluated(doc)
    return doc


def _mark_evaluated(doc: dict) -> None:
    """The evaluate markers of a stand-in run's directories (the stand-in evaluates without the stage)."""
    for run_dir in doc["run_dirs"].values():
        (Path(run_dir) / "stages" / "evaluate.json").write_text('{"inputs": "stand-in", "fingerprint": "0"}')


def test_runs_with_other_seeds_pool_into_the_table_of_one_run_with_all_seeds(quick_run, tmp_path):
    base = ["--data", "features", "--quick", "--protocols", "sound"]
    more, whole = tmp_path / "seed-2", tmp_path / "seeds-0-2"
    _stand_in(
        [*base, "--seeds", "1", "--first-seed", "2", "--work-dir", str(more), "--out", str(more / "p.md")]
    )
    reference = _stand_in([*base, "--seeds", "3", "--work-dir", str(whole), "--out", str(whole / "p.md")])
    _mark_evaluated(json.loads(quick_run.with_suffix(".json").read_text()))
    read = [*base, "--report-only", "--work-dir", str(quick_run.parent)]
    out = protocol.main([*read, "--pool-with", str(more), "--out", str(tmp_path / "pooled.md")])
    pooled = json.loads(out.with_suffix(".json").read_text())
    assert pooled["seeds"] == 3 and pooled["table"][0]["n"] == 3 * 2
    assert pooled["table"] == reference["table"] and pooled["per_fold"] == reference["per_fold"]
    assert "5 folds" not in out.read_text() and "2 folds x 3 seeds" in out.read_text()
    # a seed in both work dirs is refused, not counted twice
    with pytest.raises(SystemExit, match="failed: sound"):
        protocol.main([*read, "--pool-with", str(whole), "--out", str(tmp_path / "overlap.md")])
    assert "seeds overlap" in (tmp_path / "overlap.md").read_text()
    with pytest.raises(SystemExit):
        protocol.parse_args(["--pool-with", str(more)])  # only with --report-only


def test_protocols_differ_only_in_their_switches(tmp_path):
    from pkdot.config import load_config

    quality = protocol.sys.modules["quality"]
    configs = {}
    for p in protocol.PROTOCOLS:
        settings = protocol.protocol_settings(
            p, seeds=5, folds=5, subjects=10, quick=False, work_dir=tmp_path
        )
        over = settings.overrides(
            quality.TASKS["features"], tmp_path / p.name, protocol.BASE_CELL, protocol.LOSSES
        )
        configs[p.name] = load_config(preset="demo", overrides=over)
    sound = configs["sound"]
    assert sound.train.optimistic_switches == [] and sound.train.folds == 5
    assert configs["clips"].train.folds == "clips" and configs["clips"].train.max_folds == 5
    assert len(configs["authors"].train.optimistic_switches) == 3
    for name, cfg in configs.items():
        assert cfg.distill.losses == list(protocol.LOSSES)
        assert cfg.train.seeds == [0, 1, 2, 3, 4]
        for section in ("data", "synth", "features", "model", "distill"):
            assert getattr(cfg, section) == getattr(sound, section), (name, section)


def test_options(tmp_path, capsys):
    args, out = protocol.parse_args(["--quick", "--work-dir", str(tmp_path)])
    assert (args.seeds, args.folds, args.data) == (1, 2, "features") and out == tmp_path / "protocol.md"
    args, out = protocol.parse_args(["--data", "video"])
    assert (args.seeds, args.folds) == (5, 5) and out.name == "protocol-video.md"
    with pytest.raises(SystemExit):
        protocol.parse_args(["--folds", "6"])
    assert "clips protocols have 5 folds" in capsys.readouterr().err
    # --set: the same override for every protocol, after the benchmark's own settings, under the switches
    args, _ = protocol.parse_args(["--set", "synth.fps=25", "--set", "train.folds=3"])
    extra = [protocol.parse_override(o) for o in args.overrides]
    quality = protocol.sys.modules["quality"]
    for name in ("sound", "authors"):
        p = next(p for p in protocol.PROTOCOLS if p.name == name)
        settings = protocol.protocol_settings(
            p, seeds=1, folds=5, subjects=10, quick=False, work_dir=tmp_path, extra=extra
        )
        over = settings.overrides(quality.TASKS["binary"], tmp_path, protocol.BASE_CELL, protocol.LOSSES)
        assert over["synth.fps"] == 25 and over["train.folds"] == (3 if name == "sound" else "clips")


@pytest.mark.slow
def test_quick_run_trains_every_protocol(tmp_path):
    """The real ``--quick`` run (Ray Train; minutes on 2 cores)."""
    out = protocol.main(["--data", "features", "--quick", "--work-dir", str(tmp_path)])
    doc = json.loads(out.with_suffix(".json").read_text())
    assert [r["protocol"] for r in doc["table"]] == list(protocol.PROTOCOL_NAMES)
    assert [r["flagged"] for r in doc["table"]] == [not p.sound for p in protocol.PROTOCOLS]
