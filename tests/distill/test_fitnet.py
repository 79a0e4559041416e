"""FitNet: MSE between the adapted student embedding and the teacher embedding."""

from __future__ import annotations

import pytest
import torch

from pkdot.distill import DistillBatch, build_loss
from pkdot.distill.fitnet import fitnet_loss


def _fitnet(student_dim: int, teacher_dim: int):
    return build_loss(
        "fitnet",
        student_dim=student_dim,
        teacher_dim=teacher_dim,
        num_outputs=2,
        regression=False,
        num_samples=10,
    )


def test_zero_with_an_identity_adapter_positive_otherwise() -> None:
    loss = _fitnet(8, 8)
    with torch.no_grad():
        loss.adapter.weight.copy_(torch.eye(8))
        loss.adapter.bias.zero_()
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 8, generator=gen)
    logits = torch.zeros(6, 2)
    assert loss(DistillBatch(z, z.clone(), logits, logits)).item() == 0.0
    other = torch.randn(6, 8, generator=gen)
    assert loss(DistillBatch(z, other, logits, logits)).item() == pytest.approx(
        ((z - other) ** 2).mean().item()
    )
    assert fitnet_loss(z, z).item() == 0.0


def test_adapter_is_trainable_state_and_learns_a_linear_map() -> None:
    loss = _fitnet(6, 10)
    names = dict(loss.named_parameters())
    assert set(names) == {"adapter.weight", "adapter.bias"}
    assert names["adapter.weight"].shape == (10, 6)
    assert "adapter.weight" in loss.state_dict()
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(64, 6, generator=gen)
    teacher = student @ torch.randn(6, 10, generator=gen) + 0.5
    batch = DistillBatch(student, teacher, torch.zeros(64, 2), torch.zeros(64, 2))
    optimiser = torch.optim.Adam(loss.parameters(), lr=0.05)
    start = loss(batch).item()
    for _ in range(300):
        optimiser.zero_grad()
        loss(batch).backward()
        optimiser.step()
    assert loss(batch).item() < 0.01 * start


def test_gradient_reaches_student_and_adapter_not_teacher() -> None:
    loss = _fitnet(4, 5)
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(3, 4, generator=gen, requires_grad=True)
    teacher = torch.randn(3, 5, generator=gen, requires_grad=True)
    loss(DistillBatch(student, teacher, torch.zeros(3, 2), torch.zeros(3, 2))).backward()
    assert student.grad is not None and loss.adapter.weight.grad is not None and teacher.grad is None
