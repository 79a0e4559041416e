"""Hinton KD: soft targets at temperature T (classification), MSE (regression)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pkdot.config import KDOptions
from pkdot.distill import build_loss
from pkdot.distill.kd import kd_loss


def test_zero_iff_same_tempered_distribution_and_positive_otherwise() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(10, 4, generator=gen)
    assert kd_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(teacher + 3.0, teacher).item() == pytest.approx(0.0, abs=1e-5)  # softmax shift invariance
    assert kd_loss(torch.randn(10, 4, generator=gen), teacher).item() > 0


def test_value_is_t_squared_kl_batchmean() -> None:
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    for temperature in (1.0, 4.0):
        p_t = F.softmax(teacher / temperature, dim=1)
        p_s = F.softmax(student / temperature, dim=1)
        expected = (p_t * (p_t.log() - p_s.log())).sum(dim=1).mean() * temperature**2
        assert kd_loss(student, teacher, temperature).item() == pytest.approx(expected.item(), rel=1e-5)


def test_class_uses_its_temperature_and_regression_mse(make_batch) -> None:
    batch = make_batch()
    options = KDOptions(temperature=2.0)
    loss = build_loss(
        "kd", student_dim=12, teacher_dim=20, num_outputs=3, regression=False, num_samples=50, options=options
    )
    assert loss(batch).item() == pytest.approx(
        kd_loss(batch.student_logits, batch.teacher_logits, 2.0).item()
    )
    regression_batch = make_batch(num_outputs=1, regression=True)
    loss = build_loss(
        "kd", student_dim=12, teacher_dim=20, num_outputs=1, regression=True, num_samples=50, options=options
    )
    expected = ((regression_batch.student_logits - regression_batch.teacher_logits) ** 2).mean()
    assert loss(regression_batch).item() == pytest.approx(expected.item(), rel=1e-6)
    agreeing = replace(regression_batch, student_logits=regression_batch.teacher_logits)
    assert loss(agreeing).item() == 0.0


def test_permutation_invariant_and_gradient_to_student_only() -> None:
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(8, 3, generator=gen, requires_grad=True)
    teacher = torch.randn(8, 3, generator=gen, requires_grad=True)
    perm = torch.randperm(8, generator=gen)
    assert kd_loss(student[perm], teacher[perm]).item() == pytest.approx(
        kd_loss(student, teacher).item(), rel=1e-6
    )
    kd_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None
