"""Run training jobs on Ray: one Ray Train run per job (or small bundle), many runs at once across a cluster.

A *job* is one fold x seed [x loss] (:class:`~pkdot.train.jobs.Job`). Jobs are independent, so each one (or a
bundle of ``train.jobs_per_run`` of them) is its own Ray Train run: a ``TorchTrainer`` with its own
``ScalingConfig`` (``train.num_workers`` workers of ``train.cpus_per_worker`` CPUs [and
``train.gpus_per_worker`` GPUs]), its own storage folder and checkpoints (``<run>/ray/<kind>-<config hash>/
<run name>``) and its own ``FailureConfig(max_failures)``. The run's name is the job key with ``/`` -> ``-``
(``teacher-fold-0-seed-0``); that is what the Ray dashboard lists (one Train run, one task per job).

Each run's ``fit()`` is called inside a Ray task (0 CPUs: it only waits on Ray Train's controller), so Ray
places the runs: the worker groups go wherever the cluster has free resources, on any node. At most
``train.max_concurrent_jobs`` tasks are in flight (default: as many runs as the cluster's CPUs/GPUs hold) --
Ray's "limit pending tasks with ``ray.wait``" pattern; Ray Train's placement groups do the rest.

Fault tolerance, per run:

* a worker that fails is restarted by Ray Train (``FailureConfig``); the job loop resumes: finished phases are
  files in the job's folder, the running phase continues from ``ray.train.get_checkpoint()``;
* a driver that crashed and is started again re-runs only the jobs without a ``DONE.json``; Ray Train V2
  restores each run's checkpoint list from its storage folder (same run name), so a job resumes from its
  last epoch checkpoint. A checkpoint carries the job folder's *attempt token*: a folder reset by the stage
  (changed inputs) gets a new token, so a stale checkpoint is never resumed.

Before the first run, every alive node of the cluster reads a token file from the run directory
(:func:`check_run_dir_on_nodes`): a run directory that is not on storage all nodes share fails there, with a
message naming the node, instead of as missing files inside a job.

Why Ray tasks around ``fit()`` and not a Ray Tune ``Tuner`` over the job grid: a Tune trial must reserve a
non-empty resource bundle (``{"CPU": 0}`` is refused), which on a small cluster takes CPU away from the
trainers' own placement groups; a 0-CPU task costs none and is reused between runs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pkdot.config import RunConfig
from pkdot.console import EpochTail, describe_record, epoch_logger, epoch_recorder
from pkdot.errors import StageError
from pkdot.progress import report as report_progress
from pkdot.train.jobs import Job, WorkerContext, atomic_write_text, state_from_bytes, state_to_bytes
from pkdot.train.loops import FitState

log = logging.getLogger(__name__)

#: A callback run on every worker after every epoch: (job key, phase, epoch, rank). Raising from it
#: simulates a worker failure (used by the fault-tolerance test).
EpochCallback = Callable[[str, str, int, int], None]

#: Seconds between two reads of the workers' epoch records while the driver waits for the runs.
PROGRESS_POLL_S = 2.0
#: The file in a job's folder whose content ties checkpoints to this attempt of the job.
ATTEMPT_TOKEN = ".attempt-token"
#: Run directories already checked on every node, per Ray cluster (``check_run_dir_on_nodes``).
_CHECKED_RUN_DIRS: set[tuple[str, str]] = set()


def resolve_use_gpu(cfg: RunConfig) -> bool:
    """Whether jobs train on GPUs: ``train.use_gpu``, with ``"auto"`` = this machine has CUDA."""
    if cfg.train.use_gpu == "auto":
        return torch.cuda.is_available()
    if cfg.train.use_gpu and not torch.cuda.is_available():
        raise StageError("train.use_gpu is true but CUDA is not available on this machine")
    return bool(cfg.train.use_gpu)


def _resolve_use_gpu_on_cluster(cfg: RunConfig, cluster: Mapping[str, float]) -> bool:
    """``train.use_gpu`` against the cluster's resources (the driver itself may have no GPU)."""
    gpus = float(cluster.get("GPU", 0.0))
    if cfg.train.use_gpu == "auto":
        return gpus > 0
    if cfg.train.use_gpu and gpus <= 0:
        raise StageError("train.use_gpu is true but the Ray cluster has no GPU")
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
    from pkdot.train.splits import load_fold_plan

    run_dir = Path(cfg.run_dir)
    folds = load_fold_plan(run_dir / "splits.json")  # each seed's folds (+ crossfit groups)
    if kind == "teacher":
        samples = load_samples(cfg, run_dir)
    else:
        from pkdot.train.student import load_student_samples

        samples = load_student_samples(cfg, run_dir)
    return samples, folds


def fold_of(folds: Any, job: Job):
    """The fold a job trains on: ``folds[(seed, fold)]`` for per-seed folds (a mapping), else the fold whose
    ``index`` is ``job.fold`` in a list."""
    from pkdot.train.splits import FoldPlan, fold_for_job

    if isinstance(folds, FoldPlan):  # splits.json: the seed's fold, minus a cross-fitting job's group
        return fold_for_job(folds, job)
    if isinstance(folds, Mapping):
        key = (job.seed, job.fold)
        if key not in folds:
            raise StageError(f"job {job.key}: splits.json has no fold {job.fold} for seed {job.seed}")
        return folds[key]
    for fold in folds:
        if getattr(fold, "index", None) == job.fold:
            return fold
    raise StageError(f"job {job.key}: splits.json has no fold with index {job.fold}")


def run_jobs_local(cfg: RunConfig, kind: str, jobs: Sequence[Job], *, progress: bool = True) -> None:
    """Run jobs in this process (one worker, no Ray): what tests and debugging use."""
    from pkdot.train.data import split_fold

    samples, folds = _load_job_data(cfg, kind)
    run = _job_runner(kind)
    for job in jobs:
        if job.is_done():
            continue
        ctx = WorkerContext(progress=epoch_logger(job.key) if progress else None)
        run(cfg, job, _fold_data(kind, samples, fold_of(folds, job), split_fold), ctx)


def _fold_data(kind: str, samples, fold, split_fold):
    if kind == "teacher":
        return split_fold(samples, fold)
    from pkdot.train.student import split_student_fold

    return split_student_fold(samples, fold)


def attempt_token(job: Job) -> str:
    """The job folder's attempt token, created (atomically) when missing."""
    path = Path(job.out_dir) / ATTEMPT_TOKEN
    if not path.is_file():
        atomic_write_text(path, uuid.uuid4().hex)
    return path.read_text().strip()


def run_name(jobs: Sequence[Job]) -> str:
    """The Ray Train run name of a bundle: its first job's key with ``/`` -> ``-`` (``+N`` for N more)."""
    name = jobs[0].key.replace("/", "-")
    return name if len(jobs) == 1 else f"{name}+{len(jobs) - 1}"


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train run: the jobs of a bundle (usually one), resumed from the run's checkpoint if any."""
    import ray.train
    import ray.train.torch

    from pkdot.train.data import split_fold

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    cfg = RunConfig.model_validate(config["cfg"])
    kind: str = config["kind"]
    jobs = [Job(**j) for j in config["jobs"]]
    tokens: dict[str, str] = config["tokens"]
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
        if meta.get("token") == tokens.get(meta["job"]):
            resume = {"job": meta["job"], "phase": meta["phase"], "state": state}
            # logging, not print: Ray Train's print patch would send a print to the driver twice
            if rank == 0:
                log.info("resuming %s / %s after epoch %d", meta["job"], meta["phase"], state.epoch)
        elif rank == 0:
            log.info("ignoring a checkpoint of an earlier attempt of %s", meta["job"])

    pending = [job for job in jobs if not job.is_done()]
    if not pending:
        return
    samples, folds = _load_job_data(cfg, kind)
    run = _job_runner(kind)

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return module
        return ray.train.torch.prepare_model(module, move_to_device=False)

    last_checkpoint = [time.monotonic()]
    every = float(cfg.train.checkpoint_every_s)
    for job in pending:

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
                    meta = {"job": job.key, "phase": phase, "token": tokens[job.key]}
                    with tempfile.TemporaryDirectory() as tmp:
                        (Path(tmp) / "meta.json").write_text(json.dumps(meta))
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
            # Epoch lines go to a file the driver reads (EpochTail), not to stdout: Ray Train's print patch
            # would send them to the worker's console log, which Ray forwards to the driver's console.
            progress=epoch_recorder(cfg.run_dir, job.key) if rank == 0 else None,
        )
        run(cfg, job, _fold_data(kind, samples, fold_of(folds, job), split_fold), ctx)


def _fit_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of the Ray task of one run: build the ``TorchTrainer`` and ``fit()`` it (blocks until done).

    Returns the run's name, the node that ran the task (and so Ray Train's controller), its wall time and
    its start/end (Unix seconds).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    t0, started = time.monotonic(), time.time()
    # The dashboard's Train tab lists runs (by name, with their workers and nodes) only with state tracking.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    per_worker = {"CPU": spec["cpus_per_worker"]}
    if spec["use_gpu"]:
        per_worker["GPU"] = spec["gpus_per_worker"]
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config=spec["loop_config"],
        scaling_config=ScalingConfig(
            num_workers=spec["num_workers"], use_gpu=spec["use_gpu"], resources_per_worker=per_worker
        ),
        run_config=RayRunConfig(
            name=spec["name"],
            storage_path=spec["storage_path"],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=spec["max_failures"]),
        ),
    )
    trainer.fit()
    return {
        "name": spec["name"],
        "node_id": ray.get_runtime_context().get_node_id(),
        "seconds": time.monotonic() - t0,
        "started": started,
        "ended": time.time(),
    }


def runs_that_fit(cfg: RunConfig, cluster: Mapping[str, float], use_gpu: bool) -> int:
    """How many runs of ``train.num_workers`` workers the cluster's total CPUs (and GPUs) hold at once (>= 1)."""
    need = {"CPU": cfg.train.num_workers * cfg.train.cpus_per_worker}
    if use_gpu:
        need["GPU"] = cfg.train.num_workers * cfg.train.gpus_per_worker
    fits = min(int(float(cluster.get(k, 0.0)) // v) for k, v in need.items())
    if fits < 1:
        log.warning(
            "one run needs %s but the Ray cluster has %s: runs will wait for resources (an autoscaler?)",
            need,
            {k: cluster.get(k, 0.0) for k in need},
        )
    return max(1, fits)


def _read_token_on_node(path: str, expected: str) -> str:
    """Body of the per-node check: read the token file; return '' when it matches, else why not."""
    import socket

    try:
        found = Path(path).read_text().strip()
    except OSError as exc:
        return f"cannot read {path} on host {socket.gethostname()}: {exc}"
    if found != expected:
        return f"{path} on host {socket.gethostname()} holds another token (a different directory there)"
    return ""


def check_run_dir_on_nodes(run_dir: str | Path, *, timeout_s: float = 120.0) -> list[str]:
    """Check that every alive Ray node reads the run directory; return the node ids checked.

    The driver writes a fresh token into ``<run_dir>/.ray-node-check``; a 0-CPU task pinned to each alive
    node (``NodeAffinitySchedulingStrategy(soft=False)``) reads it back. Jobs read their inputs and write
    their outputs in the run directory from whichever node Ray places them on, so it must be on storage
    that all nodes share, at the same path.

    Raises
    ------
    StageError
        A node that cannot read the token (or reads a different one), naming the node and its address.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    run_dir = Path(run_dir).resolve()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cluster_key = (ray.get_runtime_context().get_job_id(), str(run_dir))
    if cluster_key in _CHECKED_RUN_DIRS:
        return [n["NodeID"] for n in nodes]
    token = uuid.uuid4().hex
    path = run_dir / ".ray-node-check"
    atomic_write_text(path, token)
    reader = ray.remote(num_cpus=0, max_retries=0)(_read_token_on_node)
    refs = {
        n["NodeID"]: reader.options(
            name="pkdot:check-run-dir",
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote(str(path), token)
        for n in nodes
    }
    problems = []
    for node in nodes:
        ref = refs[node["NodeID"]]
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
) -> list[dict[str, Any]]:
    """Run the pending ``jobs``, one Ray Train run per bundle of ``train.jobs_per_run``, concurrently on Ray.

    Parameters
    ----------
    cfg : the run's configuration (``train.num_workers``, ``cpus_per_worker``, ``gpus_per_worker``,
        ``max_failures``, ``max_concurrent_jobs``, ``jobs_per_run``; ``ray_address``).
    kind : ``"teacher"`` or ``"student"``.
    jobs : every job of the stage; those with a ``DONE.json`` are skipped.
    callbacks : epoch callbacks run on every worker (chaos tests).
    name : the storage folder of the stage's runs under ``<run_dir>/ray`` (default ``<kind>-<config hash>``).

    Returns
    -------
    list of dict
        Per run: ``name``, ``jobs`` (keys), ``node_id`` of its task, ``seconds``, ``started``/``ended``.

    Raises
    ------
    StageError
        A run that failed after ``train.max_failures`` restarts (naming its jobs; the others still finish
        when already running, none is started after a failure), or a job left without a ``DONE.json``.
    """
    import ray

    from pkdot.ray_utils import ensure_ray

    pending = [j for j in jobs if not j.is_done()]
    stage = {"teacher": "train-teacher", "student": "distill"}.get(kind, kind)
    report_progress(stage, len(jobs) - len(pending), len(jobs), "jobs")
    if not pending:
        log.info("all %d %s jobs are already done", len(jobs), kind)
        return []
    ensure_ray(num_cpus=None, address=cfg.ray_address)
    run_dir = Path(cfg.run_dir).resolve()
    check_run_dir_on_nodes(run_dir)
    cluster = ray.cluster_resources()
    use_gpu = _resolve_use_gpu_on_cluster(cfg, cluster)
    size = cfg.train.jobs_per_run
    bundles = [pending[i : i + size] for i in range(0, len(pending), size)]
    limit = cfg.train.max_concurrent_jobs or runs_that_fit(cfg, cluster, use_gpu)
    storage = (
        run_dir
        / "ray"
        / (name or f"{kind}-{cfg.section_hash('data', 'features', 'model', 'train', 'distill')}")
    )
    base_config = {
        "cfg": cfg.model_dump(mode="json") | {"run_dir": str(run_dir)},
        "kind": kind,
        "callbacks": list(callbacks),
        "use_gpu": use_gpu,
        "threads": int(os.environ.get("PKDOT_WORKER_THREADS", "1")),
    }
    specs = [
        {
            "name": run_name(bundle),
            "jobs": [j.key for j in bundle],
            "storage_path": str(storage),
            "num_workers": cfg.train.num_workers,
            "cpus_per_worker": cfg.train.cpus_per_worker,
            "gpus_per_worker": cfg.train.gpus_per_worker,
            "use_gpu": use_gpu,
            "max_failures": cfg.train.max_failures,
            "loop_config": base_config
            | {"jobs": [j.__dict__ for j in bundle], "tokens": {j.key: attempt_token(j) for j in bundle}},
        }
        for bundle in bundles
    ]
    log.info(
        "%s: %d pending jobs in %d Ray Train runs, up to %d at once (%d worker(s) each)",
        kind,
        len(pending),
        len(specs),
        limit,
        cfg.train.num_workers,
    )
    task = ray.remote(num_cpus=0, max_retries=0)(_fit_run)
    waiting = list(specs)
    in_flight: dict[Any, dict[str, Any]] = {}
    finished: list[dict[str, Any]] = []
    failures: list[tuple[dict[str, Any], BaseException]] = []
    # The workers' epoch records: logged once here (log file; console with -v), the newest one shown as the
    # stage's current metric.
    tail = EpochTail(run_dir, [j.key for j in pending])
    detail = ""

    def poll_epochs(keys: list[str]) -> None:
        nonlocal detail
        newest = tail.poll(keys)
        if newest is not None:
            detail = describe_record(newest)
            report_progress(stage, len(jobs) - len(pending) + done_count(), len(jobs), "jobs", detail)

    def done_count() -> int:
        return sum(len(f["jobs"]) for f in finished)

    try:
        # Ray's "limit the pending tasks with ray.wait" pattern: Ray Train's placement groups put each run's
        # workers wherever resources are free; this only keeps `limit` runs asking for them at once.
        while waiting or in_flight:
            while waiting and len(in_flight) < limit and not failures:
                spec = waiting.pop(0)
                in_flight[task.options(name=f"pkdot:{spec['name']}").remote(spec)] = spec
            if not in_flight:
                break
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=PROGRESS_POLL_S)
            poll_epochs([key for spec in in_flight.values() for key in spec["jobs"]])
            for ref in done:
                spec = in_flight.pop(ref)
                try:
                    finished.append(ray.get(ref) | {"jobs": spec["jobs"]})
                    report_progress(stage, len(jobs) - len(pending) + done_count(), len(jobs), "jobs", detail)
                except Exception as exc:  # Ray wraps the trainer's errors in its own types
                    failures.append((spec, exc))
    except BaseException:
        for ref in in_flight:  # interrupted: stop the running fits (their controllers end with the task)
            ray.cancel(ref, force=True)
        raise
    if failures:
        from pkdot.errors import InfrastructureError
        from pkdot.ray_utils import is_infrastructure_error

        described = "; ".join(f"{spec['name']} ({', '.join(spec['jobs'])}): {exc}" for spec, exc in failures)
        message = (
            f"{kind} training failed on Ray after {cfg.train.max_failures} retries in {len(failures)} run(s)"
            f"{f' ({len(waiting)} not started)' if waiting else ''}: {described}"
        )
        # A dead worker/node, an OOM kill or a full object store is retried by the flow; bad input is not.
        if all(is_infrastructure_error(exc) for _, exc in failures):
            raise InfrastructureError(message) from failures[0][1]
        raise StageError(message) from failures[0][1]
    missing = [j.key for j in pending if not j.is_done()]
    if missing:
        raise StageError(f"{kind} training finished but jobs {missing} wrote no DONE marker")
    return finished


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
