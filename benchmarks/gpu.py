"""The GPU path, measured: a paper-size teacher job and student job, fp32 vs bf16 (issue 23).

On synthetic tensors at Biovid's clip size (the ``paper`` preset: ``n_frames`` x ``crop_size`` x ``crop_size`` x 3
uint8 face clips and the physio spectrogram of ``physio_window``), with the training code of the pipeline
(:func:`pkdot.train.loops.train_epoch` / :func:`~pkdot.train.loops.fit` under :class:`~pkdot.train.loops.Amp`):

- *teacher job*: the fusion teacher (video + physio backbones, cross-attention fusion), task loss, SGD;
- *student job*: the ``paper`` preset's student (``teacher-finetune``: its video backbone trains), PKDOT loss
  against synthetic teacher targets, Adam.

Per job and precision: samples/s (median of ``--repeats`` timings of ``--steps`` steps after warm-up), peak GPU
memory (``torch.cuda.max_memory_allocated``), the FLOPs of one step's forward + backward
(``torch.utils.flop_counter.FlopCounterMode``: matrix products and convolutions only) and the MFU = FLOP/s over
the device's dense peak (:data:`PEAK_FLOPS`); and whether two seeded fits (``fit`` with validation) give the
same history twice.

Run: ``python benchmarks/gpu.py`` on a CUDA machine (sized for under 5 minutes on one H100; not yet run); writes
``benchmarks/results/gpu.md``. ``python benchmarks/gpu.py --tiny --device cpu`` runs the same code at a tiny
size in seconds (CI's smoke test) and writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import signal

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, machine_info, machine_markdown, markdown_table, write_result  # noqa: E402

from pkdot.config import RunConfig, load_config  # noqa: E402
from pkdot.distill import build_loss  # noqa: E402
from pkdot.features.physio import CHANNELS_BY_PART, window_length  # noqa: E402
from pkdot.models import build_student, build_teacher, build_tnets  # noqa: E402
from pkdot.train.loops import Amp, epoch_batches, fit, predict, seed_everything, task_loss, train_epoch  # noqa: E402
from pkdot.train.student import DistillationObjective  # noqa: E402

#: Dense peak FLOP/s (no sparsity) per device-name substring (first match): (bf16/fp16 tensor cores, fp32
#: without tensor cores). From NVIDIA's datasheets (H100 / H200 Tensor Core GPU, A100 Tensor Core GPU), whose
#: tensor-core figures are quoted with 2:4 sparsity: halved here. fp32 convolutions use TF32 tensor cores by
#: default (``torch.backends.cudnn.allow_tf32``), so an fp32 MFU against the fp32 figure can exceed 1.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H100 PCIe": (756e12, 51e12),
    "H100 NVL": (835e12, 60e12),
    "H100": (989e12, 67e12),  # SXM5
    "H200": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
}
#: A few-second size for ``--tiny`` (the sizes of tests/train/conftest.py's tiny run).
TINY = {
    "features.n_frames": 4,
    "features.crop_size": 16,
    "features.physio_window": [2.0, 2.25],
    "features.spec_nfft": 16,
    "model.embed_dim": 16,
    "model.video_backbone": "small3d",
    "model.video_width": 4,
    "model.physio_width": 4,
    "model.tnet_hidden": [8, 8],
    "train.batch_size": 8,
    "train.teacher_batch_size": 8,
    "distill.pkdot.k": 4,
}
PRECISIONS = ("fp32", "bf16")


def input_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """One sample's shape per modality: the face clip (T, H, W, 3) and the physio spectrogram (C, F, T)."""
    f = cfg.features
    channels = len(f.physio_channels or CHANNELS_BY_PART[cfg.data.part])
    _, _, spec = signal.spectrogram(
        np.zeros((channels, window_length(f))),
        nperseg=f.spec_nperseg,
        noverlap=f.spec_noverlap,
        nfft=f.spec_nfft,
    )
    return {"video": (f.n_frames, f.crop_size, f.crop_size, 3), "physio": spec.shape}


def synthetic(cfg: RunConfig, shapes: dict[str, tuple[int, ...]], n: int) -> dict[str, np.ndarray]:
    """``n`` random samples (host memory, as the pipeline holds them) with labels and teacher targets."""
    rng = np.random.default_rng(0)
    d, c = cfg.model.embed_dim, cfg.data.num_outputs
    return {
        "video": rng.integers(0, 256, size=(n, *shapes["video"]), dtype=np.uint8),
        "physio": rng.normal(size=(n, *shapes["physio"])).astype(np.float32),
        "label": rng.integers(0, c, size=n),
        "teacher_embedding": rng.normal(size=(n, d)).astype(np.float32),
        "teacher_logits": rng.normal(size=(n, c)).astype(np.float32),
    }


def make_job(cfg: RunConfig, kind: str, shapes: dict, data: dict, amp: Amp, seed: int = 0):
    """(model whose weights are selected, module that trains, optimizer, step, batch size) of one job."""
    seed_everything(seed)
    if kind == "teacher":
        model = build_teacher(cfg, shapes, seed=seed).to(amp.device)
        trained: torch.nn.Module = model
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=cfg.train.lr_fusion, momentum=0.9
        )

        def step(idx: np.ndarray) -> dict[str, torch.Tensor]:
            out = model({m: amp.tensor(data[m][idx]) for m in ("video", "physio")})
            return {"loss": task_loss(out.logits, amp.tensor(data["label"][idx]), cfg.data.is_regression)}

        return model, trained, optimizer, step, cfg.train.teacher_batch_size
    model = build_student(cfg, shapes, tnets=build_tnets(cfg), seed=seed)
    dim = cfg.model.embed_dim
    loss = build_loss(
        "pkdot",
        student_dim=dim,
        teacher_dim=dim,
        num_outputs=cfg.data.num_outputs,
        regression=cfg.data.is_regression,
        num_samples=len(data["label"]),
        options=cfg.distill.options("pkdot"),
    )
    trained = DistillationObjective(model, loss, cfg).to(amp.device)
    optimizer = torch.optim.Adam(
        [p for p in trained.parameters() if p.requires_grad], lr=cfg.train.lr_student
    )

    def student_step(idx: np.ndarray) -> dict[str, torch.Tensor]:
        t = {k: amp.tensor(data[k][idx]) for k in ("video", "teacher_embedding", "teacher_logits", "label")}
        index = amp.tensor(idx.astype(np.int64))
        return trained(t["video"], t["teacher_embedding"], t["teacher_logits"], t["label"], index, False)

    return model, trained, optimizer, student_step, cfg.train.batch_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(trained: torch.nn.Module, step: Callable, batch: int, amp: Amp) -> int:
    """FLOPs of one training step's forward + backward (matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    trained.train()
    with FlopCounterMode(display=False) as counter:
        with amp.autocast():
            loss = step(np.arange(batch))["loss"]
        loss.backward()
    trained.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else peak[0 if precision != "fp32" else 1]


def throughput(cfg: RunConfig, kind: str, precision: str, device: torch.device, args) -> dict[str, Any]:
    """Samples/s, peak memory, FLOPs per step and MFU of one job's training steps at ``precision``."""
    shapes = input_shapes(cfg)
    amp = Amp.of(precision, device)
    probe = cfg.train.teacher_batch_size if kind == "teacher" else cfg.train.batch_size
    data = synthetic(cfg, shapes, 2 * probe)
    _, trained, optimizer, step, batch = make_job(cfg, kind, shapes, data, amp)
    halves = [np.arange(batch), np.arange(batch, 2 * batch)]
    flops = step_flops(trained, step, batch, amp)
    train_epoch(step, optimizer, halves * args.warmup, modules=[trained], amp=amp)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        losses = train_epoch(step, optimizer, halves * max(1, args.steps // 2), modules=[trained], amp=amp)
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds_per_step = statistics.median(times) / (2 * max(1, args.steps // 2))
    peak = peak_flops(device, precision)
    return {
        "job": kind,
        "precision": amp.name,
        "batch": batch,
        "samples_per_s": batch / seconds_per_step,
        "step_ms": 1e3 * seconds_per_step,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else float("nan"),
        "gflop_per_step": flops / 1e9,
        "mfu": flops / seconds_per_step / peak if peak else float("nan"),
        "loss": losses["loss"],
    }


def seeded_history(
    cfg: RunConfig, kind: str, precision: str, device: torch.device, epochs: int
) -> list[dict]:
    """The history of a seeded ``fit`` (train loss and validation accuracy per epoch) of one job."""
    shapes = input_shapes(cfg)
    amp = Amp.of(precision, device)
    b = cfg.train.teacher_batch_size if kind == "teacher" else cfg.train.batch_size
    data = synthetic(cfg, shapes, 3 * b)
    model, trained, optimizer, step, batch = make_job(cfg, kind, shapes, data, amp)
    val = np.arange(2 * b, 3 * b)

    def forward(idx: np.ndarray):
        rows = val[idx]
        if kind == "teacher":
            out = model({m: amp.tensor(data[m][rows]) for m in ("video", "physio")})
        else:
            out = model(amp.tensor(data["video"][rows]))
        return out.logits, out.embedding

    def validate() -> float:
        outputs, _ = predict(amp.wrap(forward), len(val), batch, [model])
        return float((outputs.argmax(1) == data["label"][val]).mean())

    state = fit(
        model,
        optimizer,
        train_step=step,
        validate=validate,
        epochs=epochs,
        batches_for_epoch=lambda e: epoch_batches(2 * b, batch, seed=0, epoch=e),
        train_modules=[trained],
        amp=amp,
    )
    return state.history


def repeatability(cfg: RunConfig, kind: str, device: torch.device, epochs: int) -> dict[str, Any]:
    """Whether two seeded fits at ``train.precision`` "auto" give the same history (bitwise), and how far apart."""
    precision = Amp.of("auto", device).name
    a, b = (seeded_history(cfg, kind, precision, device, epochs) for _ in range(2))
    diff = max(abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in x)
    return {"job": kind, "precision": precision, "epochs": epochs, "identical": a == b, "max_abs_diff": diff}


def run(args) -> tuple[list[dict], list[dict]]:
    device = torch.device(args.device)
    cfg = load_config(preset="paper", overrides=TINY if args.tiny else None)
    rows = [throughput(cfg, kind, p, device, args) for kind in ("teacher", "student") for p in PRECISIONS]
    repeats = [repeatability(cfg, kind, device, args.epochs) for kind in ("teacher", "student")]
    return rows, repeats


def report(cfg: RunConfig, rows: list[dict], repeats: list[dict], args) -> str:
    info = machine_info()
    shapes = input_shapes(cfg)
    throughput_table = markdown_table(
        ["job", "precision", "batch", "samples/s", "ms/step", "peak GPU mem (GiB)", "GFLOP/step", "MFU"],
        [
            [
                r["job"],
                r["precision"],
                r["batch"],
                f"{r['samples_per_s']:.1f}",
                f"{r['step_ms']:.1f}",
                f"{r['peak_mem_gib']:.2f}",
                f"{r['gflop_per_step']:.3g}",
                f"{r['mfu']:.3f}",
            ]
            for r in rows
        ],
    )
    repeat_table = markdown_table(
        ["job", "precision", "epochs", "same history twice", "max abs diff"],
        [
            [
                r["job"],
                r["precision"],
                r["epochs"],
                "yes" if r["identical"] else "no",
                f"{r['max_abs_diff']:.3g}",
            ]
            for r in repeats
        ],
    )
    return "\n".join(
        [
            "# GPU path: paper-size teacher and student jobs, fp32 vs bf16",
            "",
            f"`python benchmarks/gpu.py --steps {args.steps} --repeats {args.repeats} --epochs {args.epochs}` "
            f"(synthetic inputs: video {shapes['video']} uint8, physio spectrogram {tuple(shapes['physio'])}).",
            "",
            machine_markdown(info),
            f"- TF32: cudnn {torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32}",
            "",
            "## Training throughput",
            "",
            throughput_table,
            "",
            "MFU: FLOPs of one step (FlopCounterMode: matrix products and convolutions) / step time / the device's "
            "dense peak (benchmarks/gpu.py `PEAK_FLOPS`, NVIDIA datasheets; fp32 rows against the non-tensor-core "
            "fp32 peak, although cuDNN runs fp32 convolutions on TF32 tensor cores by default).",
            "",
            "## Same seed, same metrics?",
            "",
            repeat_table,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and inputs (seconds, for CI)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 20; tiny 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timings per job (default 3; tiny 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up step pairs (default 3; tiny 1)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs of each seeded fit (default 3; tiny 2)"
    )
    args = parser.parse_args(argv)
    for name, full, tiny in (("steps", 20, 2), ("repeats", 3, 1), ("warmup", 3, 1), ("epochs", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    rows, repeats = run(args)
    cfg = load_config(preset="paper", overrides=TINY if args.tiny else None)
    text = report(cfg, rows, repeats, args)
    print(text)
    if torch.device(args.device).type == "cuda" and not args.tiny:
        print(f"wrote {write_result(RESULTS_DIR / 'gpu.md', text)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
