"""The 'none' baseline: CE only."""

from __future__ import annotations

import torch

from pkdot.config import DistillConfig
from pkdot.distill import build_loss, total_loss


def test_none_is_zero_and_total_is_the_task_loss(make_batch) -> None:
    cfg = DistillConfig(none={"weight": 0.6}, task_weight=1.0)
    loss = build_loss(
        "none",
        student_dim=12,
        teacher_dim=20,
        num_outputs=3,
        regression=False,
        num_samples=50,
        options=cfg.none,
    )
    batch = make_batch()
    value = loss(batch)
    assert value.dim() == 0 and value.item() == 0.0 and value.dtype == batch.student_z.dtype
    task = torch.nn.functional.cross_entropy(batch.student_logits, batch.labels)
    parts = total_loss(task, value, cfg, "none")
    assert parts["loss"].item() == task.item()
    parts["loss"].backward()
    assert batch.student_logits.grad is not None and batch.teacher_z.grad is None
    assert list(loss.parameters()) == []
