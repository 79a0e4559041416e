"""Benchmark stage 1 (feature extraction) on synthetic Biovid sets of growing size.

For each data-set size (``--subjects``) and worker count (``--workers``), a fresh process runs
:func:`pkdot.features.extract.run_extract` on a new run directory and reports:

- face frames/s per worker: sampled video frames / summed shard time of the video modality;
- physio windows/s per worker: physio samples / summed shard time of the physio modality;
- wall time of the shard phase (includes Ray start-up when workers > 1) and of the whole call;
- peak resident memory of the extracting processes (max over shards of ``getrusage`` in the worker) and of
  the driver process (``getrusage`` of the child running ``run_extract``).

Memory should stay flat as the data set grows: a worker holds one video's sampled frames at a time and the
merge streams row groups.

Usage::

    python benchmarks/bench_extract.py --subjects 4 8 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def _child(args: argparse.Namespace) -> None:
    """Run one extraction and print its measurements as JSON (runs in a fresh process)."""
    from pkdot.config import load_config
    from pkdot.data import build_manifest
    from pkdot.features.extract import run_extract

    cfg = load_config(
        preset=args.preset,
        overrides={
            "data.root": str(args.data),
            "data.task": "multiclass",  # all five Biovid classes
            "features.shard_size": args.shard_size,
            "features.workers": args.child_workers,
        },
    )
    manifest = build_manifest(cfg.data, args.data).frame
    t0 = time.perf_counter()
    report = run_extract(cfg, manifest, args.run, workers=args.child_workers, progress=False)
    wall = time.perf_counter() - t0
    physio_ok = report["counts"].get("physio", {}).get("ok", 0)
    out = {
        "samples": len(manifest),
        "workers": args.child_workers,
        "wall_s": wall,
        "extract_wall_s": report["time_s"]["extract_wall"],
        "face_frames": report["sampled_frames"],
        "face_frames_per_s_per_worker": report["sampled_frames"] / max(report["time_s"]["video"], 1e-9),
        "physio_windows_per_s_per_worker": physio_ok / max(report["time_s"]["physio"], 1e-9),
        "face_detection_rate": report["face_detection_rate"],
        "worker_peak_rss_mb": report["worker_peak_rss_mb"],
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    print("BENCH " + json.dumps(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--subjects", type=int, nargs="+", default=[4, 8], help="data-set sizes (synthetic subjects)"
    )
    parser.add_argument(
        "--samples-per-class", type=int, default=2, help="Biovid windows per class per subject"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="worker counts (1 = in-process)"
    )
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--preset", choices=["demo", "paper"], default="demo")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where data and runs go (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    # internal: one measurement in a child process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pkdot.data.synthetic import write_synthetic

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="pkdot-bench-extract-"))
    rows = []
    try:
        for subjects in args.subjects:
            data = work / f"biovid-{subjects}"
            if not data.exists():
                t0 = time.perf_counter()
                write_synthetic(
                    "biovid",
                    data,
                    subjects=subjects,
                    samples_per_class=args.samples_per_class,
                    progress=False,
                )
                logger.warning("wrote %s in %.1f s", data, time.perf_counter() - t0)
            for workers in args.workers:
                run = work / f"run-{subjects}-{workers}"
                shutil.rmtree(run, ignore_errors=True)
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    "--data",
                    str(data),
                    "--run",
                    str(run),
                    "--child-workers",
                    str(workers),
                    "--shard-size",
                    str(args.shard_size),
                    "--preset",
                    args.preset,
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
                if proc.returncode != 0 or line is None:
                    sys.stderr.write(proc.stdout + proc.stderr)
                    raise SystemExit(f"benchmark run (subjects={subjects}, workers={workers}) failed")
                rows.append({"subjects": subjects, **json.loads(line[len("BENCH ") :])})
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    header = (
        f"{'subjects':>8} {'samples':>7} {'workers':>7} {'wall s':>7} {'shards s':>8} {'face fr/s/wkr':>13} "
        f"{'physio win/s/wkr':>16} {'det rate':>8} {'worker RSS MB':>13} {'driver RSS MB':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['subjects']:>8} {r['samples']:>7} {r['workers']:>7} {r['wall_s']:>7.1f} {r['extract_wall_s']:>8.1f} "
            f"{r['face_frames_per_s_per_worker']:>13.1f} {r['physio_windows_per_s_per_worker']:>16.1f} "
            f"{r['face_detection_rate']:>8.3f} {r['worker_peak_rss_mb']:>13.0f} {r['driver_peak_rss_mb']:>13.0f}"
        )


if __name__ == "__main__":
    main()
