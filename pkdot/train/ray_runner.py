"""Run training jobs on Ray: one Ray Train run (``TorchTrainer``) per job or bundle of ``train.jobs_per_run``,
each ``fit()`` in a 0-CPU Ray task so Ray places the worker groups on any node; :func:`pkdot.scheduler.run_bounded`
bounds the runs in flight (a Tune ``Tuner`` is not used: a trial's bundle takes CPUs from the trainers). A failed
worker group is restarted and resumes from ``ray.train.get_checkpoint()``, tied to the job folder's attempt
token so a reset folder never resumes a stale one; a restarted driver re-runs only jobs without ``DONE.json``.
``train.num_workers = 0``, Ray Train's local mode: the task holds a worker's resources and trains (no worker group
to start; Ray reuses its process); a failed task is retried from its first job without ``DONE.json``."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pkdot.config import RunConfig
from pkdot.console import EpochTail, describe_record, epoch_recorder
from pkdot.errors import StageError
from pkdot.folds import FoldPlan, load_fold_plan
from pkdot.progress import report as report_progress
from pkdot.ray_utils import ensure_ray
from pkdot.rundir import RunDir, atomic_write_text
from pkdot.scheduler import run_bounded
from pkdot.train.data import SampleSet, load_samples, split_fold
from pkdot.train.jobs import Job, WorkerContext, fold_for_job, load_checkpoint
from pkdot.train.loops import FitState
from pkdot.train.student import load_student_samples, run_student_job
from pkdot.train.teacher import run_teacher_job

log = logging.getLogger(__name__)

#: A callback run on every worker after every epoch: (job key, phase, epoch, rank) (fault-injection tests).
EpochCallback = Callable[[str, str, int, int], None]

#: Run directories already checked on every node, per Ray cluster (``check_run_dir_on_nodes``).
_CHECKED_RUN_DIRS: set[tuple[str, str]] = set()


def _resolve_use_gpu_on_cluster(cfg: RunConfig, cluster: Mapping[str, float]) -> bool:
    """``train.use_gpu`` against the cluster's resources (the driver itself may have no GPU)."""
    gpus = float(cluster.get("GPU", 0.0))
    if cfg.train.use_gpu == "auto":
        return gpus > 0
    if cfg.train.use_gpu and gpus <= 0:
        raise StageError("train.use_gpu is true but the Ray cluster has no GPU")
    return bool(cfg.train.use_gpu)


def job_inputs(cfg: RunConfig, kind: str) -> tuple[SampleSet, FoldPlan]:
    """The samples (``kind`` ``"teacher"`` or ``"student"``) and the fold plan the jobs of a stage train on."""
    samples = load_samples(cfg) if kind == "teacher" else load_student_samples(cfg, Path(cfg.run_dir))
    return samples, load_fold_plan(RunDir(cfg.run_dir).splits)


def run_job(
    cfg: RunConfig, kind: str, job: Job, samples: SampleSet, plan: FoldPlan, ctx: WorkerContext
) -> dict[str, float]:
    """Run one teacher or student job on its fold of ``samples`` (what every Ray Train worker calls)."""
    run = {"teacher": run_teacher_job, "student": run_student_job}[kind]
    return run(cfg, job, split_fold(samples, fold_for_job(plan, job)), ctx)


def resume_state(checkpoint_dir: str | Path, tokens: Mapping[str, str]) -> dict[str, Any] | None:
    """The resumable ``{"job", "dir", "phase", "state"}`` of a Ray Train checkpoint folder (``meta.json`` +
    ``state.pt``), or None when it is of an earlier attempt of its job (its token is not ``tokens[dir]``)."""
    meta = json.loads((Path(checkpoint_dir) / "meta.json").read_text())
    if meta.get("token") != tokens.get(meta.get("dir")):
        log.info("ignoring a checkpoint of an earlier attempt of %s", meta["job"])
        return None
    state = FitState(**load_checkpoint(Path(checkpoint_dir) / "state.pt"))
    return {"job": meta["job"], "dir": meta["dir"], "phase": meta["phase"], "state": state}


def attempt_token(job: Job) -> str:
    """The job folder's attempt token (``.attempt-token``: ties checkpoints to this attempt), made when missing."""
    path = Path(job.out_dir) / ".attempt-token"
    if not path.is_file():
        atomic_write_text(path, uuid.uuid4().hex)
    return path.read_text().strip()


def run_name(jobs: Sequence[Job]) -> str:
    """The Ray Train run name of a bundle: its first job's key with ``/`` -> ``-`` (``+N`` for N more)."""
    name = jobs[0].key.replace("/", "-")
    return name if len(jobs) == 1 else f"{name}+{len(jobs) - 1}"


def bundle_jobs(jobs: Sequence[Job], per_run: int | str, limit: int) -> list[list[Job]]:
    """The jobs of each Ray Train run: bundles of ``per_run`` in order, or (``"auto"``) ``limit`` runs (the runs
    that fit at once) sharing the jobs evenly, so each slot pays Ray Train's start-up once."""
    if per_run == "auto":
        n = max(1, min(limit, len(jobs)))
        return [list(jobs[i::n]) for i in range(n) if jobs[i::n]]
    size = int(per_run)
    return [list(jobs[i : i + size]) for i in range(0, len(jobs), size)]


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train run: the jobs of a bundle, each with the run config of its run directory (``cfgs``),
    resumed from the run's checkpoint if any."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfgs = [RunConfig.model_validate(c) for c in config["cfgs"]]
    tokens: dict[str, str] = config["tokens"]
    callbacks: list[EpochCallback] = config.get("callbacks") or []
    context = ray.train.get_context()
    rank, world, local = context.get_world_rank(), context.get_world_size(), cfgs[0].train.num_workers == 0
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")

    resume: dict[str, Any] | None = None
    if (checkpoint := ray.train.get_checkpoint()) is not None:
        with checkpoint.as_directory() as d:
            resume = resume_state(d, tokens)
        if resume is not None and rank == 0:  # logging, not print (Ray Train's print patch doubles prints)
            log.info("resuming %s / %s after epoch %d", resume["job"], resume["phase"], resume["state"].epoch)

    pending = [(i, job) for i, job in ((i, Job(**j)) for i, j in config["jobs"]) if not job.is_done()]
    inputs: dict[int, tuple[SampleSet, FoldPlan]] = {}  # per run directory (index into cfgs)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        return module if world == 1 else ray.train.torch.prepare_model(module, move_to_device=False)

    last_checkpoint = [time.monotonic()]
    every = float(cfgs[0].train.checkpoint_every_s)
    for i, job in pending:
        cfg = cfgs[i]
        if i not in inputs:
            inputs[i] = job_inputs(cfg, config["kind"])
        samples, plan = inputs[i]

        def on_epoch_end(phase: str, state: FitState, metrics: dict[str, float], job: Job = job) -> None:
            reported = {"job": job.key, "phase": phase, **{k: float(v) for k, v in metrics.items()}}
            # A report is a synchronisation point of all workers through Ray Train's controller (about a
            # second each here), so reports are spaced: rank 0 decides by its clock, every rank follows. Local
            # mode keeps no checkpoint (a report only logs): none is due.
            due = not local and time.monotonic() - last_checkpoint[0] >= every
            if world > 1:
                flag = torch.tensor([1.0 if due else 0.0])
                torch.distributed.broadcast(flag, src=0)
                due = bool(flag.item())
            if due:
                last_checkpoint[0] = time.monotonic()
                if rank == 0:
                    meta = {"job": job.key, "dir": job.out_dir, "phase": phase, "token": tokens[job.out_dir]}
                    with tempfile.TemporaryDirectory() as tmp:
                        (Path(tmp) / "meta.json").write_text(json.dumps(meta))
                        torch.save(state.__dict__, Path(tmp) / "state.pt")  # tensors and plain values
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
            resume=resume if resume is not None and resume["dir"] == job.out_dir else None,
            wrap=wrap,
            # Epoch lines go to a file the driver reads (EpochTail), not to stdout: Ray Train's print patch
            # would send them to the worker's console log, which Ray forwards to the driver's console.
            progress=epoch_recorder(cfg.run_dir, job.key) if rank == 0 else None,
        )
        run_job(cfg, config["kind"], job, samples, plan, ctx)


def _fit_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task of one run: ``fit()`` its ``TorchTrainer``; return its name, jobs, the node that ran
    the task (and so Ray Train's controller), its wall time and its start/end (Unix seconds)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    t0, started = time.monotonic(), time.time()
    # The dashboard's Train tab lists runs (by name, with their workers and nodes) only with state tracking.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    train, use_gpu = spec["loop_config"]["cfgs"][0]["train"], spec["loop_config"]["use_gpu"]
    per_worker = {"CPU": train["cpus_per_worker"], **({"GPU": train["gpus_per_worker"]} if use_gpu else {})}
    TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=spec["loop_config"],
        scaling_config=ScalingConfig(  # num_workers 0, local mode: this task holds the resources
            num_workers=train["num_workers"], use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=RayRunConfig(
            name=spec["name"],
            storage_path=spec["storage_path"],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=train["max_failures"]),
        ),
    ).fit()
    return {
        "name": spec["name"],
        "jobs": spec["jobs"],
        "node_id": ray.get_runtime_context().get_node_id(),
        "seconds": time.monotonic() - t0,
        "started": started,
        "ended": time.time(),
    }


def runs_that_fit(cfg: RunConfig, cluster: Mapping[str, float], use_gpu: bool) -> int:
    """How many runs of ``train.num_workers`` workers (or 1) the cluster's total CPUs (and GPUs) hold at once."""
    per_worker = {"CPU": cfg.train.cpus_per_worker, **({"GPU": cfg.train.gpus_per_worker} if use_gpu else {})}
    need = {k: max(1, cfg.train.num_workers) * v for k, v in per_worker.items()}
    fits = min(int(float(cluster.get(k, 0.0)) // v) for k, v in need.items())
    if fits < 1:
        has = {k: cluster.get(k, 0.0) for k in need}
        log.warning(
            "one run needs %s but the Ray cluster has %s: runs wait for resources (autoscaler?)", need, has
        )
    return max(1, fits)


def _read_token_on_node(path: str, expected: str) -> str:
    """Body of the per-node check: read the token file; return '' when it matches, else why not."""
    try:
        found = Path(path).read_text().strip()
    except OSError as exc:
        return f"cannot read {path} on host {socket.gethostname()}: {exc}"
    if found != expected:
        return f"{path} on host {socket.gethostname()} holds another token (a different directory there)"
    return ""


def check_run_dir_on_nodes(run_dir: str | Path, *, timeout_s: float = 120.0) -> list[str]:
    """Check that every alive Ray node reads the run directory (jobs run on any node): a 0-CPU task pinned to
    each node reads back a fresh token; a :class:`StageError` names each node that cannot. Returns the node ids."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    run_dir = Path(run_dir).resolve()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cluster_key = (ray.get_runtime_context().get_job_id(), str(run_dir))
    if cluster_key in _CHECKED_RUN_DIRS:
        return [n["NodeID"] for n in nodes]
    token = uuid.uuid4().hex
    path = RunDir(run_dir).node_check
    atomic_write_text(path, token)
    reader = ray.remote(num_cpus=0, max_retries=0)(_read_token_on_node)
    refs = [
        reader.options(
            name="pkdot:check-run-dir",
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote(str(path), token)
        for n in nodes
    ]
    problems = []
    for node, ref in zip(nodes, refs, strict=True):
        try:
            why = ray.get(ref, timeout=timeout_s)
        except Exception as exc:  # a node that cannot run the check is a node that cannot run jobs
            why = f"the check did not run there ({type(exc).__name__}: {exc})"
        if why:
            problems.append(f"node {node['NodeID'][:12]} ({node.get('NodeManagerAddress')}): {why}")
    if problems:
        raise StageError(
            f"the run directory {run_dir} is not readable from every Ray node -- "
            + "; ".join(problems)
            + ". Jobs run on any node and read/write the run directory there: put it on storage every node "
            "mounts at the same path (NFS, or the compose stack's `runs` volume)."
        )
    _CHECKED_RUN_DIRS.add(cluster_key)
    return [n["NodeID"] for n in nodes]


def run_jobs_on_ray(
    cfg: RunConfig,
    kind: str,
    jobs: Sequence[Job],
    *,
    callbacks: Sequence[EpochCallback] = (),
    name: str | None = None,
    more: Sequence[tuple[RunConfig, Sequence[Job]]] = (),
) -> list[dict[str, Any]]:
    """Run the jobs without a ``DONE.json``, one Ray Train run per bundle of ``train.jobs_per_run``, at most
    ``train.max_concurrent_jobs`` at once (default: as many as the cluster holds); return :func:`_fit_run`'s
    record of each run. ``callbacks`` run on every worker after every epoch (chaos tests); ``name``: the runs'
    storage folder under ``<run_dir>/ray`` (default ``<kind>-<config hash>``). ``more``: (run config, jobs) of
    other run directories (the refit's), bundled with these (a run may train jobs of several run directories)."""
    import ray

    groups = [(cfg, jobs, name), *((c, js, None) for c, js in more)]
    pending = [(i, j) for i, (_, js, _) in enumerate(groups) for j in js if not j.is_done()]
    total = sum(len(js) for _, js, _ in groups)
    stage = {"teacher": "train-teacher", "student": "distill"}.get(kind, kind)
    report_progress(stage, total - len(pending), total, "jobs")
    if not pending:
        log.info("all %d %s jobs are already done", total, kind)
        return []
    ensure_ray(num_cpus=None, address=cfg.ray_address)
    run_dirs = [Path(c.run_dir).resolve() for c, _, _ in groups]
    for run_dir in run_dirs:
        check_run_dir_on_nodes(run_dir)
    cluster = ray.cluster_resources()
    use_gpu = _resolve_use_gpu_on_cluster(cfg, cluster)
    limit = cfg.train.max_concurrent_jobs or runs_that_fit(cfg, cluster, use_gpu)
    storage = RunDir(run_dirs[0]).ray_runs(
        name or f"{kind}-{cfg.section_hash('data', 'features', 'model', 'train', 'distill')}"
    )
    base_config = {
        "cfgs": [
            c.model_dump(mode="json") | {"run_dir": str(d)}
            for (c, _, _), d in zip(groups, run_dirs, strict=True)
        ],
        "kind": kind,
        "callbacks": list(callbacks),
        "use_gpu": use_gpu,
        "threads": int(os.environ.get("PKDOT_WORKER_THREADS", "1")),
    }
    specs = [
        {
            "name": run_name([j for _, j in bundle]),
            "jobs": [j.key for _, j in bundle],
            "storage_path": str(storage),
            "loop_config": base_config
            | {
                "jobs": [(i, j.__dict__) for i, j in bundle],
                "tokens": {j.out_dir: attempt_token(j) for _, j in bundle},
            },
        }
        for bundle in bundle_jobs(pending, cfg.train.jobs_per_run, limit)
    ]
    # The workers' epoch records: logged once here, the newest one shown as the stage's current metric.
    tails = [EpochTail(d, [j.key for i, j in pending if i == g]) for g, d in enumerate(run_dirs)]
    what = "%s: %d pending jobs in %d Ray Train runs, up to %d at once (%s each)"
    each = f"{cfg.train.num_workers} worker(s)" if cfg.train.num_workers else "local mode, in one task"
    log.info(what, kind, len(pending), len(specs), limit, each)
    # local mode: the task is the worker, and Ray retries it (its finished jobs are skipped)
    local = {"num_cpus": cfg.train.cpus_per_worker, "num_gpus": cfg.train.gpus_per_worker * use_gpu}
    local |= {"max_retries": cfg.train.max_failures, "retry_exceptions": True}
    task = ray.remote(**({"num_cpus": 0, "max_retries": 0} if cfg.train.num_workers else local))(_fit_run)

    def newest_record(running: list[dict[str, Any]]) -> str:
        records = [r for spec in running for tail in tails if (r := tail.poll(spec["jobs"]))]
        return describe_record(records[-1] if records else None)

    finished = run_bounded(
        specs,
        lambda spec: task.options(name=f"pkdot:{spec['name']}").remote(spec),
        limit=limit,
        what=f"{kind} training on Ray (after {cfg.train.max_failures} retries per run)",
        describe=lambda spec: f"{spec['name']} ({', '.join(spec['jobs'])})",
        stage=stage,
        unit="jobs",
        done=total - len(pending),
        total=total,
        weight=lambda spec: len(spec["jobs"]),
        poll=newest_record,
        poll_s=2.0,  # seconds between two reads of the workers' epoch records
    )
    if missing := [j.key for _, j in pending if not j.is_done()]:
        raise StageError(f"{kind} training finished but jobs {missing} wrote no DONE marker")
    return finished
