"""Run training jobs under Ray Train's ``TorchTrainer``: scaling, checkpoints, failure recovery.

One ``fit()`` per stage runs every job (fold x seed [x loss]) of the stage in sequence inside the worker
loop — Ray's start-up is paid once per stage, not once per fold. Each epoch the chief reports a checkpoint
holding the running job, phase and :class:`~pkdot.train.loops.FitState`; finished jobs/phases are files in
the run directory. When a worker fails, Ray Train (``FailureConfig(max_failures)``) restarts the worker group
and the loop resumes: finished jobs are skipped, finished phases loaded, and the running phase continues from
``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from pkdot.config import RunConfig
from pkdot.errors import StageError
from pkdot.train.jobs import Job, WorkerContext, state_from_bytes, state_to_bytes
from pkdot.train.loops import FitState

log = logging.getLogger(__name__)

#: A callback run on every worker after every epoch: (job key, phase, epoch, rank). Raising from it
#: simulates a worker failure (used by the fault-tolerance test).
EpochCallback = Callable[[str, str, int, int], None]


def resolve_use_gpu(cfg: RunConfig) -> bool:
    if cfg.train.use_gpu == "auto":
        return torch.cuda.is_available()
    if cfg.train.use_gpu and not torch.cuda.is_available():
        raise StageError("train.use_gpu is true but CUDA is not available on this machine")
    return bool(cfg.train.use_gpu)


def _job_runner(kind: str):
    if kind == "teacher":
        from pkdot.train.teacher import run_teacher_job

        return run_teacher_job
    if kind == "student":
        from pkdot.train.student import run_student_job

        return run_student_job
    raise StageError(f"unknown job kind {kind!r}")


def _load_job_data(cfg: RunConfig, kind: str):
    from pkdot.train.data import load_samples
    from pkdot.train.splits import load_folds

    run_dir = Path(cfg.run_dir)
    folds = load_folds(run_dir / "splits.json")
    if kind == "teacher":
        samples = load_samples(cfg, run_dir)
    else:
        from pkdot.train.student import load_student_samples

        samples = load_student_samples(cfg, run_dir)
    return samples, folds


def run_jobs_local(cfg: RunConfig, kind: str, jobs: Sequence[Job], *, progress: bool = True) -> None:
    """Run jobs in this process (one worker, no Ray): what tests and debugging use."""
    from pkdot.train.data import split_fold

    samples, folds = _load_job_data(cfg, kind)
    run = _job_runner(kind)
    for job in jobs:
        if job.is_done():
            continue
        ctx = WorkerContext(progress=_print_progress(job.key) if progress else None)
        run(cfg, job, _fold_data(kind, samples, folds[job.fold], split_fold), ctx)


def _fold_data(kind: str, samples, fold, split_fold):
    if kind == "teacher":
        return split_fold(samples, fold)
    from pkdot.train.student import split_student_fold

    return split_student_fold(samples, fold)


def _print_progress(job_key: str):
    def show(phase: str, epoch: int, record: dict[str, float]) -> None:
        extras = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k not in ("epoch",))
        print(f"[{job_key}] {phase} epoch {epoch}: {extras}", flush=True)

    return show


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from pkdot.train.data import split_fold

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = RunConfig.model_validate(config["cfg"])
    kind: str = config["kind"]
    jobs = [Job(**j) for j in config["jobs"]]
    callbacks: list[EpochCallback] = config.get("callbacks") or []
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")

    resume: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = json.loads((Path(d) / "meta.json").read_text())
            state = state_from_bytes((Path(d) / "state.pt").read_bytes())
        resume = {"job": meta["job"], "phase": meta["phase"], "state": state}
        if rank == 0:
            print(f"[pkdot] resuming {meta['job']} / {meta['phase']} after epoch {state.epoch}", flush=True)

    samples, folds = _load_job_data(cfg, kind)
    run = _job_runner(kind)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return module
        return ray.train.torch.prepare_model(module, move_to_device=False)

    import time

    last_checkpoint = [time.monotonic()]
    every = float(cfg.train.checkpoint_every_s)
    for job in jobs:
        if job.is_done():
            continue

        def on_epoch_end(phase: str, state: FitState, metrics: dict[str, float], job: Job = job) -> None:
            reported = {"job": job.key, "phase": phase, **{k: float(v) for k, v in metrics.items()}}
            # A report is a synchronisation point of all workers through Ray Train's controller (about a
            # second each here), so reports are spaced: rank 0 decides by its clock, every rank follows.
            due = time.monotonic() - last_checkpoint[0] >= every
            if world > 1:
                flag = torch.tensor([1.0 if due else 0.0])
                torch.distributed.broadcast(flag, src=0)
                due = bool(flag.item())
            if due:
                last_checkpoint[0] = time.monotonic()
                if rank == 0:
                    with tempfile.TemporaryDirectory() as tmp:
                        (Path(tmp) / "meta.json").write_text(json.dumps({"job": job.key, "phase": phase}))
                        (Path(tmp) / "state.pt").write_bytes(state_to_bytes(state))
                        ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(tmp))
                else:
                    ray.train.report(reported, checkpoint=None)
            for cb in callbacks:
                cb(job.key, phase, int(metrics.get("epoch", state.epoch)), rank)

        ctx = WorkerContext(
            rank=rank,
            world=world,
            device=device,
            on_epoch_end=on_epoch_end,
            resume=resume if resume is not None and resume["job"] == job.key else None,
            wrap=wrap,
            progress=_print_progress(job.key) if rank == 0 else None,
        )
        run(cfg, job, _fold_data(kind, samples, folds[job.fold], split_fold), ctx)


def run_jobs_on_ray(
    cfg: RunConfig,
    kind: str,
    jobs: Sequence[Job],
    *,
    callbacks: Sequence[EpochCallback] = (),
    name: str | None = None,
) -> None:
    """Run ``jobs`` with a ``TorchTrainer`` of ``cfg.train.num_workers`` workers (resumable, fault tolerant)."""
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    from pkdot.ray_utils import ensure_ray

    pending = [j for j in jobs if not j.is_done()]
    if not pending:
        log.info("all %d %s jobs are already done", len(jobs), kind)
        return
    started = ensure_ray(num_cpus=None, address=cfg.ray_address)
    use_gpu = resolve_use_gpu(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json") | {"run_dir": str(run_dir)},
            "kind": kind,
            "jobs": [j.__dict__ for j in pending],
            "callbacks": list(callbacks),
            "use_gpu": use_gpu,
            "threads": int(os.environ.get("PKDOT_WORKER_THREADS", "1")),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}
        ),
        run_config=RayRunConfig(
            name=name or f"{kind}-{cfg.section_hash('data', 'features', 'model', 'train', 'distill')}",
            storage_path=str(run_dir / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    # Ray stays up when this call started it: later stages of the same process reuse it, and it ends with
    # the process (``ray.shutdown()`` between stages made Ray's placement-group cleaner spam the log).
    del started
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps worker errors in its own types
        raise StageError(
            f"{kind} training failed on Ray after {cfg.train.max_failures} retries: {exc}"
        ) from exc
    missing = [j.key for j in pending if not j.is_done()]
    if missing:
        raise StageError(f"{kind} training finished but jobs {missing} wrote no DONE marker")


class FailOnce:
    """An epoch callback that raises once, at ``phase``/``epoch`` on worker ``rank`` (chaos testing).

    A marker file makes it fire only once across restarts of the worker group, so Ray Train's recovery
    (``FailureConfig(max_failures)``) and the checkpoint resume can be exercised on purpose.
    """

    def __init__(self, marker: str | Path, *, phase: str, epoch: int, rank: int = 0) -> None:
        self.marker, self.phase, self.epoch, self.rank = str(marker), phase, epoch, rank

    def __call__(self, job_key: str, phase: str, epoch: int, rank: int) -> None:
        if (
            phase == self.phase
            and epoch == self.epoch
            and rank == self.rank
            and not Path(self.marker).exists()
        ):
            Path(self.marker).write_text(f"{job_key} {phase} epoch {epoch} rank {rank}\n")
            raise RuntimeError(f"injected worker failure in {job_key} {phase} after epoch {epoch}")
