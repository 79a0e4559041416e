"""Benchmark PKDOT's Sinkhorn solver against GeomLoss and POT, and PKDOT's cost in a student training step.

Part 1 (OT): for each batch size B and k anchors, build the two PKDOT point clouds (B, k) from random
embeddings and time forward + backward of

* ``ours``       -- :func:`pkdot.distill.ot.sinkhorn_divergence` (the code path of the PKDOT loss);
* ``geomloss``   -- ``geomloss.SamplesLoss("sinkhorn", p=2, blur, scaling)`` (the authors' choice);
* ``pot-log``    -- POT ``ot.sinkhorn2(..., method="sinkhorn_log")`` three times (xy, xx, yy: debiased),
  cost 0.5 * squared distance, reg = blur**2, POT's stopping rule (stopThr 1e-9) capped at
  ``--pot-iters`` iterations (POT has no epsilon-scaling, so at eps = 0.01 it runs to the cap);
* ``pot-emp``    -- POT ``ot.bregman.empirical_sinkhorn_divergence(..., method="sinkhorn_log")`` (squared
  distance, reg = 2 * blur**2, halved: the same problem), same cap;

and the full ``pkdot_loss`` (structures + anchors + OT). ours/geomloss/pkdot_loss are interleaved inside
each repeat so that they share the machine's noise (POT, ~100x slower, runs ``--pot-repeats`` times);
the table shows the median (and min) over repeats.

Part 2 (training step): one Adam step of the demo-preset student (``pkdot.models.build_student``) with
CE only and with CE + 0.6 * PKDOT, (a) end to end from uint8 video (backbone trained) and (b) from cached
backbone tokens (the pipeline's default, frozen backbone); the ratio is the PKDOT step over the CE step.

Usage::

    .venv/bin/python benchmarks/bench_ot.py                 # B = 64 128 256, k = 30
    .venv/bin/python benchmarks/bench_ot.py --sizes 128 --repeats 50 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping

import torch

logger = logging.getLogger("bench_ot")


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(
    methods: Mapping[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            times[name].append(_time(fn))
    return times


def _fmt(ts: list[float]) -> str:
    return f"{1e3 * statistics.median(ts):8.2f} ({1e3 * min(ts):6.2f})"


def _ot_methods(
    size: int, k: int, blur: float, scaling: float, seed: int, pot_iters: int
) -> dict[str, Callable[[], torch.Tensor]]:
    """The five forward + backward closures on one pair of PKDOT clouds of B = ``size`` points in R^k."""
    import ot
    from geomloss import SamplesLoss

    from pkdot.distill import pkdot_loss, pkdot_structure
    from pkdot.distill.ot import sinkhorn_divergence, squared_euclidean_cost

    eps = blur**2
    geomloss_fn = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling)
    gen = torch.Generator().manual_seed(seed + size)
    teacher_z = torch.randn(size, 64, generator=gen)
    student_z = 0.3 * teacher_z @ torch.randn(64, 64, generator=gen) + torch.randn(size, 64, generator=gen)
    clouds = pkdot_structure(student_z, teacher_z, k=k)
    x0, y0 = clouds.student_cloud.detach(), clouds.teacher_cloud.detach()
    weights = torch.full((size,), 1.0 / size)

    def ours() -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        value = sinkhorn_divergence(x, y0, blur=blur, scaling=scaling)
        value.backward()
        return value

    def geomloss() -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        value = geomloss_fn(x, y0)
        value.backward()
        return value

    def pot_log() -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        values = [
            ot.sinkhorn2(
                weights,
                weights,
                squared_euclidean_cost(u, v),
                eps,
                method="sinkhorn_log",
                numItermax=pot_iters,
            )
            for u, v in ((x, y0), (x, x), (y0, y0))
        ]
        value = values[0] - 0.5 * (values[1] + values[2])
        value.backward()
        return value

    def pot_emp() -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        value = 0.5 * ot.bregman.empirical_sinkhorn_divergence(
            x, y0, 2 * eps, method="sinkhorn_log", numIterMax=pot_iters
        )
        value.backward()
        return value

    def full_loss() -> torch.Tensor:
        z = student_z.clone().requires_grad_(True)
        value = pkdot_loss(z, teacher_z, k=k, blur=blur, scaling=scaling)
        value.backward()
        return value

    return {
        "ours": ours,
        "geomloss": geomloss,
        "pot-log": pot_log,
        "pot-emp": pot_emp,
        "pkdot_loss": full_loss,
    }


def bench_ot(
    sizes: list[int],
    k: int,
    blur: float,
    scaling: float,
    repeats: int,
    warmup: int,
    seed: int,
    pot_iters: int = 1000,
    pot_repeats: int = 3,
) -> None:
    """Part 1: forward + backward of the divergence on PKDOT clouds, per solver."""
    print(f"\n## OT: forward + backward, k = {k}, blur = {blur} (eps = {blur**2:g}), scaling = {scaling}")
    print(
        f"median ms over {repeats} repeats, POT {pot_repeats} repeats (min in parentheses); d(...): relative"
    )
    print("difference of the value to geomloss's\n")
    names = ("ours", "geomloss", "pot-log", "pot-emp", "pkdot_loss")
    header = f"{'B':>5} | " + " | ".join(f"{name:>17}" for name in names)
    print(header + f" | {'ours/geo':>8} | {'d(ours)':>8} | {'d(pot-log)':>10} | {'d(pot-emp)':>10}")
    print("-" * (len(header) + 48))
    for size in sizes:
        methods = _ot_methods(size, k, blur, scaling, seed, pot_iters)
        reference = methods["geomloss"]().item()
        diffs = {
            n: abs(methods[n]().item() - reference) / abs(reference) for n in ("ours", "pot-log", "pot-emp")
        }
        times = _interleaved({n: methods[n] for n in ("ours", "geomloss", "pkdot_loss")}, repeats, warmup)
        times.update(_interleaved({n: methods[n] for n in ("pot-log", "pot-emp")}, pot_repeats, 0))
        ratio = statistics.median(times["ours"]) / statistics.median(times["geomloss"])
        cells = " | ".join(f"{_fmt(times[name]):>17}" for name in names)
        print(
            f"{size:>5} | {cells} | {ratio:8.2f} | {diffs['ours']:8.1e} | {diffs['pot-log']:10.1e} | "
            f"{diffs['pot-emp']:10.1e}",
            flush=True,
        )


def _step_methods(mode: str, size: int, seed: int) -> dict[str, Callable[[], None]]:
    """One Adam step of the demo student with CE only ("none") and with CE + weight * PKDOT ("pkdot")."""
    from pkdot.config import load_config
    from pkdot.distill import DistillBatch, build_loss, total_loss
    from pkdot.models import build_student

    cfg = load_config(preset="demo")
    frames, side = cfg.features.n_frames, cfg.features.crop_size
    dim, classes = cfg.model.embed_dim, cfg.data.num_outputs
    from_tokens = mode == "cached tokens"
    student = build_student(cfg, {"video": (frames, side, side, 3)}, freeze_backbone=from_tokens, seed=seed)
    student.train()
    gen = torch.Generator().manual_seed(seed + size)
    video = torch.randint(0, 256, (size, frames, side, side, 3), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, classes, (size,), generator=gen)
    teacher_z = torch.randn(size, dim, generator=gen)
    teacher_logits = torch.randn(size, classes, generator=gen)
    with torch.no_grad():
        tokens = student.video_backbone(video)
    optimiser = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-4)

    def make_step(name: str) -> Callable[[], None]:
        loss = build_loss(
            name,
            student_dim=dim,
            teacher_dim=dim,
            num_outputs=classes,
            regression=False,
            num_samples=size,
            options=cfg.distill.options(name),
        )

        def step() -> None:
            optimiser.zero_grad()
            out = student.forward_from_features(tokens) if from_tokens else student(video)
            task = torch.nn.functional.cross_entropy(out.logits, labels)
            batch = DistillBatch(out.embedding, teacher_z, out.logits, teacher_logits, labels=labels)
            total_loss(task, loss(batch), cfg.distill, loss.name)["loss"].backward()
            optimiser.step()

        return step

    return {"none": make_step("none"), "pkdot": make_step("pkdot")}


def bench_step(batch_sizes: list[int], repeats: int, warmup: int, seed: int) -> None:
    """Part 2: one optimiser step of the demo student, CE only vs CE + weight * PKDOT."""
    from pkdot.config import load_config

    cfg = load_config(preset="demo")
    print(
        f"\n## Training step: demo student ({cfg.model.video_backbone}, width {cfg.model.video_width}, "
        f"{cfg.features.n_frames} x {cfg.features.crop_size}^2 uint8 video, embed {cfg.model.embed_dim}), Adam; "
        f"CE vs CE + {cfg.distill.pkdot.weight} * PKDOT (k = {cfg.distill.pkdot.k})"
    )
    print(f"median ms over {repeats} repeats (min in parentheses)\n")
    print(f"{'mode':>22} | {'B':>4} | {'CE only':>17} | {'CE + PKDOT':>17} | {'ratio':>6}")
    print("-" * 78)
    for mode in ("end-to-end (video)", "cached tokens"):
        for size in batch_sizes:
            times = _interleaved(_step_methods(mode, size, seed), repeats, warmup)
            ratio = statistics.median(times["pkdot"]) / statistics.median(times["none"])
            print(
                f"{mode:>22} | {size:>4} | {_fmt(times['none']):>17} | {_fmt(times['pkdot']):>17} | {ratio:6.3f}",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[64, 128, 256], help="batch sizes B for the OT part"
    )
    parser.add_argument("--k", type=int, default=30, help="anchors per row")
    parser.add_argument("--blur", type=float, default=0.1)
    parser.add_argument("--scaling", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--pot-iters", type=int, default=1000, help="iteration cap of the POT solvers")
    parser.add_argument("--pot-repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--step-sizes", type=int, nargs="*", default=[32, 128], help="batch sizes of the step part"
    )
    parser.add_argument("--step-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-step", action="store_true", help="only the OT part")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message="Sinkhorn did not converge")  # POT at its iteration cap
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_ot(
        args.sizes,
        args.k,
        args.blur,
        args.scaling,
        args.repeats,
        args.warmup,
        args.seed,
        args.pot_iters,
        args.pot_repeats,
    )
    if not args.skip_step:
        bench_step(args.step_sizes, args.step_repeats, 2, args.seed)


if __name__ == "__main__":
    main()
