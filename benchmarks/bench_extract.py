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

``--fullsize`` benchmarks the face pipeline at Biovid's real frame size instead (1388 x 1038, 25 fps, 5.5 s
clips written with ``cv2.VideoWriter`` 'mp4v' into a temp dir): the time of
:func:`pkdot.features.faces.extract_faces` over the clips (as a shard's worker passes them) against the
*decode-only floor* (PyAV alone decoding the frames the clips need: the faster of sequential decoding up to the
last sampled frame and a seek to the key frame before each sampled frame), as a ratio of wall times and of the
process's CPU times (the extraction decodes in a read-ahead thread beside the detector), plus the peak resident memory of the process
(one worker) at each data-set size, the per-frame detection cost for each ``features.min_face_px`` and how
much of the extraction time each part takes. Results go to ``benchmarks/results/extract.md``. Not run in CI::

    python benchmarks/bench_extract.py --fullsize --clips 4 8
"""

from __future__ import annotations

import argparse
import itertools
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
    argv = sys.argv[1:] if argv is None else argv
    if "--fullsize" in argv:
        fullsize_main([a for a in argv if a != "--fullsize"])
        return
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


# ---- full-size frames: extraction vs the decode-only floor --------------------------------------------------
FULL_W, FULL_H, FPS, SECONDS = 1388, 1038, 25, 5.5
RESULTS = Path(__file__).parent / "results" / "extract.md"


def write_fullsize_clips(out: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` 5.5-s 1388 x 1038 mp4v clips: textured background with sensor noise, a moving face 150-330 px."""
    import cv2
    import numpy as np
    from skimage import data

    out.mkdir(parents=True, exist_ok=True)
    fx, fy, fw, fh = 177, 66, 95, 95  # the astronaut's face box (frontal Haar cascade)
    region = data.astronaut()[
        int(fy - 0.6 * fh) : int(fy + 1.7 * fh), int(fx - 0.6 * fw) : int(fx + 1.6 * fw)
    ]
    frames_per_clip = int(round(SECONDS * FPS))
    paths = []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        path = out / f"clip{k:03d}.mp4"
        paths.append(path)
        if path.is_file():
            continue
        bg = cv2.resize(
            rng.integers(30, 220, (12, 16, 3), dtype=np.uint8),
            (FULL_W, FULL_H),
            interpolation=cv2.INTER_CUBIC,
        )
        # Sensor noise (sd ~3 grey levels) as saturating uint8 adds: fast enough for 1388 x 1038 frames.
        noise = rng.normal(0, 3.0, (4, FULL_H, FULL_W, 3))
        noise_up = np.clip(noise, 0, 255).astype(np.uint8)
        noise_down = np.clip(-noise, 0, 255).astype(np.uint8)
        face_w = int(rng.uniform(150, 330))
        scale = face_w / fw
        patch = cv2.resize(
            region,
            (round(region.shape[1] * scale), round(region.shape[0] * scale)),
            interpolation=cv2.INTER_AREA,
        )
        # inside the frame whatever the motion (+-40 px across, +-15 px down)
        x0 = rng.uniform(45, FULL_W - patch.shape[1] - 45)
        y0 = rng.uniform(20, FULL_H - patch.shape[0] - 20)
        tmp = path.with_name(f".{path.stem}.tmp.mp4")
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (FULL_W, FULL_H))
        for i in range(frames_per_clip):
            frame = bg.copy()
            x = int(x0 + 40 * np.sin(2 * np.pi * 0.3 * i / FPS))
            y = int(y0 + 15 * np.sin(2 * np.pi * 0.2 * i / FPS + 1.0))
            frame[y : y + patch.shape[0], x : x + patch.shape[1]] = patch
            frame = cv2.subtract(cv2.add(frame, noise_up[i % 4]), noise_down[(i + 1) % 4])
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        tmp.replace(path)
    return paths


def _needed(path: Path, n_frames: int) -> list[int]:
    from pkdot.features.faces import sample_indices, video_length

    return sorted(set(sample_indices(video_length(path)[0], n_frames).tolist()))


def decode_sequential(path: Path, needed: list[int], thread_type: str) -> int:
    """PyAV: decode from the start up to the last needed frame; returns the frames decoded."""
    import av

    last = max(needed)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = thread_type
        for index, _ in enumerate(container.decode(stream)):
            if index >= last:
                return index + 1
    return last + 1


def decode_seeking(path: Path, needed: list[int], thread_type: str) -> int:
    """PyAV: for each needed frame, seek to the key frame before it (unless already past it) and decode to it."""
    import av

    decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = thread_type
        rate, tb = float(stream.average_rate), float(stream.time_base)
        position, frames = -1, None
        for target in needed:
            if frames is None or target - position > 12:  # mp4v's GOP is 12 frames
                container.seek(int(target / rate / tb), stream=stream, backward=True, any_frame=False)
                frames = iter(container.decode(stream))
            for frame in frames:
                decoded += 1
                position = int(round(float(frame.pts * stream.time_base) * rate))
                if position >= target:
                    break
    return decoded


def decode_keyframes(path: Path) -> int:
    """PyAV with ``skip_frame = "NONKEY"``: key frames only (a lower bound, not the TSN frames)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONKEY"
        return sum(1 for _ in container.decode(stream))


def _fullsize_child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process (so its peak RSS, `VmHWM`, is this measurement's)."""
    import cv2

    cv2.setNumThreads(1)  # one worker = one core
    from pkdot.config import FeatureConfig
    from pkdot.features import faces

    clips = sorted(Path(args.data).glob("clip*.mp4"))[: args.n_clips]
    n_frames = args.n_frames
    needed = {p: _needed(p, n_frames) for p in clips}
    out: dict = {"phase": args.phase, "clips": len(clips), "thread_type": args.thread_type}
    phases = ["sequential", "seek", "extract"] if args.phase == "compare" else [args.phase]
    best = {p: float("inf") for p in phases}
    cpu = {p: float("inf") for p in phases}  # this process's CPU time (all its threads), least of N
    for _ in range(args.repeats):  # interleaved, best of N: the machine's load hits every phase alike
        for phase in phases:
            t0, c0 = time.perf_counter(), time.process_time()
            if phase == "sequential":
                out["sequential_frames"] = sum(
                    decode_sequential(p, needed[p], args.thread_type) for p in clips
                )
            elif phase == "seek":
                out["seek_frames"] = sum(decode_seeking(p, needed[p], args.thread_type) for p in clips)
            elif phase == "keyframes":
                out["keyframes_frames"] = sum(decode_keyframes(p) for p in clips)
            else:
                faces.DECODE_THREAD_TYPE = args.thread_type
                features = FeatureConfig(n_frames=n_frames, crop_size=112, detect_every=args.detect_every)
                detector = faces.FaceDetector(features)
                found = sampled = 0
                videos = [(p, [faces.ClipRequest(p.stem)]) for p in clips]  # as a shard's worker sees them
                for _, clip in faces.extract_faces(videos, features, detector):
                    if isinstance(clip, faces.FaceClip):
                        found += int(clip.detected.sum())
                        sampled += len(clip.detected)
                out.update(
                    detection_rate=found / max(sampled, 1),
                    full_searches=detector.full_searches,
                    local_searches=detector.local_searches,
                )
            best[phase] = min(best[phase], time.perf_counter() - t0)
            cpu[phase] = min(cpu[phase], time.process_time() - c0)
    out["seconds"], out["cpu_seconds"] = best, cpu
    out["peak_rss_mb"] = process_peak_rss_mb()
    print("BENCH " + json.dumps(out))


def process_peak_rss_mb() -> float:
    """This process's peak RSS (MB): ``VmHWM`` of /proc/self/status where there is one.

    Not ``ru_maxrss``: on Linux it survives ``exec`` and a forked child starts from its parent's peak, so a
    child of a driver that held the written clips reported the driver's 625 MB for every measurement.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_child(argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--fullsize", "--child", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"full-size benchmark child {argv} failed")
    return json.loads(line[len("BENCH ") :])


def detection_costs(data: Path, settings: list[int], repeats: int = 3) -> list[dict]:
    """Per-frame cost at 1388 x 1038 of a whole-frame search and of a tracked (local) search per min_face_px."""
    import av
    import cv2

    cv2.setNumThreads(1)
    from pkdot.config import FeatureConfig
    from pkdot.features import faces

    path = sorted(data.glob("clip*.mp4"))[0]
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in itertools.islice(container.decode(video=0), 40)][::10]
    rows = []
    for min_face in settings:
        detector = faces.FaceDetector(FeatureConfig(min_face_px=min_face))
        full = local = float("inf")
        boxes = [detector.detect(f) for f in frames]
        for _ in range(repeats):
            t0 = time.perf_counter()
            for f in frames:
                detector.detect_all(f)
            full = min(full, (time.perf_counter() - t0) / len(frames))
            t0 = time.perf_counter()
            for f, b in zip(frames, boxes, strict=True):
                if b is not None:
                    detector.detect_near(f, b)
            local = min(local, (time.perf_counter() - t0) / max(1, sum(b is not None for b in boxes)))
        rows.append(
            {
                "min_face_px": min_face,
                "detect_width": round(FULL_W * detector.scale_for(FULL_W)),
                "full_ms": 1000 * full,
                "tracked_ms": 1000 * local,
                "found": sum(b is not None for b in boxes) / len(frames),
            }
        )
    return rows


def fullsize_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description="face extraction at 1388 x 1038 vs the PyAV decode-only floor"
    )
    parser.add_argument("--clips", type=int, nargs="+", default=[4, 8], help="data-set sizes (clips)")
    parser.add_argument("--n-frames", type=int, default=10, help="TSN frames per clip (paper: 10)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings")
    parser.add_argument("--detect-every", type=int, default=3, help="features.detect_every")
    parser.add_argument("--thread-types", nargs="+", default=["AUTO", "NONE"])
    parser.add_argument("--min-face", type=int, nargs="+", default=[32, 48, 64, 100, 175])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file ('' = none)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n-clips", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--thread-type", default="AUTO", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _fullsize_child(args)
        return
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="pkdot-bench-fullsize-"))
    try:
        t0 = time.perf_counter()
        write_fullsize_clips(work / "clips", max(args.clips))
        print(
            f"wrote {max(args.clips)} clips of {FULL_W}x{FULL_H} in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        rows = []
        for n in args.clips:
            for thread_type in args.thread_types:
                common = [
                    "--data",
                    str(work / "clips"),
                    "--n-clips",
                    str(n),
                    "--n-frames",
                    str(args.n_frames),
                ]
                common += ["--repeats", str(args.repeats), "--thread-type", thread_type]
                common += ["--detect-every", str(args.detect_every)]
                compare = _run_child([*common, "--phase", "compare"])
                memory = _run_child(
                    [*common, "--phase", "extract", "--repeats", "1"]
                )  # peak RSS: extraction only
                secs = compare["seconds"]
                floor_phase = min(("sequential", "seek"), key=lambda p: secs[p])
                rows.append(
                    {
                        "clips": n,
                        "thread_type": thread_type,
                        "floor_phase": floor_phase,
                        "compare": compare,
                        "extract_rss_mb": memory["peak_rss_mb"],
                    }
                )
                cpu = compare["cpu_seconds"]
                print(
                    f"{n} clips, threads {thread_type}: extract {secs['extract']:.3f} s, floor ({floor_phase}) "
                    f"{secs[floor_phase]:.3f} s, ratio {secs['extract'] / secs[floor_phase]:.2f}; CPU time "
                    f"{cpu['extract']:.3f} s vs {cpu[floor_phase]:.3f} s ({cpu['extract'] / cpu[floor_phase]:.2f}x); "
                    f"extraction peak RSS {memory['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
        keyframes = _run_child(
            [
                "--data",
                str(work / "clips"),
                "--n-clips",
                str(max(args.clips)),
                "--phase",
                "keyframes",
                "--repeats",
                str(args.repeats),
            ]
        )
        costs = detection_costs(work / "clips", args.min_face, args.repeats)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = _fullsize_markdown(rows, keyframes, costs, args)
    print(text)
    if str(args.out):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


def _fullsize_markdown(rows: list[dict], keyframes: dict, costs: list[dict], args: argparse.Namespace) -> str:
    import platform

    from pkdot.features import faces

    lines = [
        "# Face extraction at Biovid's frame size (1388 x 1038, 25 fps, 5.5-s clips)",
        "",
        f"`python benchmarks/bench_extract.py --fullsize --clips {' '.join(map(str, args.clips))}` on "
        f"{platform.machine()} with {os.cpu_count()} cores (shared; 1-min load average "
        f"{os.getloadavg()[0]:.0f} when written), one process = one worker "
        f"(`cv2.setNumThreads(1)`), best of {args.repeats}; synthetic mp4v clips (cv2.VideoWriter, GOP 12) "
        f"with a moving 150-330-px face and sensor noise; {args.n_frames} TSN frames per clip; default "
        "features (`min_face_px` 64, crops 112 px, `detect_every` "
        f"{args.detect_every}).",
        "",
        "Floor = PyAV alone decoding the frames the clips need, the faster of *sequential* (decode up to the "
        "last sampled frame) and *seek* (seek to the key frame before each sampled frame); no conversion, no "
        "detection. Extraction = `extract_faces` over the clips (demux pass, seeking decode, RGB conversion of "
        "the sampled frames, one whole-frame Haar search per clip, then a local Haar search every "
        f"`detect_every` = {args.detect_every} sampled frames and template matching in between, crops); it "
        f"decodes in a read-ahead thread, up to {faces.READ_AHEAD_FRAMES} frames ahead of the detector. The "
        f"code's decoder threading is `{faces.DECODE_THREAD_TYPE}`. CPU s: the process's CPU time, all threads.",
        "",
        "| clips | PyAV threads | sequential s (frames) | seek s (frames) | floor | extraction s | ratio | "
        "floor CPU s | extraction CPU s | CPU ratio | extraction peak RSS MB | face found |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, secs, cpu = r["compare"], r["compare"]["seconds"], r["compare"]["cpu_seconds"]
        floor, floor_cpu = secs[r["floor_phase"]], cpu[r["floor_phase"]]
        lines.append(
            f"| {r['clips']} | {r['thread_type']} | {secs['sequential']:.3f} ({c['sequential_frames']}) "
            f"| {secs['seek']:.3f} ({c['seek_frames']}) | {r['floor_phase']} | {secs['extract']:.3f} "
            f"| **{secs['extract'] / floor:.2f}** | {floor_cpu:.3f} | {cpu['extract']:.3f} "
            f"| {cpu['extract'] / floor_cpu:.2f} | {r['extract_rss_mb']:.0f} | {c['detection_rate']:.2f} |"
        )
    lines += [
        "",
        f'Key frames only (`codec_context.skip_frame = "NONKEY"`), {keyframes["clips"]} clips: '
        f"{keyframes['seconds']['keyframes']:.3f} s for {keyframes['keyframes_frames']} frames. It is not usable for TSN "
        "sampling (the sampled frames are not key frames; snapping them to key frames would change the "
        "sampling); it shows what decoding costs per frame without the P-frames in between.",
        "",
        "## Detection cost per frame at 1388 x 1038, per `features.min_face_px`",
        "",
        "| min_face_px | detection width px | whole-frame search ms | tracked search ms | face found |",
        "|---|---|---|---|---|",
    ]
    for c in costs:
        lines.append(
            f"| {c['min_face_px']} | {c['detect_width']} | {c['full_ms']:.1f} | {c['tracked_ms']:.1f} "
            f"| {c['found']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
