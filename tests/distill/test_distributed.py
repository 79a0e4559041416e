"""Batch-structure losses under data parallelism see the global batch (pkdot/distill/base.py).

Two gloo processes on 127.0.0.1, each with its shard (9 and 7 rows) of a fixed batch of 16, must give the
one-process loss on the whole batch and, with the student and the loss wrapped in DistributedDataParallel,
the same parameter gradients; the gradient on each worker's own embeddings is W times the one-process gradient on those rows
(every worker back-propagates the same global loss through the gather).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pkdot.distill import gather_rows, world_size
from pkdot.ray_utils import free_port

WORKER = Path(__file__).with_name("_ddp_worker.py")
WORLD = 2


def _load_worker():
    spec = importlib.util.spec_from_file_location("pkdot_test_ddp_worker", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_process_group_nothing_is_gathered() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    assert world_size() == 1
    assert gather_rows(x) is x


def test_the_structure_losses_are_the_ones_gathered() -> None:
    worker = _load_worker()
    assert {"pkdot", "sp", "rkd", "pkt", "crd"} <= set(worker.structure_losses())
    assert not {"kd", "fitnet", "none"} & set(worker.structure_losses())


def test_two_gloo_workers_give_the_one_process_loss_and_gradients(tmp_path) -> None:
    worker = _load_worker()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(WORLD), str(port), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for rank in range(WORLD)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"worker {rank} failed:\n{out[-3000:]}"

    shards = [torch.load(tmp_path / f"rank-{rank}.pt") for rank in range(WORLD)]
    names = worker.structure_losses()
    assert set(shards[0]) == set(names)
    starts = [sum(worker.SHARDS[:rank]) for rank in range(WORLD)]
    for name in names:
        reference = worker.run_steps(name, slice(None), data_parallel=False)
        for rank, shard in enumerate(shards):
            rows = slice(starts[rank], starts[rank] + worker.SHARDS[rank])
            for step, (got, want) in enumerate(zip(shard[name], reference, strict=True)):
                where = f"{name}, rank {rank}, step {step}"
                torch.testing.assert_close(got["value"], want["value"], atol=1e-5, rtol=1e-5, msg=where)
                torch.testing.assert_close(
                    got["student_z_grad"] / WORLD,
                    want["student_z_grad"][rows],
                    atol=1e-5,
                    rtol=1e-5,
                    msg=where,
                )
                params = set(want) - {"value", "student_z_grad"}
                assert params == set(got) - {"value", "student_z_grad"}
                for key in params:
                    torch.testing.assert_close(
                        got[key], want[key], atol=1e-5, rtol=1e-5, msg=f"{where}, {key}"
                    )
        assert any(float(r["student_z_grad"].abs().sum()) > 0 for r in reference), name


@pytest.mark.parametrize("rank_rows", [(9, 7)])
def test_the_worker_shards_cover_the_batch(rank_rows) -> None:
    worker = _load_worker()
    assert worker.SHARDS == rank_rows and sum(worker.SHARDS) == worker.BATCH
