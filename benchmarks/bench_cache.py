"""Student epoch time from the embedding cache vs with a live (frozen) teacher forward.

Usage: ``python benchmarks/bench_cache.py [--run RUN] [--epochs 3]``. Without ``--run`` it prepares a demo run
(synthetic Biovid, 6 subjects, one fold) under ``/tmp/pkdot-bench-cache`` through the real stages.
Target (issue #5): the cached epoch is >= 10x faster than the live one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def prepare(run: Path, subjects: int, sets: list[str]):
    from pkdot.config import load_config, parse_override
    from pkdot.pipeline import prepare_run, run_stage

    extra = dict(parse_override(item) for item in sets)
    cfg = load_config(
        preset="demo",
        overrides=extra
        | {
            "run_dir": str(run),
            "synth.subjects": subjects,
            "train.max_folds": 1,
            "train.num_workers": 1,
        },
    )
    cfg = prepare_run(cfg)
    up = run_stage("manifest", cfg).fingerprint
    up = run_stage("extract", cfg, up).fingerprint
    up = run_stage("train-teacher", cfg, up).fingerprint
    run_stage("cache", cfg, up)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--loss", default="pkdot")
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Config override for the prepared run, e.g. --set model.video_backbone=r3d18",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)

    from pkdot.config import load_config
    from pkdot.distill import build_loss
    from pkdot.folds import load_folds
    from pkdot.rundir import RunDir
    from pkdot.train.cache import read_cache
    from pkdot.train.data import load_samples, split_fold
    from pkdot.train.loops import epoch_batches
    from pkdot.train.student import DistillationObjective, build_student_for_job
    from pkdot.train.teacher import load_teacher

    if args.run is None:
        tag = "-".join(x.replace("=", "_").replace(".", "_") for x in args.sets) or "demo"
        cfg = prepare(Path(f"/tmp/pkdot-bench-cache-{tag}"), args.subjects, args.sets)
    else:
        cfg = load_config(args.run / "config.yaml", overrides={"run_dir": str(args.run)})
    run_dir = Path(cfg.run_dir)
    fold = load_folds(run_dir / "splits.json")[0]
    samples = load_samples(cfg, run_dir)
    train = split_fold(samples, fold).train
    cache = read_cache(run_dir, fold.index, 0, train.sample_ids)
    teacher, _, _ = load_teacher(cfg, RunDir(run_dir).teacher(fold.index, 0))
    b = cfg.train.batch_size

    def objective():
        student, _ = build_student_for_job(cfg, fold.index, 0)
        loss = build_loss(
            args.loss,
            student_dim=cfg.model.embed_dim,
            teacher_dim=cfg.model.embed_dim,
            num_outputs=cfg.data.num_outputs,
            regression=cfg.data.is_regression,
            num_samples=len(train),
            options=cfg.distill.options(args.loss),
        )
        obj = DistillationObjective(student, loss, cfg)
        opt = torch.optim.Adam([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
        return obj, opt

    def epoch(live: bool, e: int) -> float:
        obj, opt = objective()
        obj.train()
        t0 = time.perf_counter()
        for idx in epoch_batches(len(train), b, seed=0, epoch=e):
            target = torch.from_numpy(train.targets[idx])
            index = torch.from_numpy(idx.astype(np.int64))
            if live:
                with torch.no_grad():
                    out = teacher({m: torch.from_numpy(train.arrays[m][idx]) for m in cfg.data.modalities})
                losses = obj(
                    torch.from_numpy(train.arrays["video"][idx]),
                    out.embedding,
                    out.logits,
                    target,
                    index,
                    False,
                )
            else:
                losses = obj(
                    torch.from_numpy(cache["video_tokens"][idx]),
                    torch.from_numpy(cache["teacher_embedding"][idx]),
                    torch.from_numpy(cache["teacher_logits"][idx]),
                    target,
                    index,
                    True,
                )
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
        return time.perf_counter() - t0

    live = [epoch(True, e) for e in range(args.epochs)]
    cached = [epoch(False, e) for e in range(args.epochs)]
    lm, cm = statistics.median(live), statistics.median(cached)
    print(f"\nstudent epoch ({len(train)} training samples, batch {b}, loss {args.loss}, 1 thread, CPU)")
    print(f"{'mode':<28}{'median s/epoch':>16}")
    print(f"{'live teacher forward':<28}{lm:>16.3f}")
    print(f"{'embedding cache':<28}{cm:>16.3f}")
    print(f"speed-up from the cache: {lm / cm:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
