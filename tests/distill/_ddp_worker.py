"""One worker of the 2-process gloo check in ``test_distributed.py`` (run as a script, one process per rank).

``python _ddp_worker.py RANK WORLD PORT OUT_DIR`` joins a gloo process group on 127.0.0.1:PORT, takes its
rows of a fixed global batch (uneven shards, ``SHARDS``), runs two steps of every batch-structure loss on a
tiny linear student wrapped with the loss in DistributedDataParallel (which averages the parameter
gradients over workers), and saves ``OUT_DIR/rank-RANK.pt``. The test imports :func:`run_steps` to
compute the one-process reference on the whole batch.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pkdot.config import DistillConfig
from pkdot.distill import DistillBatch, available_losses, build_loss
from pkdot.distill.base import _REGISTRY

BATCH, IN_DIM, STUDENT_DIM, TEACHER_DIM, CLASSES, NUM_SAMPLES = 16, 6, 12, 20, 3, 50
SHARDS = (9, 7)  # rows of rank 0 and rank 1: uneven, so the gather's padding is exercised
STEPS = 2  # the second step sees CRD's memory as updated by the first


def structure_losses() -> list[str]:
    """The registered losses computed on the global batch under DDP."""
    return [name for name in available_losses() if _REGISTRY[name].batch_structure]


def fixed_batch() -> dict[str, torch.Tensor]:
    """The global batch: student inputs, frozen teacher embeddings/logits, labels and training-set rows."""
    gen = torch.Generator().manual_seed(0)
    return {
        "inputs": torch.randn(BATCH, IN_DIM, generator=gen),
        "teacher_z": torch.randn(BATCH, TEACHER_DIM, generator=gen),
        "teacher_logits": torch.randn(BATCH, CLASSES, generator=gen),
        "labels": torch.randint(0, CLASSES, (BATCH,), generator=gen),
        "index": torch.randperm(NUM_SAMPLES, generator=gen)[:BATCH],
    }


class Objective(nn.Module):
    """A linear student, a head and the distillation loss as one module (as the trainer wraps them in DDP)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.student = nn.Linear(IN_DIM, STUDENT_DIM)
        self.head = nn.Linear(STUDENT_DIM, CLASSES)
        self.distill_loss = build_loss(
            name,
            student_dim=STUDENT_DIM,
            teacher_dim=TEACHER_DIM,
            num_outputs=CLASSES,
            regression=False,
            num_samples=NUM_SAMPLES,
            options=DistillConfig(pkdot={"k": 5}).options(name),
        )

    def forward(self, data: dict[str, torch.Tensor]) -> torch.Tensor:
        student_z = self.student(data["inputs"])
        student_z.retain_grad()
        self.last_student_z = student_z  # read back for its gradient (DDP wraps the returned tensors)
        batch = DistillBatch(
            student_z=student_z,
            teacher_z=data["teacher_z"],
            student_logits=self.head(student_z),
            teacher_logits=data["teacher_logits"],
            labels=data["labels"],
            index=data["index"],
        )
        return self.distill_loss(batch)


def run_steps(name: str, rows: slice, data_parallel: bool) -> list[dict[str, torch.Tensor]]:
    """``STEPS`` forward/backward passes of loss ``name`` on ``rows`` of the fixed batch.

    With ``data_parallel`` the objective is wrapped in DistributedDataParallel (which averages the
    parameter gradients over workers). Returns, per step, the loss value, the gradient on this worker's
    student embeddings and the gradient of every parameter (student, head, loss module).
    """
    objective = Objective(name)
    model: nn.Module = objective
    if data_parallel:  # the head gets no gradient from a structure loss: tell DDP
        model = nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    data = {key: value[rows] for key, value in fixed_batch().items()}
    results = []
    for _ in range(STEPS):
        model.zero_grad(set_to_none=True)
        value = model(data)
        value.backward()
        student_z = objective.last_student_z
        assert student_z.grad is not None
        grads = {
            key: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for key, p in objective.named_parameters()
        }
        results.append({"value": value.detach().clone(), "student_z_grad": student_z.grad.clone(), **grads})
    return results


def main(rank: int, world: int, port: int, out_dir: Path) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    try:
        start = sum(SHARDS[:rank])
        rows = slice(start, start + SHARDS[rank])
        results = {name: run_steps(name, rows, data_parallel=True) for name in structure_losses()}
        torch.save(results, out_dir / f"rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
