"""The pipeline's stages as plain functions over a run directory (Prefect tasks and the CLI call these).

Each stage reads its inputs from ``cfg.run_dir``, writes its outputs there (atomically), logs to MLflow through
:mod:`pkdot.tracking`, and returns a :class:`StageResult`. A stage is idempotent: it records its key
(:func:`pkdot.fingerprint.stage_key`: config sections + upstream output fingerprint + the stage's source code;
the Prefect cache uses the same key), its output fingerprint and the size/mtime of its output files in
``<run>/stages/<stage>.json``, and does nothing when its outputs are intact for the same key. When its inputs
changed it rebuilds its own outputs, and never touches an earlier stage's.

Before it writes, a stage marks itself pending (its marker loses its fingerprint) and removes the old results a
failure would leave readable; a stage refuses to start when its upstream stage is pending, or when an output an
earlier stage recorded changed or disappeared since, naming the command to re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pkdot.config import RunConfig
from pkdot.errors import ConfigError, StageError
from pkdot.fingerprint import STAGES

log = logging.getLogger(__name__)
#: A few lines the console shows by default (``pkdot.console.STATUS_LOGGER``): a stage done, the data set.
status = logging.getLogger("pkdot.status")


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


def _key(cfg: RunConfig, stage: str, upstream: str, **kw: Any) -> str:
    """The stage's key (:func:`pkdot.fingerprint.stage_key`, the same one Prefect's cache uses)."""
    from pkdot.fingerprint import stage_key

    return stage_key(cfg, stage, upstream, **kw)


#: The command that (re)runs a stage, for messages.
STAGE_COMMAND = {
    "manifest": "pkdot extract",
    "extract": "pkdot extract",
    "train-teacher": "pkdot train-teacher",
    "cache": "pkdot cache",
    "distill": "pkdot distill",
    "evaluate": "pkdot evaluate",
}


def _read_marker(cfg: RunConfig, stage: str) -> dict | None:
    path = _marker(cfg, stage)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(
            f"{path} is not a readable stage marker ({exc}); re-run {STAGE_COMMAND[stage]}"
        ) from exc
    return doc if isinstance(doc, dict) else None


def _changed_outputs(cfg: RunConfig, doc: dict) -> list[str]:
    """The outputs a marker records whose size or mtime is not what the stage wrote (or that are gone)."""
    from pkdot.fingerprint import output_stamp

    changed = []
    for rel, stamp in (doc.get("outputs") or {}).items():
        path = _run_dir(cfg) / rel
        try:
            if output_stamp(path) != list(stamp):
                changed.append(f"{path} (changed)")
        except OSError:
            changed.append(f"{path} (missing)")
    return changed


def _done(cfg: RunConfig, stage: str, key: str) -> dict | None:
    """The marker of ``stage`` when it completed for ``key`` and its recorded outputs are intact, else None."""
    doc = _read_marker(cfg, stage)
    if doc is None or doc.get("inputs") != key or "fingerprint" not in doc:
        return None
    changed = _changed_outputs(cfg, doc)
    if changed:
        log.warning(
            "stage %s: outputs changed since it ran (%s); running it again", stage, ", ".join(changed[:3])
        )
        return None
    return doc


def _mark(
    cfg: RunConfig,
    stage: str,
    key: str,
    fingerprint: str,
    details: dict,
    seconds: float,
    outputs: list[Path] | None = None,
) -> None:
    """Record a completed stage: its key, output fingerprint, and the size/mtime of each output file."""
    from pkdot.fingerprint import output_stamp

    path = _marker(cfg, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    run_dir = _run_dir(cfg).resolve()
    stamps = {
        str(Path(p).resolve().relative_to(run_dir)): output_stamp(p)
        for p in (outputs or [])
        if Path(p).is_file()
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(
        json.dumps(
            {
                "inputs": key,
                "fingerprint": fingerprint,
                "outputs": stamps,
                "details": details,
                "seconds": round(seconds, 2),
            },
            indent=1,
            default=str,
        )
    )
    tmp.replace(path)


def _upstream(cfg: RunConfig, stage: str, upstream: str = "") -> str:
    """The output fingerprint of the completed stage ``stage``, after checking its outputs on disk.

    Raises :class:`StageError` naming the stage to re-run when it has not completed, its last run failed or was
    interrupted, an output it recorded changed or disappeared since, or ``upstream`` (what the caller was
    handed) is not what the stage recorded.
    """
    doc = _read_marker(cfg, stage)
    again = STAGE_COMMAND[stage]
    if doc is None:
        raise StageError(f"stage {stage!r} has not completed in {cfg.run_dir}: run `{again}` first")
    if "fingerprint" not in doc:
        raise StageError(
            f"stage {stage!r} did not complete in {cfg.run_dir} (its last run failed or was interrupted, and its "
            f"old outputs were invalidated): re-run `{again}`"
        )
    changed = _changed_outputs(cfg, doc)
    if changed:
        raise StageError(
            f"the outputs of stage {stage!r} changed since it wrote them: {', '.join(changed[:5])}"
            f"{f' and {len(changed) - 5} more' if len(changed) > 5 else ''}; re-run `{again}`"
        )
    if upstream and upstream != doc["fingerprint"]:
        raise StageError(
            f"stage {stage!r} in {cfg.run_dir} recorded outputs {doc['fingerprint']}, not the {upstream} this "
            f"stage was given: re-run `{again}`"
        )
    for earlier in STAGES[: STAGES.index(stage)]:  # later stages read these too (features, splits, ...)
        earlier_doc = _read_marker(cfg, earlier)
        changed = _changed_outputs(cfg, earlier_doc) if earlier_doc else []
        if changed:
            raise StageError(
                f"the outputs of stage {earlier!r} changed since it wrote them: {', '.join(changed[:5])}; "
                f"re-run `{STAGE_COMMAND[earlier]}`"
            )
    return str(doc["fingerprint"])


def _invalidate(cfg: RunConfig, stage: str, key: str, outputs: Sequence[Path] = ()) -> None:
    """Before a stage writes: mark it pending (no fingerprint: nothing downstream accepts it) and remove
    ``outputs``, its old results that a failure would otherwise leave readable."""
    _mark_pending(cfg, stage, key)
    for p in outputs:
        if p.is_file():
            log.info("stage %s: removing its old output %s before writing", stage, p)
            p.unlink()


def result_is_current(cfg: RunConfig, result: StageResult) -> bool:
    """Whether a stage result (e.g. one Prefect served from its cache) still describes the run directory.

    False when its path is gone, or the stage's marker records another fingerprint, or outputs that changed.
    A missing marker is accepted when the path exists (results not produced by these stage functions).
    """
    if not Path(result.path).exists():
        return False
    doc = _read_marker(cfg, result.stage)
    if doc is None:
        return True
    return doc.get("fingerprint") == result.fingerprint and not _changed_outputs(cfg, doc)


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
            status.info("generating a synthetic %s set (%d subjects) in %s", kind, s.subjects, root)
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
    # The identity of every recording and of the root's index files: a recording zeroed or rewritten in place
    # changes the manifest's fingerprint, so extract (and everything below) is run again for it.
    from pkdot.fingerprint import hash_json, recordings_identity

    fingerprint = hash_json(
        {"rows": fingerprint, "recordings": recordings_identity(result.frame, cfg.data.root)}
    )
    details = {
        "samples": len(result.frame),
        "skipped": len(result.skipped),
        "subjects": int(result.frame["subject_id"].nunique()),
    }
    _mark(cfg, "manifest", "always", fingerprint, details, time.time() - t0, outputs=[path])
    return StageResult("manifest", path, fingerprint, False, details)


def stage_extract(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Manifest -> ``features/*.parquet`` + ``extract_report.json`` (Ray tasks, resumable shards)."""
    from pkdot.data.manifest import read_manifest
    from pkdot.features.extract import run_extract

    run_dir = _run_dir(cfg)
    key = _key(cfg, "extract", _upstream(cfg, "manifest", upstream))
    done = _done(cfg, "extract", key)
    out = run_dir / "features"
    if done is not None:
        return StageResult("extract", out, done["fingerprint"], True, done["details"])
    t0 = time.time()
    # Nothing downstream may read the old tables while (or if) this run fails: they go first; the shards
    # stay (each is keyed by its own rows' recordings, so a re-run redoes only the shards that changed).
    _invalidate(cfg, "extract", key, sorted(out.glob("*.parquet")) + [out / "extract_report.json"])
    manifest = read_manifest(run_dir / "manifest.parquet")
    report = run_extract(cfg, manifest, run_dir, workers=cfg.features.workers)
    tables = sorted(p for p in out.glob("*.parquet"))
    if not tables:
        raise StageError(f"extraction wrote no feature table under {out}")
    fingerprint = _hash_files(tables)
    details = {
        k: report[k]
        for k in ("counts", "face_detection_rate", "shards_done", "shards_skipped")
        if k in report
    }
    _mark(cfg, "extract", key, fingerprint, details, time.time() - t0, outputs=tables)
    _track_stage(cfg, "extract", metrics=_numeric(report), artifacts=[out / "extract_report.json"])
    return StageResult("extract", out, fingerprint, False, details)


def _folds(cfg: RunConfig):
    """Each seed's subject folds (+ crossfit groups) -> ``splits.json`` (:func:`pkdot.train.splits.plan_run_folds`)."""
    from pkdot.train.splits import write_run_folds

    return write_run_folds(cfg, _run_dir(cfg))


def teacher_jobs(cfg: RunConfig, folds) -> list:
    """Teacher jobs of a fold plan, cross-fitting ones included (:func:`pkdot.train.jobs.teacher_jobs`)."""
    from pkdot.train.jobs import teacher_jobs as make

    return make(cfg, folds)


def student_jobs(cfg: RunConfig, folds, losses: list[str]) -> list:
    """Student jobs of a fold plan (:func:`pkdot.train.jobs.student_jobs`)."""
    from pkdot.train.jobs import student_jobs as make

    return make(cfg, folds, losses)


def stage_train_teacher(cfg: RunConfig, upstream: str = "", *, callbacks=()) -> StageResult:
    """Per fold x seed: unimodal backbones, fusion teacher, T-Net — on Ray Train."""
    from pkdot.train.ray_runner import run_jobs_on_ray

    run_dir = _run_dir(cfg)
    key = _key(cfg, "train-teacher", _upstream(cfg, "extract", upstream))
    out = run_dir / "teacher"
    done = _done(cfg, "train-teacher", key)
    if done is not None:
        return StageResult("train-teacher", out, done["fingerprint"], True, done["details"])
    if _previous_inputs(cfg, "train-teacher") not in (None, key):  # inputs changed: its jobs are stale
        _reset(out)
    t0 = time.time()
    # Pending until every job is done: downstream refuses the old checkpoints meanwhile (same-key jobs that
    # completed are kept and resumed).
    _mark_pending(cfg, "train-teacher", key)
    folds = _folds(cfg)
    jobs = teacher_jobs(cfg, folds)
    run_jobs_on_ray(cfg, "teacher", jobs, callbacks=callbacks)
    from pkdot.train.jobs import teacher_checkpoints, teacher_cost

    metrics = {}
    for job in jobs:
        group = "" if job.group is None else f"_without{job.group}"  # cross-fitting teachers
        for k, v in json.loads((Path(job.out_dir) / "metrics.json").read_text()).items():
            metrics[f"fold{job.fold}_seed{job.seed}{group}/{k}"] = v
    checkpoints = [p for j in jobs for p in teacher_checkpoints(j)]
    fingerprint = _hash_files(checkpoints)
    _mark(
        cfg,
        "train-teacher",
        key,
        fingerprint,
        {"jobs": len(jobs), "cost": teacher_cost(jobs), "metrics": metrics},
        time.time() - t0,
        outputs=[*checkpoints, run_dir / "splits.json"],
    )
    _track_jobs(cfg, "train-teacher", jobs)
    details = {"jobs": len(jobs), "cost": teacher_cost(jobs), "metrics": metrics}
    return StageResult("train-teacher", out, fingerprint, False, details)


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
    """The output fingerprint of a completed stage (checked against its outputs on disk, see :func:`_upstream`)."""
    return _upstream(cfg, stage)


def stage_cache(cfg: RunConfig, upstream: str = "") -> StageResult:
    """Run each frozen teacher once over its fold's samples -> ``embeddings/fold-<k>-seed-<s>.parquet``."""
    from pkdot.train.cache import build_cache, cache_is_fresh, cache_path, crossfit_cost, crossfit_groups_of
    from pkdot.train.data import load_samples
    from pkdot.train.splits import load_fold_plan

    run_dir = _run_dir(cfg)
    key = _key(cfg, "cache", _upstream(cfg, "train-teacher", upstream))
    pairs = load_fold_plan(run_dir / "splits.json").pairs(cfg.train.seeds)  # each seed's own folds
    cf = crossfit_groups_of(cfg)
    paths = [cache_path(run_dir, f.index, s, cf) for s, f in pairs]
    done = _done(cfg, "cache", key)
    if done is not None and all(
        cache_is_fresh(run_dir, f.index, s, cf, cfg.distill.teacher_source) for s, f in pairs
    ):
        return StageResult("cache", run_dir / "embeddings", done["fingerprint"], True, done["details"])
    t0 = time.time()
    _mark_pending(cfg, "cache", key)
    samples = None
    built = 0
    for s, f in pairs:
        if cache_is_fresh(run_dir, f.index, s, cf, cfg.distill.teacher_source):
            continue
        if samples is None:
            samples = load_samples(cfg, run_dir)
        build_cache(cfg, samples, f.index, s)
        built += 1
    fingerprint = _hash_files(paths)
    details = {"files": len(paths), "built": built, **crossfit_cost(paths)}
    _mark(cfg, "cache", key, fingerprint, details, time.time() - t0, outputs=paths)
    return StageResult("cache", run_dir / "embeddings", fingerprint, False, details)


def stage_distill(
    cfg: RunConfig, upstream: str = "", *, losses: list[str] | None = None, callbacks=()
) -> StageResult:
    """One student per loss x fold x seed, from the cache, on Ray Train."""
    from pkdot.train.ray_runner import run_jobs_on_ray
    from pkdot.train.splits import load_fold_plan

    run_dir = _run_dir(cfg)
    losses = list(losses or cfg.distill.losses)
    key = _key(cfg, "distill", _upstream(cfg, "cache", upstream), losses=losses)
    out = run_dir / "student"
    done = _done(cfg, "distill", key)
    if done is not None:
        return StageResult("distill", out, done["fingerprint"], True, done["details"])
    if _previous_inputs(cfg, "distill") not in (None, key):
        for loss in losses:
            _reset(out / loss)
    t0 = time.time()
    _mark_pending(cfg, "distill", key)
    folds = load_fold_plan(run_dir / "splits.json")
    jobs = student_jobs(cfg, folds, losses)
    run_jobs_on_ray(cfg, "student", jobs, callbacks=callbacks)
    checkpoints = [Path(j.out_dir) / "student.pt" for j in jobs]
    fingerprint = _hash_files(checkpoints)
    details = {"jobs": len(jobs), "losses": losses}
    _mark(cfg, "distill", key, fingerprint, details, time.time() - t0, outputs=checkpoints)
    _track_jobs(cfg, "distill", jobs)
    return StageResult("distill", out, fingerprint, False, details)


def stage_evaluate(cfg: RunConfig, upstream: str = "", *, robustness: bool | None = None) -> StageResult:
    """Metrics, CIs, paired comparisons, report.md + plots; register the best student in MLflow.

    ``robustness``: also evaluate the video models on degraded test video (:mod:`pkdot.evaluate.robustness`);
    None = the config's choice (:attr:`RunConfig.robustness_curves`: on whenever the student watches video).
    """
    from pkdot.evaluate.report import evaluate_run

    if robustness is None:
        robustness = cfg.robustness_curves
    elif robustness and "video" not in cfg.data.student_modalities:
        raise ConfigError(
            f"evaluate --robustness: the student reads {cfg.data.student_modalities}; the robustness curves "
            "degrade test video"
        )
    run_dir = _run_dir(cfg)
    key = _key(cfg, "evaluate", _upstream(cfg, "distill", upstream))
    if robustness:  # a report with robustness curves is a different output
        key = hashlib.sha256(f"{key}|robustness".encode()).hexdigest()[:16]
    done = _done(cfg, "evaluate", key)
    if done is not None:
        return StageResult("evaluate", run_dir / "report", done["fingerprint"], True, done["details"])
    t0 = time.time()
    _mark_pending(cfg, "evaluate", key)
    summary = evaluate_run(cfg, run_dir, robustness=robustness)
    details: dict[str, Any] = {
        "report": str(summary.report_path),
        "best_student": summary.best_student,
        "summary_markdown": summary.report_path.read_text(),
    }
    details.update(_register_and_log(cfg, summary))
    fingerprint = _hash_files([summary.report_path])
    _mark(cfg, "evaluate", key, fingerprint, details, time.time() - t0, outputs=[summary.report_path])
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

    from pkdot.tracking import Tracker, resolve_public_uri, resolve_tracking_uri

    tracker = Tracker(cfg)
    report_dir = Path(summary.report_path).parent
    with tracker.stage_run("evaluate") as run:
        table = summary.table
        for _, row in table.iterrows():
            run.log_metrics({f"{row['model']}_mean": float(row["mean"])})
        if summary.robustness is not None:  # e.g. robustness/student-pkdot/frame_drop_0.3
            run.log_metrics(
                {
                    f"robustness/{r['model']}/{r['perturbation']}_{r['level']:g}": float(r["mean"])
                    for _, r in summary.robustness.iterrows()
                }
            )
        run.log_artifacts(report_dir, artifact_path="report")
        eval_run_id = run.run_id
    details: dict[str, Any] = {
        "mlflow_run_id": tracker.parent_run_id(),
        "evaluate_run_id": eval_run_id,
        "tracking_uri": resolve_tracking_uri(cfg),
        "experiment_id": tracker.experiment_id,
        "mlflow_ui": resolve_public_uri(cfg),
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
    metric = str(row["metric"])
    # The registered model's own scores (its fold and seed): the champion is chosen on its validation score;
    # its test scores and the loss's mean over every run are recorded next to it.
    own = json.loads((_job_dir(cfg, loss, fold, seed) / "metrics.json").read_text())
    scores = {f"test_{metric}": float(own[f"test_{metric}"])}
    per_run = summary.per_fold
    mine = per_run[
        (per_run["model"] == summary.best_student) & (per_run["fold"] == fold) & (per_run["seed"] == seed)
    ]
    if len(mine) == 1:  # every test metric of that run (macro-F1, MAE, ...)
        for col in ("accuracy", "macro_f1", "ccc", "mae", "rmse", "pearson"):
            if col in mine.columns and np.isfinite(float(mine[col].iloc[0])):
                scores[f"test_{col}"] = float(mine[col].iloc[0])
    scores[f"mean_test_{metric}_over_runs"] = float(row["mean"])
    reg = tracker.register_student(
        student,
        example,
        metric_name=f"val_{metric}",
        metric_value=float(own[f"val_{metric}"]),
        higher_is_better=True,
        extra_artifacts=[_run_dir(cfg) / "config.yaml"],
        dataset=cfg.data.dataset,
        scores=scores,
        datasets=_split_datasets(cfg, fold, seed),
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


def _job_dir(cfg: RunConfig, loss: str, fold: int, seed: int) -> Path:
    from pkdot.train.student import student_dir

    return student_dir(_run_dir(cfg), loss, fold, seed)


def _split_datasets(cfg: RunConfig, fold: int, seed: int) -> list:
    """The manifest rows of (fold, seed)'s train / validation / test subjects, as MLflow dataset inputs.

    Named ``<dataset>-fold<k>-seed<s>-<split>``; the digest hashes the manifest's fingerprint (its rows and the
    identity of every recording) with the split's sample ids.
    """
    from pkdot.data.manifest import read_manifest
    from pkdot.tracking import DatasetSplit
    from pkdot.train.splits import load_fold_plan

    run_dir = _run_dir(cfg)
    manifest_path = run_dir / "manifest.parquet"
    manifest = read_manifest(manifest_path)
    subjects = load_fold_plan(run_dir / "splits.json").fold(seed, fold)
    marker = _read_marker(cfg, "manifest") or {}
    splits = []
    for split, context in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = manifest[manifest["subject_id"].astype(str).isin(set(getattr(subjects, split)))]
        rows = rows.reset_index(drop=True)
        ids = ",".join(sorted(rows["sample_id"].astype(str)))
        digest = hashlib.sha256(f"{marker.get('fingerprint', '')}|{ids}".encode()).hexdigest()[:16]
        splits.append(
            DatasetSplit(
                name=f"{cfg.data.dataset}-fold{fold}-seed{seed}-{split}",
                context=context,
                frame=rows,
                source=str(manifest_path),
                digest=digest,
            )
        )
    return splits


def _best_student_job(cfg: RunConfig, loss: str) -> tuple[int, int]:
    """The (fold, seed) of ``loss`` whose student had the best *validation* metric (never the test fold)."""
    from pkdot.train.splits import load_fold_plan
    from pkdot.train.student import student_dir

    best, best_key = -float("inf"), None
    metric = "val_ccc" if cfg.data.is_regression else "val_accuracy"
    for s, f in load_fold_plan(_run_dir(cfg) / "splits.json").pairs(cfg.train.seeds):
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
        log.info("stage %s ...", name)
        t0 = time.time()
        res = fn(cfg, upstream)
        status.info(
            "stage %s %s in %.1fs", name, "skipped (up to date)" if res.skipped else "done", time.time() - t0
        )
        results[name] = res
        upstream = res.fingerprint
    return results
