"""Speed benchmark: each stage's throughput, OT solvers, and how the whole demo grows with the data set.

Measured in one invocation (so the ratios share the machine's state), printed as tables at the end and
written to ``benchmarks/results/speed.md`` with the date and the machine:

1. **Scaling** -- the whole demo pipeline (``pkdot run --no-prefect`` with the demo preset: synthetic data,
   extract, teacher, cache, 8 students, evaluate + registration) on synthetic Biovid sets of ``--subjects``
   (default 5, 10, 20) subjects, each in a fresh process; wall time per stage and the ratio to the smallest.
2. **Extraction throughput** -- face frames/s and physio windows/s per worker, from the extraction report of
   the middle scaling run (the same figures as ``bench_extract.py``).
3. **Ray Train workers** -- the teacher and distill stages (the ones on Ray Train) of the middle run again
   with ``train.num_workers=1`` (on the same features, Ray already up) against the demo's setting (0: Ray Train's
   local mode; a preset with 1 is compared with 2).
4. **Training throughput** -- samples/s of one training epoch (forward + backward + step) of the unimodal
   backbones and the fusion teacher on fold 0 of the middle run; the student from the embedding cache vs with
   a live teacher forward (``bench_cache.py``, run as a child process).
5. **OT loss** -- forward + backward of the Sinkhorn divergence on PKDOT clouds (k = 30) for B in
   {64, 128, 256}: ours vs GeomLoss vs POT (the closures of ``bench_ot.py``).

Usage::

    python benchmarks/speed.py               # ~10-15 min on 2 CPU cores
    python benchmarks/speed.py --quick       # tiny sizes, ~3 min
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402  (the benchmarks folder is not a package)
    BENCH_DIR,
    RESULTS_DIR,
    STAGES_TO_REPORT,
    link_upstream,
    machine_info,
    machine_markdown,
    markdown_table,
    quiet_environment,
    write_result,
)

from pkdot.errors import StageError  # noqa: E402
from pkdot.rundir import atomic_write_text  # noqa: E402

logger = logging.getLogger(__name__)

PIPELINE_STAGES = STAGES_TO_REPORT
RETRAIN_STAGES = ("train-teacher", "cache", "distill")
#: The stages whose jobs run on Ray Train workers (the cache is built in the driver process).
RAY_TRAIN_STAGES = ("train-teacher", "distill")
#: Tiny model/data sizes for ``--quick`` (on top of the demo preset).
QUICK_OVERRIDES: dict[str, Any] = {
    "synth.samples_per_class": 2,
    "synth.frame_size": 64,
    "synth.fps": 25,  # at 64 px the demo's 10 fps left a subject's 4 sampled frames without a detectable face
    "features.n_frames": 4,
    "features.crop_size": 32,
    "train.folds": 2,
    "train.epochs_unimodal": 1,
    "train.epochs_teacher": 1,
    "train.epochs_tnet": 1,
    "train.epochs_student": 2,
}


def _marker_seconds(run_dir: Path, stage: str) -> float:
    path = Path(run_dir) / "stages" / f"{stage}.json"
    if not path.is_file():
        raise StageError(f"{path} does not exist: stage {stage!r} did not complete")
    return float(json.loads(path.read_text())["seconds"])


# ---- child processes -------------------------------------------------------------------------------------------
def child_pipeline(run_dir: Path, subjects: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """The whole demo on ``subjects`` synthetic subjects (fresh process): seconds per stage."""
    from pkdot.config import load_config
    from pkdot.pipeline import prepare_run, run_all

    cfg = load_config(
        preset="demo", overrides={"run_dir": str(run_dir), "synth.subjects": subjects, **overrides}
    )
    start = time.perf_counter()
    cfg = prepare_run(cfg)
    synth = time.perf_counter() - start
    results = run_all(cfg)
    total = time.perf_counter() - start
    skipped = [name for name, res in results.items() if res.skipped]
    if skipped:
        raise StageError(
            f"{run_dir}: stages {skipped} were up to date; the scaling runs need a fresh directory"
        )
    return {
        "subjects": subjects,
        "samples": int(results["manifest"].details["samples"]),
        "synthetic_s": synth,
        "stages": {s: _marker_seconds(run_dir, s) for s in PIPELINE_STAGES},
        "total_s": total,
        "train_workers": cfg.train.num_workers,
        "folds": len(json.loads((Path(run_dir) / "splits.json").read_text())),
        "seeds": len(cfg.train.seeds),
    }


def child_retrain(base_run: Path, run_dir: Path, workers: int) -> dict[str, Any]:
    """Teacher, cache and distill stages of ``base_run`` again with ``workers`` Ray Train workers.

    The run directory links the base run's manifest and features (and their stage markers); Ray is started
    before the clock so that, as in the base run (where extraction started it), the stages do not pay for it.
    """
    from pkdot.config import load_config
    from pkdot.pipeline import run_stage
    from pkdot.ray_utils import ensure_ray

    cfg = load_config(
        base_run / "config.yaml", overrides={"run_dir": str(run_dir), "train.num_workers": workers}
    )
    link_upstream(
        base_run, run_dir, entries=("manifest.parquet", "features"), stage_markers=("manifest", "extract")
    )
    atomic_write_text(run_dir / "config.yaml", cfg.yaml_text())
    ensure_ray(num_cpus=None, address=cfg.ray_address)
    up = run_stage("train-teacher", cfg, _marker_fingerprint(run_dir, "extract")).fingerprint
    up = run_stage("cache", cfg, up).fingerprint
    run_stage("distill", cfg, up)
    return {"workers": workers, "stages": {s: _marker_seconds(run_dir, s) for s in RETRAIN_STAGES}}


def _marker_fingerprint(run_dir: Path, stage: str) -> str:
    return str(json.loads((Path(run_dir) / "stages" / f"{stage}.json").read_text())["fingerprint"])


def _run_child(args: list[str]) -> dict[str, Any]:
    """Run ``speed.py --child ...`` in a fresh process; return the JSON it prints on its ``BENCH`` line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise StageError(f"benchmark child failed (exit {proc.returncode}): {shlex.join(cmd)}")
    return json.loads(line[len("BENCH ") :])


# ---- in-process measurements -----------------------------------------------------------------------------------
def extraction_throughput(run_dir: Path) -> dict[str, float]:
    """Face frames/s and physio windows/s per extraction worker (summed shard times), from the run's report."""
    report = json.loads((Path(run_dir) / "features" / "extract_report.json").read_text())
    times = report["time_s"]
    physio_ok = report["counts"].get("physio", {}).get("ok", 0)
    return {
        "samples": report["n_written"],
        "workers": report["workers"],
        "face_frames": report["sampled_frames"],
        "face_frames_per_s_per_worker": report["sampled_frames"] / max(times["video"], 1e-9),
        "physio_windows": physio_ok,
        "physio_windows_per_s_per_worker": physio_ok / max(times["physio"], 1e-9),
        "extract_wall_s": times["extract_wall"],
        "face_detection_rate": report["face_detection_rate"],
    }


def training_throughput(run_dir: Path, epochs: int = 5) -> list[dict[str, Any]]:
    """Samples/s of one training epoch (forward, backward, optimiser step) per model of the teacher stage.

    Fold 0 of ``run_dir``; models built by :mod:`pkdot.models` with the run's sizes; batches of
    ``train.teacher_batch_size``; one warm-up epoch, then the median of ``epochs`` epochs. Runs on CUDA when
    available (``train.use_gpu`` "auto"), else on the CPU with torch's default thread count.
    """
    import torch

    from pkdot.config import load_config
    from pkdot.folds import load_folds
    from pkdot.models import UnimodalModel, build_backbone, build_teacher
    from pkdot.train.data import load_samples, split_fold
    from pkdot.train.loops import epoch_batches, task_loss, train_epoch

    cfg = load_config(Path(run_dir) / "config.yaml", overrides={"run_dir": str(run_dir)})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = split_fold(load_samples(cfg, run_dir), load_folds(Path(run_dir) / "splits.json")[0])
    train, shapes = data.train, data.train.input_shapes
    regression, n_out, b = cfg.data.is_regression, cfg.data.num_outputs, cfg.train.teacher_batch_size
    targets = torch.from_numpy(train.targets).to(device)
    torch.manual_seed(0)
    # name -> (model, its input modality; None = the fusion teacher, which takes every modality as a dict)
    models: dict[str, tuple[torch.nn.Module, str | None]] = {
        f"unimodal-{m}": (UnimodalModel(build_backbone(m, shapes[m], cfg.model), n_out, regression), m)
        for m in cfg.data.modalities
    }
    models["teacher (fusion)"] = (build_teacher(cfg, shapes, seed=0), None)
    rows = []
    for name, (model, modality) in models.items():
        model.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(index, model=model, modality=modality):
            x = {m: torch.from_numpy(train.arrays[m][index]).to(device) for m in cfg.data.modalities}
            out = model(x if modality is None else x[modality])
            return {"loss": task_loss(out.logits, targets[index], regression)}

        times = []
        for epoch in range(epochs + 1):
            batches = epoch_batches(len(train), b, seed=0, epoch=epoch)
            start = time.perf_counter()
            train_epoch(step, optimizer, batches, modules=[model])
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        n = sum(len(i) for i in epoch_batches(len(train), b, seed=0, epoch=0))
        epoch_s = statistics.median(times[1:])
        rows.append(
            {
                "model": name,
                "samples_per_epoch": n,
                "epoch_s": epoch_s,
                "samples_per_s": n / epoch_s,
                "device": str(device),
            }
        )
    return rows


def student_cache_throughput(run_dir: Path, epochs: int) -> dict[str, float]:
    """``bench_cache.py --run RUN``: student epoch from the embedding cache vs with a live teacher forward."""
    cmd = [sys.executable, str(BENCH_DIR / "bench_cache.py"), "--run", str(run_dir), "--epochs", str(epochs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    text = proc.stdout
    head = re.search(r"student epoch \((\d+) training samples, batch (\d+), loss (\w+)", text)
    live = re.search(r"live teacher forward\s+([\d.]+)", text)
    cached = re.search(r"embedding cache\s+([\d.]+)", text)
    if proc.returncode != 0 or not (head and live and cached):
        sys.stderr.write(text[-3000:] + proc.stderr[-3000:])
        raise StageError(f"{shlex.join(cmd)} failed or printed no timing table (exit {proc.returncode})")
    n = int(head.group(1))
    live_s, cached_s = float(live.group(1)), float(cached.group(1))
    return {
        "samples": n,
        "batch": int(head.group(2)),
        "loss": head.group(3),
        "live_epoch_s": live_s,
        "cached_epoch_s": cached_s,
        "live_samples_per_s": n / live_s,
        "cached_samples_per_s": n / cached_s,
        "speedup": live_s / cached_s,
    }


def ot_timings(sizes: Sequence[int], repeats: int, pot_repeats: int, k: int = 30) -> list[dict[str, Any]]:
    """Median ms of forward + backward per solver and batch size (``bench_ot``'s closures, interleaved)."""
    import bench_ot

    warnings.filterwarnings("ignore", message="Sinkhorn did not converge")  # POT at its iteration cap
    rows = []
    for size in sizes:
        methods = bench_ot._ot_methods(size, k, 0.1, 0.5, 0, 1000)
        reference = methods["geomloss"]().item()
        rel = {
            n: abs(methods[n]().item() - reference) / abs(reference) for n in ("ours", "pot-log", "pot-emp")
        }
        times = bench_ot._interleaved({n: methods[n] for n in ("ours", "geomloss", "pkdot_loss")}, repeats, 3)
        times.update(bench_ot._interleaved({n: methods[n] for n in ("pot-log", "pot-emp")}, pot_repeats, 0))
        med = {n: 1e3 * statistics.median(t) for n, t in times.items()}
        rows.append(
            {
                "B": size,
                **{f"{n}_ms": v for n, v in med.items()},
                "ours_over_geomloss": med["ours"] / med["geomloss"],
                **{f"rel_diff_{n}": v for n, v in rel.items()},
            }
        )
    return rows


# ---- the report --------------------------------------------------------------------------------------------------
def _f(x: float, d: int = 1) -> str:
    return f"{x:.{d}f}"


def _workers(n: str) -> str:
    return "local mode (0 workers)" if n == "0" else f"{n} worker(s)"


def report_markdown(results: dict[str, Any], machine: dict[str, Any], command: str, wall_s: float) -> str:
    """All tables as Markdown."""
    scaling = results["scaling"]
    small = scaling[0]
    lines = [
        "# Speed benchmark",
        "",
        machine_markdown(machine),
        f"- Command: `{command}`",
        f"- Load average (1/5/15 min) when it ended: {machine.get('load_average_end')}",
        f"- Total wall time of the benchmark: {wall_s / 60:.1f} min. Timings on a shared machine are noisy; "
        "all ratios below come from this one invocation.",
        "",
    ]
    demo = scaling[0]
    lines += [
        "## Whole demo vs data-set size",
        "",
        f"The demo pipeline (preset `demo`, {demo['folds']} folds x {demo['seeds']} seed, 8 students, "
        f"train.num_workers = {demo['train_workers']}; stages called directly as `pkdot run --no-prefect`, so "
        "without Prefect's constant start-up) in a fresh process per size. Seconds.",
        "",
        markdown_table(
            [
                "subjects",
                "samples",
                "synthetic data",
                *PIPELINE_STAGES,
                "total",
                "x smallest (total)",
                "x smallest (pipeline)",
            ],
            [
                [
                    r["subjects"],
                    r["samples"],
                    _f(r["synthetic_s"]),
                    *(_f(r["stages"][s]) for s in PIPELINE_STAGES),
                    _f(r["total_s"]),
                    _f(r["total_s"] / small["total_s"], 2),
                    _f((r["total_s"] - r["synthetic_s"]) / (small["total_s"] - small["synthetic_s"]), 2),
                ]
                for r in scaling
            ],
        ),
    ]
    ex = results["extraction"]
    lines += [
        "",
        "## Stage throughput",
        "",
        markdown_table(
            ["stage", "measure", "value"],
            [
                [
                    "extract (faces)",
                    f"face frames/s per worker ({ex['face_frames']} frames, {ex['workers']} workers)",
                    _f(ex["face_frames_per_s_per_worker"]),
                ],
                [
                    "extract (physio)",
                    f"physio windows/s per worker ({ex['physio_windows']} windows)",
                    _f(ex["physio_windows_per_s_per_worker"]),
                ],
                *[
                    [
                        f"train-teacher ({r['model']})",
                        f"training samples/s, {r['device']} ({r['samples_per_epoch']} samples/epoch)",
                        _f(r["samples_per_s"]),
                    ]
                    for r in results["training"]
                ],
                [
                    "distill (student, embedding cache)",
                    f"training samples/s ({results['student']['samples']} samples/epoch, loss "
                    f"{results['student']['loss']}, 1 thread)",
                    _f(results["student"]["cached_samples_per_s"]),
                ],
                [
                    "distill (student, live teacher)",
                    "training samples/s (frozen teacher forward each batch)",
                    _f(results["student"]["live_samples_per_s"]),
                ],
                [
                    "distill",
                    "speed-up of the embedding cache over a live teacher",
                    f"{results['student']['speedup']:.1f}x",
                ],
            ],
        ),
    ]
    w = results["workers"]
    counts = sorted((k for k in w if k != "subjects"), key=int)
    lines += [
        "",
        f"## Ray Train workers ({w['subjects']} subjects)",
        "",
        f"The stages that run on Ray Train, again on the same features with {' and '.join(counts)} workers "
        "(seconds; Ray already running, so its start-up is not counted).",
        "",
        markdown_table(
            ["stage", *(_workers(n) for n in counts), f"{_workers(counts[-1])} / {_workers(counts[0])}"],
            [
                [s, *(_f(w[n][s]) for n in counts), _f(w[counts[-1]][s] / w[counts[0]][s], 2)]
                for s in RAY_TRAIN_STAGES
            ],
        ),
    ]
    lines += [
        "",
        "## OT loss: forward + backward on PKDOT clouds (k = 30, blur 0.1, eps-scaling 0.5)",
        "",
        'Median ms. `ours` = `pkdot.distill.ot.sinkhorn_divergence`; `geomloss` = `SamplesLoss("sinkhorn")`; '
        "`pot-log`/`pot-emp` = POT's log-domain Sinkhorn (debiased, capped at 1000 iterations: no "
        "eps-scaling); `pkdot_loss` = structures + anchors + OT. rel. diff = |value - geomloss| / geomloss.",
        "",
        markdown_table(
            [
                "B",
                "ours",
                "geomloss",
                "pot-log",
                "pot-emp",
                "pkdot_loss",
                "ours / geomloss",
                "rel. diff ours",
                "rel. diff pot-log",
            ],
            [
                [
                    r["B"],
                    _f(r["ours_ms"], 2),
                    _f(r["geomloss_ms"], 2),
                    _f(r["pot-log_ms"], 1),
                    _f(r["pot-emp_ms"], 1),
                    _f(r["pkdot_loss_ms"], 2),
                    _f(r["ours_over_geomloss"], 2),
                    f"{r['rel_diff_ours']:.1e}",
                    f"{r['rel_diff_pot-log']:.1e}",
                ]
                for r in results["ot"]
            ],
        ),
    ]
    text = "\n".join(lines) + "\n"
    if "concurrency" in results:
        text += "\n" + concurrency_markdown(results["concurrency"])
        text += "\n" + cost_markdown(results["paper_costs"], results["cost_model"])
    return text


# ---- concurrent jobs and the cost model (issue 13) ------------------------------------------------------------
#: Biovid Part A, binary BL1 vs PA4: 87 subjects x 20 samples per class; LOSO = 87 folds.
BIOVID_A = {"subjects": 87, "samples_per_subject": 40}
#: Named assumptions of the cost model (no GPU was measured here): dense BF16 peak of one H100 SXM and the
#: fraction of it a 3D-CNN training step reaches (model FLOPs utilisation), and the read bandwidth of the
#: shared storage a job loads its feature table from.
GPU_PEAK_FLOPS = 989e12
GPU_MFU = 0.30
STORAGE_BYTES_PER_S = 1e9


#: The concurrent-jobs section's ways: (name, train.max_concurrent_jobs -- None: in-process, no Ray --,
#: train.num_workers -- 0: Ray Train's local mode, the Ray task trains without a worker group).
WAYS: tuple[tuple[str, int | None, int], ...] = (("local", None, 1), ("1", 1, 1), ("2", 2, 1), ("lm2", 2, 0))


def child_concurrency(
    base_run: Path, work: Path, n_jobs: int, ways: Sequence[tuple[str, int | None, int]] = WAYS
) -> dict[str, Any]:
    """``n_jobs`` student jobs of ``base_run`` four ways: in-process without Ray, as Ray Train runs (1 worker
    each) with 1 and then 2 runs at once, and 2 at once in local mode (no worker group). Ray is started before
    the clock; each way in a fresh sibling run directory that links the base run's teacher and embedding cache.

    Returns per way the wall seconds, and per job the in-process seconds and the Ray run's seconds (task wall
    time: Ray Train's start-up + the job).
    """
    from pkdot.config import load_config
    from pkdot.folds import load_folds
    from pkdot.ray_utils import ensure_ray
    from pkdot.train.jobs import WorkerContext, student_jobs
    from pkdot.train.ray_runner import job_inputs, run_job, run_jobs_on_ray

    base = load_config(base_run / "config.yaml", overrides={"run_dir": str(base_run)})
    out: dict[str, Any] = {"n_jobs": n_jobs, "ways": {}}
    if any(concurrent is not None for _, concurrent, _ in ways):
        ensure_ray(num_cpus=None, address=base.ray_address)
        import ray

        out["cpus"] = ray.cluster_resources().get("CPU", 0.0)
    for way, concurrent, workers in ways:
        run_dir = work / f"concurrency-{way}"
        link_upstream(base_run, run_dir)
        cfg = load_config(
            base_run / "config.yaml",
            overrides={
                "run_dir": str(run_dir),
                "train.num_workers": workers,
                "train.jobs_per_run": 1,  # one Ray Train run per job: what this section measures
                "train.max_concurrent_jobs": concurrent,
            },
        )
        atomic_write_text(run_dir / "config.yaml", cfg.yaml_text())
        jobs = student_jobs(cfg, load_folds(run_dir / "splits.json"), list(cfg.distill.losses))[:n_jobs]
        if len(jobs) < n_jobs:
            raise StageError(f"{base_run} has only {len(jobs)} student jobs, {n_jobs} asked for")
        start = time.perf_counter()
        if concurrent is None:
            per_job = {}
            for job in jobs:
                t0 = time.perf_counter()  # what a Ray Train worker does for one job, in this process
                samples, plan = job_inputs(cfg, "student")
                run_job(cfg, "student", job, samples, plan, WorkerContext())
                per_job[job.key] = time.perf_counter() - t0
        else:
            runs = run_jobs_on_ray(cfg, "student", jobs)
            per_job = {r["jobs"][0]: r["seconds"] for r in runs}
        out["ways"][way] = {"wall_s": time.perf_counter() - start, "per_job_s": per_job}
        print(f"[speed]   {n_jobs} student jobs, {way}: {out['ways'][way]['wall_s']:.1f} s", flush=True)
    first = jobs[0]
    out["job_samples"] = _student_job_samples(work / "concurrency-local", first)
    out["epochs_student"] = cfg.train.epochs_student
    return out


def _student_job_samples(run_dir: Path, job: Any) -> int:
    """Training samples of one student job (its history's first epoch record, else the fold's train split)."""
    from pkdot.folds import load_folds

    folds = {f.index: f for f in load_folds(run_dir / "splits.json")}
    import pandas as pd

    manifest = pd.read_parquet(run_dir / "manifest.parquet", columns=["subject_id"])
    return int(manifest["subject_id"].isin(set(folds[job.fold].train)).sum())


def paper_model_costs(base_run: Path, batch: int = 2) -> dict[str, Any]:
    """FLOPs per sample (torch's ``FlopCounterMode``) of the paper preset's models, and this CPU's measured
    seconds for one forward + backward of the video model.

    Shapes: video ``(10, 112, 112, 3)`` (paper preset), physio as extracted in ``base_run``. Returns, per model
    (``unimodal-video``, ``unimodal-physio``, ``teacher``), forward+backward and forward-only FLOPs per sample,
    and ``cpu_video_fwd_bwd_s`` per sample.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pkdot.config import load_config
    from pkdot.models import UnimodalModel, build_backbone, build_teacher
    from pkdot.train.data import load_samples

    base = load_config(base_run / "config.yaml", overrides={"run_dir": str(base_run)})
    cfg = load_config(preset="paper", overrides={"run_dir": str(base_run)})
    shapes = dict(load_samples(base, base_run).input_shapes)
    shapes["video"] = (cfg.features.n_frames, cfg.features.crop_size, cfg.features.crop_size, 3)
    shapes = {m: shapes[m] for m in cfg.data.modalities}
    n_out, regression = cfg.data.num_outputs, cfg.data.is_regression
    torch.manual_seed(0)
    models: dict[str, tuple[torch.nn.Module, str | None]] = {
        f"unimodal-{m}": (UnimodalModel(build_backbone(m, shapes[m], cfg.model), n_out, regression), m)
        for m in shapes
    }
    models["teacher"] = (build_teacher(cfg, shapes, seed=0), None)

    def inputs() -> dict[str, torch.Tensor]:
        x = {}
        for m, s in shapes.items():
            if m == "video":
                x[m] = torch.randint(0, 255, (batch, *s), dtype=torch.uint8)
            else:
                x[m] = torch.randn(batch, *s)
        return x

    costs: dict[str, Any] = {"batch": batch, "shapes": {m: list(s) for m, s in shapes.items()}}
    for name, (model, modality) in models.items():
        x = inputs()
        arg = x if modality is None else x[modality]
        with FlopCounterMode(display=False) as fwd:
            model(arg).logits.sum()
        with FlopCounterMode(display=False) as both:
            model(arg).logits.sum().backward()
        costs[name] = {
            "fwd_flops": fwd.get_total_flops() / batch,
            "fwd_bwd_flops": both.get_total_flops() / batch,
        }
    video, _ = models["unimodal-video"]
    x = inputs()["video"]
    video(x).logits.sum().backward()  # warm-up
    start = time.perf_counter()
    video(x).logits.sum().backward()
    costs["cpu_video_fwd_bwd_s"] = (time.perf_counter() - start) / batch
    costs["cpu_flops_per_s"] = costs["unimodal-video"]["fwd_bwd_flops"] / costs["cpu_video_fwd_bwd_s"]
    costs["paper"] = {
        "epochs_unimodal": cfg.train.epochs_unimodal,
        "epochs_teacher": cfg.train.epochs_teacher,
        "epochs_tnet": cfg.train.epochs_tnet,
        "epochs_student": cfg.train.epochs_student,
        "losses": list(cfg.distill.losses),
        "seeds": list(cfg.train.seeds),
        "val_fraction": cfg.train.val_fraction,
        "student_init": cfg.train.student_init,
    }
    return costs


def loso_cost_model(
    costs: dict[str, Any],
    concurrency: dict[str, Any],
    student_samples_per_s: float,
    gpus: Sequence[int] = (1, 8, 64),
) -> dict[str, Any]:
    """Wall time of Biovid Part A LOSO with the paper preset on ``gpus`` GPUs (arithmetic, stated assumptions).

    Per fold: ``n_train`` = 69 training subjects x 40 samples (86 minus the 20 % validation subjects), ``n_val``
    = 17 x 40. Teacher job FLOPs = epochs_unimodal x n_train x (video + physio fwd+bwd) + epochs_teacher x
    n_train x teacher fwd+bwd + epochs_tnet x n_train x teacher fwd (T-Net on frozen features) + a validation
    forward each epoch; seconds = FLOPs / (GPU_PEAK_FLOPS x GPU_MFU) + the feature table's read time +
    Ray Train's measured start-up per run. A student job (from the embedding cache) costs its measured fixed
    part (a tiny job in-process) + epochs x n_train / ``student_samples_per_s`` (measured on this CPU: a
    conservative bound, it may as well run on a GPU) + the start-up per run. The
    cache is one teacher forward over every sample per fold, in the driver (one device). Jobs of a stage run
    in waves of ``gpus`` (1 job = 1 worker = 1 GPU): wall = ceil(jobs / gpus) x job seconds.
    """
    import math
    import statistics as st

    paper = costs["paper"]
    folds = BIOVID_A["subjects"]
    per_subject = BIOVID_A["samples_per_subject"]
    val_subjects = round((folds - 1) * paper["val_fraction"])
    n_train = (folds - 1 - val_subjects) * per_subject
    n_val = val_subjects * per_subject
    n_all = folds * per_subject
    v, p, t = costs["unimodal-video"], costs["unimodal-physio"], costs["teacher"]
    teacher_flops = (
        paper["epochs_unimodal"] * (n_train * (v["fwd_bwd_flops"] + p["fwd_bwd_flops"]))
        + paper["epochs_unimodal"] * n_val * (v["fwd_flops"] + p["fwd_flops"])
        + paper["epochs_teacher"] * (n_train * t["fwd_bwd_flops"] + n_val * t["fwd_flops"])
        + paper["epochs_tnet"] * (n_train + n_val) * t["fwd_flops"]
    )
    gpu_flops = GPU_PEAK_FLOPS * GPU_MFU
    video_bytes = n_all * math.prod(costs["shapes"]["video"])
    local = concurrency["ways"]["local"]["per_job_s"]
    on_ray = concurrency["ways"]["1"]["per_job_s"]
    overhead = st.median(on_ray[k] - local[k] for k in local if k in on_ray)
    frozen = paper.get("student_init", "teacher-frozen") == "teacher-frozen"
    if frozen:  # from the embedding cache: measured fixed part + samples at the cached student's CPU rate
        student_flops = 0.0
        student_s = st.median(local.values()) + n_train * paper["epochs_student"] / student_samples_per_s
    else:  # the student trains its own video backbone on the face crops: the video model's FLOPs, as a teacher
        student_flops = paper["epochs_student"] * (n_train * v["fwd_bwd_flops"] + n_val * v["fwd_flops"])
        student_s = student_flops / gpu_flops + video_bytes / STORAGE_BYTES_PER_S
    teacher_s = teacher_flops / gpu_flops + video_bytes / STORAGE_BYTES_PER_S
    cache_s = folds * n_all * t["fwd_flops"] / gpu_flops
    n_teacher = folds * len(paper["seeds"])
    n_student = n_teacher * len(paper["losses"])
    rows = []
    for g in gpus:
        teacher_wall = math.ceil(n_teacher / g) * (teacher_s + overhead)
        student_wall = math.ceil(n_student / g) * (student_s + overhead)
        bundled = math.ceil(n_teacher / g) * (len(paper["losses"]) * student_s + overhead)
        rows.append(
            {
                "gpus": g,
                "teacher_h": teacher_wall / 3600,
                "cache_h": cache_s / 3600,
                "students_h": student_wall / 3600,
                "students_bundled_h": bundled / 3600,
                "total_h": (teacher_wall + cache_s + min(student_wall, bundled)) / 3600,
            }
        )
    cpu_teacher_h = teacher_flops / costs["cpu_flops_per_s"] / 3600
    return {
        "n_train": n_train,
        "n_val": n_val,
        "teacher_jobs": n_teacher,
        "student_jobs": n_student,
        "teacher_tflops_per_job": teacher_flops / 1e12,
        "teacher_job_s": teacher_s,
        "student_job_s": student_s,
        "student_init": paper.get("student_init", "teacher-frozen"),
        "student_tflops_per_job": student_flops / 1e12,
        "student_samples_per_s": student_samples_per_s,
        "ray_run_overhead_s": overhead,
        "cache_s": cache_s,
        "cpu_teacher_job_h": cpu_teacher_h,
        "rows": rows,
    }


def concurrency_markdown(conc: dict[str, Any]) -> str:
    ways = conc["ways"]
    one, two = ways["1"]["wall_s"], ways["2"]["wall_s"]
    lines = [
        "## Concurrent training jobs",
        "",
        f"{conc['n_jobs']} independent student jobs (tiny: {conc['job_samples']} training samples, "
        f"{conc['epochs_student']} epochs, from the embedding cache) run as one Ray Train run each (1 worker of "
        f"1 CPU) with `train.max_concurrent_jobs` = 1 and = 2 on a local Ray of {conc['cpus']:.0f} CPUs, 2 at once in "
        "Ray Train's local mode (`train.num_workers` = 0: the Ray task of 1 CPU trains, no worker group), and the "
        "same jobs in-process without Ray (the function each Ray Train worker calls, `run_job`). Ray is up before "
        "the clock starts. Seconds.",
        "",
        markdown_table(
            ["way", "wall", "median per job", "x (1 at a time)"],
            [
                [
                    {
                        "local": "in-process, no Ray",
                        "1": "Ray, 1 at a time",
                        "2": "Ray, 2 at once",
                        "lm2": "Ray local mode, 2 at once",
                    }[w],
                    _f(ways[w]["wall_s"]),
                    _f(statistics.median(ways[w]["per_job_s"].values()), 2),
                    _f(ways[w]["wall_s"] / one, 2),
                ]
                for w in ("local", "1", "2", "lm2")
                if w in ways
            ],
        ),
        "",
        f"2 concurrent / 1 at a time = **{two / one:.2f}** (wall). A Ray Train run's own start-up (controller, "
        "worker group, placement group, process group: the Ray per-job time minus the in-process time) is "
        f"{statistics.median(ways['1']['per_job_s'][k] - t for k, t in ways['local']['per_job_s'].items()):.1f} s "
        "here, which is why tiny jobs are better bundled (`train.jobs_per_run`)"
        + (
            f"; local mode does without it: 2 at once in local mode / 2 at once with a worker group = "
            f"**{ways['lm2']['wall_s'] / two:.2f}** (wall)."
            if "lm2" in ways
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def cost_markdown(costs: dict[str, Any], model: dict[str, Any]) -> str:
    paper = costs["paper"]
    lines = [
        "## Cost model: Biovid Part A LOSO, paper preset",
        "",
        f"Arithmetic, not a measurement on a GPU (none was available). 87 folds x {len(paper['seeds'])} seed: "
        f"{model['teacher_jobs']} teacher jobs, then {model['student_jobs']} student jobs "
        f"({len(paper['losses'])} losses); per fold {model['n_train']} training and {model['n_val']} validation "
        f"samples; {paper['epochs_unimodal']}/{paper['epochs_teacher']}/{paper['epochs_tnet']}/"
        f"{paper['epochs_student']} epochs (unimodal/teacher/T-Net/student).",
        "",
        "Measured here: FLOPs per sample of the paper models (`torch.utils.flop_counter`, video "
        f"{costs['shapes']['video']}): video fwd+bwd {costs['unimodal-video']['fwd_bwd_flops'] / 1e9:.1f} GFLOP, "
        f"teacher fwd+bwd {costs['teacher']['fwd_bwd_flops'] / 1e9:.1f} GFLOP; this CPU runs the video model at "
        f"{costs['cpu_flops_per_s'] / 1e9:.1f} GFLOP/s (one teacher job would take "
        f"{model['cpu_teacher_job_h']:.1f} h on it); a Ray Train run's start-up "
        f"{model['ray_run_overhead_s']:.1f} s; a tiny student job in-process and the student's training samples/s "
        "from the embedding cache (sections above).",
        "",
        f"Assumed (named factors in `benchmarks/speed.py`): GPU = {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s BF16 peak "
        f"(H100 SXM) x MFU {GPU_MFU} ; feature table read at {STORAGE_BYTES_PER_S / 1e9:.0f} GB/s from shared "
        "storage; one job = one worker = one GPU; jobs of a stage run in waves (ceil(jobs / GPUs)); the cache "
        "stage runs in the driver on one GPU; no cross-fitting. Per teacher job: "
        f"{model['teacher_tflops_per_job']:.0f} TFLOP = {model['teacher_job_s'] / 60:.1f} min on one GPU; per "
        f"student job (`train.student_init` = `{model.get('student_init', 'teacher-frozen')}`"
        + (
            ": from the embedding cache, at this CPU's rate"
            if model.get("student_init", "teacher-frozen") == "teacher-frozen"
            else f": its own video backbone, {model['student_tflops_per_job']:.0f} TFLOP"
        )
        + f") {model['student_job_s']:.1f} s + start-up.",
        "",
        markdown_table(
            [
                "GPUs",
                "teacher (h)",
                "cache (h)",
                "students, 1 job/run (h)",
                "students, 8 jobs/run (h)",
                "total (h)",
            ],
            [
                [
                    r["gpus"],
                    _f(r["teacher_h"], 2),
                    _f(r["cache_h"], 3),
                    _f(r["students_h"], 2),
                    _f(r["students_bundled_h"], 2),
                    _f(r["total_h"], 2),
                ]
                for r in model["rows"]
            ],
        ),
        "",
        "At 64 GPUs the 87 teacher jobs take two waves (64 + 23): the second wave leaves 41 GPUs idle; "
        "2-worker DDP jobs (`train.num_workers=2`) would fill them only if DDP scales (it did not on 2 CPU "
        "cores). Student jobs are dominated by the per-run start-up unless bundled.",
    ]
    return "\n".join(lines) + "\n"


def replace_sections(text: str, sections: Sequence[str]) -> str:
    """Replace each ``## Heading`` section of ``text`` by the one given (same heading), or append it."""
    for section in sections:
        heading = section.splitlines()[0]
        pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
        if pattern.search(text):
            text = pattern.sub(lambda _m, s=section: s.rstrip("\n") + "\n\n", text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + section
    return text.rstrip("\n") + "\n"


# ---- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a few minutes)")
    parser.add_argument(
        "--subjects", type=int, nargs="+", default=None, help="scaling sizes (default 5 10 20)"
    )
    parser.add_argument(
        "--ot-sizes", type=int, nargs="+", default=None, help="default 64 128 256 (--quick 64)"
    )
    parser.add_argument("--ot-repeats", type=int, default=None, help="default 30 (--quick 5)")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="default runs/bench-speed[-quick]; emptied first"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results file (default benchmarks/results/speed.md; --quick: WORK_DIR/speed.md)",
    )
    parser.add_argument(
        "--only",
        choices=["jobs", "demo"],
        help="jobs: only the concurrent-jobs section and the cost model (on a --quick-size base run, ~5 min); "
        "demo: `pkdot run` as a new user types it, its wall time and per-stage / per-job breakdown "
        "(--demo-runs times); each updates its sections of the results file",
    )
    parser.add_argument("--demo-runs", type=int, default=2, help="--only demo: fresh demo runs to time")
    parser.add_argument(
        "--demo-set", action="append", default=[], help="--only demo: KEY=VALUE passed to `pkdot run --set`"
    )
    parser.add_argument(
        "--concurrency-jobs", type=int, default=8, help="student jobs of the concurrent-jobs section"
    )
    # internal: one measurement in a fresh process
    parser.add_argument("--child", choices=["pipeline", "retrain", "concurrency"], help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--base-run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-subjects", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Path | None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_environment()
    args = parse_args(argv)
    if args.child == "pipeline":
        res = child_pipeline(args.run_dir, args.child_subjects, json.loads(args.overrides))
        print("BENCH " + json.dumps(res), flush=True)
        return None
    if args.child == "retrain":
        res = child_retrain(args.base_run, args.run_dir, args.child_workers)
        print("BENCH " + json.dumps(res), flush=True)
        return None
    if args.child == "concurrency":
        res = child_concurrency(args.base_run, args.run_dir, args.concurrency_jobs)
        print("BENCH " + json.dumps(res), flush=True)
        return None
    if args.only == "jobs":
        return main_jobs(args, argv)
    if args.only == "demo":
        return main_demo(args, argv)

    quick = args.quick
    machine = machine_info()
    command = "python benchmarks/speed.py " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    work = (args.work_dir or Path("runs/bench-speed-quick" if quick else "runs/bench-speed")).resolve()
    out = args.out or (work / "speed.md" if quick else RESULTS_DIR / "speed.md")
    subjects = args.subjects or ([4, 8] if quick else [5, 10, 20])
    overrides = QUICK_OVERRIDES if quick else {}
    shutil.rmtree(work, ignore_errors=True)  # every figure is measured in this invocation
    work.mkdir(parents=True)
    start = time.perf_counter()
    results: dict[str, Any] = {"scaling": []}
    for n in subjects:
        print(f"[speed] whole demo on {n} subjects ...", flush=True)
        res = _run_child(
            [
                "--child",
                "pipeline",
                "--run-dir",
                str(work / f"demo-{n}"),
                "--child-subjects",
                str(n),
                "--overrides",
                json.dumps(overrides),
            ]
        )
        print(f"[speed]   {res['samples']} samples: {res['total_s']:.1f} s", flush=True)
        results["scaling"].append(res)
    middle = results["scaling"][len(subjects) // 2]
    mid_run = work / f"demo-{middle['subjects']}"
    results["extraction"] = extraction_throughput(mid_run)
    other = 1 if middle["train_workers"] != 1 else 2
    print(f"[speed] teacher/cache/distill with {other} Ray Train worker(s) ...", flush=True)
    retrain = _run_child(
        [
            "--child",
            "retrain",
            "--base-run",
            str(mid_run),
            "--run-dir",
            str(work / f"workers-{other}"),
            "--child-workers",
            str(other),
        ]
    )
    results["workers"] = {
        "subjects": middle["subjects"],
        str(other): retrain["stages"],
        str(middle["train_workers"]): {s: middle["stages"][s] for s in RETRAIN_STAGES},
    }
    print("[speed] training throughput ...", flush=True)
    results["training"] = training_throughput(mid_run)
    results["student"] = student_cache_throughput(mid_run, epochs=2 if quick else 3)
    results.update(jobs_and_costs(mid_run, work, args.concurrency_jobs, results["student"]))
    print("[speed] OT solvers ...", flush=True)
    repeats = args.ot_repeats or (5 if quick else 30)
    ot_sizes = args.ot_sizes or ([64] if quick else [64, 128, 256])
    results["ot"] = ot_timings(ot_sizes, repeats, pot_repeats=1 if quick else 3)
    wall = time.perf_counter() - start
    machine["load_average_end"] = tuple(round(x, 2) for x in os.getloadavg())
    text = report_markdown(results, machine, command.strip(), wall)
    print("\n" + text)
    write_result(out, text)
    record = {"machine": machine, "command": command.strip(), "wall_s": wall, **results}
    write_result(work / "speed.json", json.dumps(record, indent=1, default=str))
    print(f"[speed] wrote {out} (total {wall / 60:.1f} min)")
    return out


def jobs_and_costs(base_run: Path, work: Path, n_jobs: int, student: dict[str, Any]) -> dict[str, Any]:
    """The concurrent-jobs measurement (a fresh process) and the LOSO cost model built on it."""
    print(f"[speed] {n_jobs} student jobs: in-process, 1 and 2 concurrent Ray Train runs ...", flush=True)
    conc = _run_child(
        [
            "--child",
            "concurrency",
            "--base-run",
            str(base_run),
            "--run-dir",
            str(work),
            "--concurrency-jobs",
            str(n_jobs),
        ]
    )
    print("[speed] paper-size model FLOPs and CPU speed ...", flush=True)
    costs = paper_model_costs(base_run)
    model = loso_cost_model(costs, conc, student["cached_samples_per_s"])
    return {"concurrency": conc, "paper_costs": costs, "cost_model": model}


def _section_run(
    args: argparse.Namespace, argv: Sequence[str] | None, default_work: str
) -> tuple[dict[str, Any], str, Path, Path]:
    """An ``--only`` run's machine, command line, emptied work folder and results file."""
    machine = machine_info()
    command = "python benchmarks/speed.py " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    work = (args.work_dir or Path(default_work)).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return machine, command, work, args.out or RESULTS_DIR / "speed.md"


def main_jobs(args: argparse.Namespace, argv: Sequence[str] | None) -> Path:
    """``--only jobs``: a quick base run, then the concurrent-jobs section and the cost model only."""
    machine, command, work, out = _section_run(args, argv, "runs/bench-speed-jobs")
    start = time.perf_counter()
    print("[speed] a quick base run (teacher + embedding cache) ...", flush=True)
    base = work / "base"
    _run_child(
        [
            "--child",
            "pipeline",
            "--run-dir",
            str(base),
            "--child-subjects",
            "4",
            "--overrides",
            # one worker: a fold of this tiny set trains on 1 subject (3-4 windows), too few for 2 DDP workers
            json.dumps(QUICK_OVERRIDES | {"train.num_workers": 1}),
        ]
    )
    student = student_cache_throughput(base, epochs=2)
    results = jobs_and_costs(base, work, args.concurrency_jobs, student)
    wall = time.perf_counter() - start
    load_end = tuple(round(x, 2) for x in os.getloadavg())
    note = (
        f"\n_Measured {machine.get('date', '')} by `{command.strip()}` ({wall / 60:.1f} min; load average "
        f"{machine.get('load_average')} at the start, {load_end} at the end; {machine.get('cpu_count', '?')} CPUs)._\n"
    )
    sections = [
        concurrency_markdown(results["concurrency"]) + note,
        cost_markdown(results["paper_costs"], results["cost_model"]),
    ]
    previous = out.read_text() if out.is_file() else "# Speed benchmark\n"
    text = replace_sections(previous, sections)
    print("\n" + "\n".join(sections))
    write_result(out, text)
    write_result(
        work / "speed-jobs.json", json.dumps(results | {"command": command.strip()}, indent=1, default=str)
    )
    print(f"[speed] updated {out} (total {wall / 60:.1f} min)")
    return out


# ---- the demo as a new user runs it (issue 23) --------------------------------------------------------------
#: Log lines that bound the synthetic data set's writing (pkdot.pipeline.prepare, pkdot.data.synthetic).
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def _log_seconds(log: Path, start: str, end: str) -> float | None:
    """Seconds between the first log line containing ``start`` and the first later one containing ``end``."""
    from datetime import datetime

    t0 = None
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        m = _LOG_TIME.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if t0 is None and start in line:
            t0 = t
        elif t0 is not None and end in line:
            return (t - t0).total_seconds()
    return None


def demo_breakdown(run_dir: Path, wall_s: float) -> dict[str, Any]:
    """Where a finished demo run's wall time went: stage markers, the synthetic set, jobs and Ray Train runs."""
    from pkdot.pipeline import STAGES

    stages = {s.name: _marker_seconds(run_dir, s.name) for s in STAGES}
    jobs: dict[str, list[float]] = {}
    for kind in ("teacher", "student", "refit/teacher", "refit/student"):
        for done in sorted((run_dir / kind).rglob("DONE.json")) if (run_dir / kind).is_dir() else []:
            seconds = json.loads(done.read_text()).get("seconds")
            if seconds is not None:
                jobs.setdefault(kind, []).append(float(seconds))
    ray_runs: dict[str, int] = {}  # the driver's line per call of run_jobs_on_ray (local mode stores no run)
    for line in (run_dir / "logs" / "pkdot.log").read_text().splitlines():
        if m := re.search(r"ray_runner: (\w+): \d+ pending jobs in (\d+) Ray Train runs", line):
            ray_runs[m[1]] = ray_runs.get(m[1], 0) + int(m[2])
    if (
        not ray_runs
    ):  # the line's wording is pkdot.train.ray_runner's: a changed wording must not read as 0 runs
        raise StageError(f"{run_dir}/logs/pkdot.log has no 'N pending jobs in M Ray Train runs' line")
    synthetic = _log_seconds(run_dir / "logs" / "pkdot.log", "generating a synthetic", "synthetic ")
    return {
        "wall_s": wall_s,
        "stages_s": stages,
        "synthetic_s": synthetic,
        "outside_stages_s": wall_s - sum(stages.values()),
        "jobs_s": {k: {"n": len(v), "sum": sum(v), "median": statistics.median(v)} for k, v in jobs.items()},
        "ray_train_runs": ray_runs,
    }


def demo_markdown(runs: list[dict[str, Any]], command: str, machine: dict[str, Any]) -> str:
    names = list(runs[0]["stages_s"])
    rows = [["wall (`pkdot run`, process start to exit)", *[f"{r['wall_s']:.1f}" for r in runs]]]
    rows.append(
        [
            "  synthetic data set (inside the start-up)",
            *["?" if r["synthetic_s"] is None else f"{r['synthetic_s']:.1f}" for r in runs],
        ]
    )
    rows.append(
        ["  outside the stages (start-up, Prefect/MLflow/Ray, synthetic set)"]
        + [f"{r['outside_stages_s']:.1f}" for r in runs]
    )
    rows += [[f"  stage `{n}`", *[f"{r['stages_s'][n]:.1f}" for r in runs]] for n in names]
    for kind in runs[0]["jobs_s"]:
        rows.append(
            [f"  {kind} jobs: n, sum, median (in their workers)"]
            + [
                "{n}, {sum:.1f}, {median:.1f}".format(
                    **r["jobs_s"].get(kind, {"n": 0, "sum": 0, "median": 0})
                )
                for r in runs
            ]
        )
    rows.append(
        ["  Ray Train runs per job kind (the refit's included)"]
        + ["; ".join(f"{k} {v}" for k, v in r["ray_train_runs"].items()) for r in runs]
    )
    return "\n".join(
        [
            "## The demo (`pkdot run`)",
            "",
            f"Seconds. Measured {machine.get('date', '')} by `{command}` on {machine.get('cpu_count', '?')} CPUs, "
            f"load average {machine.get('load_average')} at the start. Each run: a fresh run directory, the "
            "demo preset, embedded Prefect/MLflow/Ray, every stage up to the registered model. Job seconds are "
            "each job's own time in its Ray Train worker or, in local mode (`train.num_workers` 0), its Ray task "
            "(`DONE.json`); the rest of a stage is Ray Train's start-up, scheduling and the driver's work.",
            "",
            markdown_table(["", *[f"run {i + 1}" for i in range(len(runs))]], rows),
            "",
        ]
    )


def main_demo(args: argparse.Namespace, argv: Sequence[str] | None) -> Path:
    """``--only demo``: ``pkdot run`` in a fresh run directory, ``--demo-runs`` times; the breakdown of each."""
    machine, command, work, out = _section_run(args, argv, "runs/bench-speed-demo")
    pkdot = Path(sys.executable).parent / "pkdot"
    runs = []
    for i in range(args.demo_runs):
        run_dir = work / f"demo-{i + 1}"
        argv_run = [str(pkdot), "run", "--run-dir", str(run_dir)]
        for kv in args.demo_set:
            argv_run += ["--set", kv]
        env = dict(os.environ, PREFECT_HOME=str(work / f"prefect-home-{i + 1}"))
        print(f"[speed] demo run {i + 1}/{args.demo_runs}: {shlex.join(argv_run)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(argv_run, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise StageError(f"the demo failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
        runs.append(demo_breakdown(run_dir, wall))
        print(f"[speed]   {wall:.1f} s", flush=True)
    section = demo_markdown(runs, command.strip(), machine)
    print("\n" + section)
    previous = out.read_text() if out.is_file() else "# Speed benchmark\n"
    write_result(out, replace_sections(previous, [section]))
    write_result(work / "speed-demo.json", json.dumps({"command": command.strip(), "runs": runs}, indent=1))
    print(f"[speed] updated {out}")
    return out


if __name__ == "__main__":
    main()
