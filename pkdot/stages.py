"""The pipeline's stages as plain functions over a run directory (Prefect tasks and the CLI call these).

Each stage reads its inputs from ``cfg.run_dir``, writes its outputs there (atomically), logs to MLflow through
:mod:`pkdot.tracking`, and returns a :class:`StageResult`. A stage is idempotent: it records the hash of its
inputs (the config sections it depends on + the upstream stage's output fingerprint) in
``<run>/stages/<stage>.json`` and does nothing when its outputs are complete for the same inputs. When its
inputs changed it rebuilds its own outputs, and never touches an earlier stage's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkdot.config import RunConfig
from pkdot.errors import StageError

log = logging.getLogger(__name__)

STAGES = ("manifest", "extract", "train-teacher", "cache", "distill", "evaluate")


@dataclass
class StageResult:
    """What a stage hands the next one."""

    stage: str
    path: Path
    fingerprint: str
    skipped: bool = False
    details: dict[str, Any] = field(default_factory=dict)


# ---- bookkeeping ------------------------------------------------------------------------------------------
def _run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir)


def _marker(cfg: RunConfig, stage: str) -> Path:
    return _run_dir(cfg) / "stages" / f"{stage}.json"


def _inputs_key(cfg: RunConfig, sections: tuple[str, ...], upstream: str) -> str:
    return hashlib.sha256(f"{cfg.section_hash(*sections)}|{upstream}".encode()).hexdigest()[:16]


def _done(cfg: RunConfig, stage: str, key: str) -> dict | None:
    path = _marker(cfg, stage)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return doc if doc.get("inputs") == key else None


def _mark(cfg: RunConfig, stage: str, key: str, fingerprint: str, details: dict, seconds: float) -> None:
    path = _marker(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {"inputs": key, "fingerprint": fingerprint, "details": details, "seconds": round(seconds, 2)},
            indent=1,
            default=str,
        )
    )
    tmp.replace(path)


def _hash_files(paths: list[Path]) -> str:
    from pkdot.train.jobs import file_hash

    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(file_hash(p).encode())
    return h.hexdigest()[:16]


def _reset(path: Path) -> None:
    """Remove a stage's own stale outputs (inputs changed)."""
    if path.exists():
        log.info("inputs changed: removing stale %s", path)
        shutil.rmtree(path)


# ---- run preparation -------------------------------------------------------------------------------------
def prepare_run(cfg: RunConfig) -> RunConfig:
    """Make the run directory, write config.yaml, and generate the synthetic set when no root is given."""
    run_dir = _run_dir(cfg).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"run_dir": run_dir})
    if cfg.data.root is None:
        if cfg.data.dataset == "table":
            raise StageError("data.root: a bring-your-own table run needs --root FILE.parquet")
        from pkdot.data.synthetic import GENERATOR_VERSION, write_synthetic

        kind = cfg.data.dataset
        root = run_dir / "data" / f"synthetic-{kind}"
        done = root / ".synthetic-complete.json"
        s = cfg.synth
        params = {
            "kind": kind,
            "subjects": s.subjects,
            "seed": cfg.seed,
            "samples_per_class": s.samples_per_class,
            "part": cfg.data.part,
            "videos_per_subject": s.videos_per_subject,
            "seconds_per_video": s.seconds_per_video,
            "frame_size": s.frame_size,
            "fps": s.fps,
            "coupling": s.coupling,
            "generator_version": GENERATOR_VERSION,
        }
        if not done.is_file() or json.loads(done.read_text()) != params:
            print(f"[pkdot] generating a synthetic {kind} set ({s.subjects} subjects) in {root}", flush=True)
            _reset(root)
            write_synthetic(
                kind,
                root,
                subjects=s.subjects,
                seed=cfg.seed,
                samples_per_class=s.samples_per_class,
                part=cfg.data.part,
                videos_per_subject=s.videos_per_subject,
                seconds_per_video=s.seconds_per_video,
                frame_size=s.frame_size,
                fps=s.fps,
                coupling=s.coupling,
            )
            done.write_text(json.dumps(params))
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": root.resolve()})})
    if cfg.data.dataset == "table" and cfg.data.task == "multiclass" and cfg.data.num_classes is None:
        from pkdot.data.tabular import infer_num_classes

        data = cfg.data.model_copy(update={"num_classes": infer_num_classes(Path(cfg.data.root))})
        cfg = cfg.model_copy(update={"data": data})
    cfg.to_yaml(run_dir / "config.yaml")
    return cfg


# ---- stages -------------------------------------------------------------------------------------------------
def stage_manifest(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Dataset root -> ``manifest.parquet`` (+ ``manifest_report.json`` of skipped samples)."""
    import pandas as pd

    from pkdot.data import build_manifest, write_manifest_report
    from pkdot.data.manifest import write_manifest

    t0 = time.time()
    from pkdot.data.manifest import fold_plan

    run_dir = _run_dir(cfg)
    result = build_manifest(cfg.data, cfg.data.root)
    # too few subjects for the folds: refuse now, not at training
    fold_plan(result.frame, cfg.train, cfg.seed)
    path = run_dir / "manifest.parquet"
    write_manifest(result.frame, path)
    write_manifest_report(result, run_dir / "manifest_report.json")
    fingerprint = str(
        int(pd.util.hash_pandas_object(result.frame.astype(str), index=False).sum() % (1 << 62))
    )
    # A generated set keeps its paths when its parameters (coupling, ...) change: they decide its content.
    synthetic_marker = Path(cfg.data.root) / ".synthetic-complete.json"
    if synthetic_marker.is_file():
        marker_text = synthetic_marker.read_text()
        fingerprint = hashlib.sha256(f"{fingerprint}|{marker_text}".encode()).hexdigest()[:16]
    details = {
        "samples": len(result.frame),
        "skipped": len(result.skipped),
        "subjects": int(result.frame["subject_id"].nunique()),
    }
    _mark(cfg, "manifest", "always", fingerprint, details, time.time() - t0)
    return StageResult("manifest", path, fingerprint, False, details)


def stage_extract(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Manifest -> ``features/*.parquet`` + ``extract_report.json`` (Ray tasks, resumable shards)."""
    from pkdot.data.manifest import read_manifest
    from pkdot.features.extract import run_extract

    run_dir = _run_dir(cfg)
    key = _inputs_key(cfg, ("data", "features"), upstream)
    done = _done(cfg, "extract", key)
    out = run_dir / "features"
    if done is not None:
        return StageResult("extract", out, done["fingerprint"], True, done["details"])
    t0 = time.time()
    manifest = read_manifest(run_dir / "manifest.parquet")
    report = run_extract(cfg, manifest, run_dir, workers=cfg.features.workers)
    tables = sorted(p for p in out.glob("*.parquet"))
    if not tables:
        raise StageError(f"extraction wrote no feature table under {out}")
    fingerprint = _hash_files(tables)
    details = {k: report[k] for k in ("counts", "face_detection_rate") if k in report}
    _mark(cfg, "extract", key, fingerprint, details, time.time() - t0)
    _track_stage(cfg, "extract", metrics=_numeric(report), artifacts=[out / "extract_report.json"])
    return StageResult("extract", out, fingerprint, False, details)


def _folds(cfg: RunConfig):
    from pkdot.data.manifest import fold_plan, read_manifest
    from pkdot.train.data import load_samples
    from pkdot.train.splits import save_folds

    samples = load_samples(cfg, _run_dir(cfg))
    manifest = read_manifest(_run_dir(cfg) / "manifest.parquet")
    folds = fold_plan(manifest[manifest["sample_id"].isin(samples.sample_ids)], cfg.train, cfg.seed)
    if cfg.train.max_folds is not None:
        folds = folds[: cfg.train.max_folds]
    save_folds(folds, _run_dir(cfg) / "splits.json")
    return folds


def teacher_jobs(cfg: RunConfig, folds) -> list:
    from pkdot.train.cache import teacher_dir
    from pkdot.train.jobs import Job

    return [
        Job(
            key=f"teacher/fold-{f.index}/seed-{s}",
            out_dir=str(teacher_dir(_run_dir(cfg), f.index, s)),
            fold=f.index,
            seed=s,
        )
        for f in folds
        for s in cfg.train.seeds
    ]


def student_jobs(cfg: RunConfig, folds, losses: list[str]) -> list:
    from pkdot.train.jobs import Job
    from pkdot.train.student import student_dir

    return [
        Job(
            key=f"student/{loss}/fold-{f.index}/seed-{s}",
            out_dir=str(student_dir(_run_dir(cfg), loss, f.index, s)),
            fold=f.index,
            seed=s,
            loss=loss,
        )
        for loss in losses
        for f in folds
        for s in cfg.train.seeds
    ]


def stage_train_teacher(cfg: RunConfig, upstream: str = "", *, callbacks=()) -> StageResult:
    """Per fold x seed: unimodal backbones, fusion teacher, T-Net — on Ray Train."""
    from pkdot.train.ray_runner import run_jobs_on_ray

    run_dir = _run_dir(cfg)
    key = _inputs_key(
        cfg, ("data", "features", "model", "train", "seed"), upstream or _fingerprint(cfg, "extract")
    )
    out = run_dir / "teacher"
    done = _done(cfg, "train-teacher", key)
    if done is not None:
        return StageResult("train-teacher", out, done["fingerprint"], True, done["details"])
    if _previous_inputs(cfg, "train-teacher") not in (None, key):  # inputs changed: its jobs are stale
        _reset(out)
    t0 = time.time()
    folds = _folds(cfg)
    jobs = teacher_jobs(cfg, folds)
    _mark_pending(cfg, "train-teacher", key)
    run_jobs_on_ray(cfg, "teacher", jobs, callbacks=callbacks)
    metrics = {}
    for job in jobs:
        for k, v in json.loads((Path(job.out_dir) / "metrics.json").read_text()).items():
            metrics[f"fold{job.fold}_seed{job.seed}/{k}"] = v
    fingerprint = _hash_files([Path(j.out_dir) / n for j in jobs for n in ("teacher.pt", "tnet.pt")])
    _mark(cfg, "train-teacher", key, fingerprint, {"jobs": len(jobs), "metrics": metrics}, time.time() - t0)
    _track_jobs(cfg, "train-teacher", jobs)
    return StageResult("train-teacher", out, fingerprint, False, {"jobs": len(jobs), "metrics": metrics})


def _previous_inputs(cfg: RunConfig, stage: str) -> str | None:
    """The inputs key of the last (finished or interrupted) run of a stage, or None."""
    path = _marker(cfg, stage)
    if not path.is_file():
        return None
    return str(json.loads(path.read_text()).get("inputs", "")).removeprefix("pending:")


def _mark_pending(cfg: RunConfig, stage: str, key: str) -> None:
    """Record the inputs a stage is working on (so a changed config is detected even after a crash)."""
    path = _marker(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"inputs": f"pending:{key}"}))


def _fingerprint(cfg: RunConfig, stage: str) -> str:
    path = _marker(cfg, stage)
    if not path.is_file():
        raise StageError(f"stage {stage!r} has not completed in {cfg.run_dir} (run it first)")
    doc = json.loads(path.read_text())
    if "fingerprint" not in doc:
        raise StageError(f"stage {stage!r} did not complete in {cfg.run_dir} (run it again)")
    return doc["fingerprint"]


def stage_cache(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Run each frozen teacher once over its fold's samples -> ``embeddings/fold-<k>-seed-<s>.parquet``."""
    from pkdot.train.cache import build_cache, cache_is_fresh, cache_path
    from pkdot.train.data import load_samples
    from pkdot.train.splits import load_folds

    run_dir = _run_dir(cfg)
    key = _inputs_key(cfg, ("data", "model"), upstream or _fingerprint(cfg, "train-teacher"))
    folds = load_folds(run_dir / "splits.json")
    paths = [cache_path(run_dir, f.index, s) for f in folds for s in cfg.train.seeds]
    done = _done(cfg, "cache", key)
    if done is not None and all(cache_is_fresh(run_dir, f.index, s) for f in folds for s in cfg.train.seeds):
        return StageResult("cache", run_dir / "embeddings", done["fingerprint"], True, done["details"])
    t0 = time.time()
    samples = None
    built = 0
    for f in folds:
        for s in cfg.train.seeds:
            if cache_is_fresh(run_dir, f.index, s):
                continue
            if samples is None:
                samples = load_samples(cfg, run_dir)
            build_cache(cfg, samples, f.index, s)
            built += 1
    fingerprint = _hash_files(paths)
    details = {"files": len(paths), "built": built}
    _mark(cfg, "cache", key, fingerprint, details, time.time() - t0)
    return StageResult("cache", run_dir / "embeddings", fingerprint, False, details)


def stage_distill(
    cfg: RunConfig, upstream: str = "", *, losses: list[str] | None = None, callbacks=()
) -> StageResult:
    """One student per loss x fold x seed, from the cache, on Ray Train."""
    from pkdot.train.ray_runner import run_jobs_on_ray
    from pkdot.train.splits import load_folds

    run_dir = _run_dir(cfg)
    losses = list(losses or cfg.distill.losses)
    key = _inputs_key(cfg, ("distill", "train", "model", "seed"), upstream or _fingerprint(cfg, "cache"))
    key = hashlib.sha256(f"{key}|{','.join(losses)}".encode()).hexdigest()[:16]
    out = run_dir / "student"
    done = _done(cfg, "distill", key)
    if done is not None:
        return StageResult("distill", out, done["fingerprint"], True, done["details"])
    if _previous_inputs(cfg, "distill") not in (None, key):
        for loss in losses:
            _reset(out / loss)
    t0 = time.time()
    folds = load_folds(run_dir / "splits.json")
    jobs = student_jobs(cfg, folds, losses)
    _mark_pending(cfg, "distill", key)
    run_jobs_on_ray(cfg, "student", jobs, callbacks=callbacks)
    fingerprint = _hash_files([Path(j.out_dir) / "student.pt" for j in jobs])
    details = {"jobs": len(jobs), "losses": losses}
    _mark(cfg, "distill", key, fingerprint, details, time.time() - t0)
    _track_jobs(cfg, "distill", jobs)
    return StageResult("distill", out, fingerprint, False, details)


def stage_evaluate(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Metrics, CIs, paired comparisons, report.md + plots; register the best student in MLflow."""
    from pkdot.evaluate.report import evaluate_run

    run_dir = _run_dir(cfg)
    key = _inputs_key(cfg, ("data", "distill", "tracking"), upstream or _fingerprint(cfg, "distill"))
    done = _done(cfg, "evaluate", key)
    if done is not None:
        return StageResult("evaluate", run_dir / "report", done["fingerprint"], True, done["details"])
    t0 = time.time()
    summary = evaluate_run(cfg, run_dir)
    details: dict[str, Any] = {
        "report": str(summary.report_path),
        "best_student": summary.best_student,
        "summary_markdown": summary.report_path.read_text(),
    }
    details.update(_register_and_log(cfg, summary))
    fingerprint = _hash_files([summary.report_path])
    _mark(cfg, "evaluate", key, fingerprint, details, time.time() - t0)
    return StageResult("evaluate", run_dir / "report", fingerprint, False, details)


# ---- MLflow -------------------------------------------------------------------------------------------------
def _numeric(d: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a report as ``a.b.c`` metric names; per-sample sections are left to the JSON artifact."""
    out: dict[str, float] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, bool) or k in ("per_sample", "quarantined", "not_written"):
            continue
        if isinstance(v, int | float):
            out[name] = float(v)
        elif isinstance(v, dict):
            out.update(_numeric(v, name + "."))
    return out


def _track_stage(cfg: RunConfig, stage: str, *, metrics: dict[str, float], artifacts: list[Path]) -> None:
    from pkdot.tracking import Tracker

    tracker = Tracker(cfg)
    with tracker.stage_run(stage) as run:
        clean = {k.replace("/", "_").replace(":", "_"): v for k, v in metrics.items()}
        if clean:
            run.log_metrics(clean)
        for a in artifacts:
            if Path(a).exists():
                run.log_artifact(a)


def _track_jobs(cfg: RunConfig, stage: str, jobs: list) -> None:
    """A nested MLflow run per job (fold x seed [x loss]) with its per-epoch history and metrics."""
    from pkdot.tracking import Tracker

    tracker = Tracker(cfg)
    for job in jobs:
        jdir = Path(job.out_dir)
        tags = {"loss": job.loss} if job.loss else {}
        with tracker.stage_run(
            stage if not job.loss else f"{stage}/{job.loss}", fold=job.fold, seed=job.seed, **tags
        ) as run:
            history = json.loads((jdir / "history.json").read_text())
            for phase, doc in history.get("phases", {}).items():
                tracker.log_history(
                    run,
                    {
                        "epochs": [
                            {f"{phase}/{k}": v for k, v in rec.items() if k != "epoch"}
                            | {"epoch": rec["epoch"]}
                            for rec in doc["epochs"]
                        ]
                    },
                )
            metrics = json.loads((jdir / "metrics.json").read_text())
            run.log_metrics({k.replace("/", "_"): float(v) for k, v in metrics.items()})
            run.log_artifact(jdir / "history.json")
            if cfg.tracking.log_checkpoints:
                for ckpt in sorted(jdir.glob("*.pt")):
                    run.log_artifact(ckpt, artifact_path="checkpoints")


def _register_and_log(cfg: RunConfig, summary) -> dict[str, Any]:
    import numpy as np

    from pkdot.tracking import Tracker, resolve_tracking_uri

    tracker = Tracker(cfg)
    report_dir = Path(summary.report_path).parent
    with tracker.stage_run("evaluate") as run:
        table = summary.table
        for _, row in table.iterrows():
            run.log_metrics({f"{row['model']}_mean": float(row["mean"])})
        run.log_artifacts(report_dir, artifact_path="report")
        eval_run_id = run.run_id
    details: dict[str, Any] = {
        "mlflow_run_id": tracker.parent_run_id(),
        "evaluate_run_id": eval_run_id,
        "tracking_uri": resolve_tracking_uri(cfg),
    }
    if not cfg.tracking.register_model or summary.best_student is None:
        tracker.finish_parent("FINISHED")
        return details
    loss = summary.best_student.removeprefix("student-")
    fold, seed = _best_student_job(cfg, loss)
    from pkdot.train.student import load_trained_student

    student, shapes = load_trained_student(cfg, loss, fold, seed)
    video = cfg.data.student_modalities[0]
    example = np.zeros((2, *shapes[video]), dtype=np.uint8 if video == "video" else np.float32)
    row = table[table["model"] == summary.best_student].iloc[0]
    reg = tracker.register_student(
        student,
        example,
        metric_name=str(row["metric"]),
        metric_value=float(row["mean"]),
        higher_is_better=True,
        extra_artifacts=[_run_dir(cfg) / "config.yaml"],
        dataset=cfg.data.dataset,
    )
    details.update(
        {
            "model_name": reg.name,
            "model_version": str(reg.version),
            "alias": reg.alias,
            "registered_loss": loss,
            "registered_fold": fold,
            "registered_seed": seed,
        }
    )
    tracker.finish_parent("FINISHED")
    return details


def _best_student_job(cfg: RunConfig, loss: str) -> tuple[int, int]:
    """The (fold, seed) of ``loss`` whose student had the best *validation* metric (never the test fold)."""
    from pkdot.train.splits import load_folds
    from pkdot.train.student import student_dir

    best, best_key = -float("inf"), None
    metric = "val_ccc" if cfg.data.is_regression else "val_accuracy"
    for f in load_folds(_run_dir(cfg) / "splits.json"):
        for s in cfg.train.seeds:
            m = json.loads((student_dir(_run_dir(cfg), loss, f.index, s) / "metrics.json").read_text())
            if m[metric] > best:
                best, best_key = m[metric], (f.index, s)
    if best_key is None:
        raise StageError(f"no trained student for loss {loss!r}")
    return best_key


def run_all(cfg: RunConfig) -> dict[str, StageResult]:
    """Every stage in order, in this process (what ``pkdot run --no-prefect`` does)."""
    cfg = prepare_run(cfg)
    results: dict[str, StageResult] = {}
    upstream = ""
    for name, fn in (
        ("manifest", stage_manifest),
        ("extract", stage_extract),
        ("train-teacher", stage_train_teacher),
        ("cache", stage_cache),
        ("distill", stage_distill),
        ("evaluate", stage_evaluate),
    ):
        print(f"[pkdot] stage {name} ...", flush=True)
        t0 = time.time()
        res = fn(cfg, upstream)
        print(
            f"[pkdot] stage {name} {'skipped (up to date)' if res.skipped else 'done'} in {time.time() - t0:.1f}s",
            flush=True,
        )
        results[name] = res
        upstream = res.fingerprint
    return results
