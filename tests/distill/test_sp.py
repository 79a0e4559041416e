"""Similarity-preserving KD: row-normalised Gram matrices compared in Frobenius norm / B^2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pkdot.distill.sp import similarity_preserving_loss


def test_value_matches_the_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(9, 4, generator=gen), torch.randn(9, 7, generator=gen)
    g_s = F.normalize(student @ student.T, dim=1)
    g_t = F.normalize(teacher @ teacher.T, dim=1)
    expected = ((g_s - g_t) ** 2).sum() / 81
    assert similarity_preserving_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)


def test_zero_for_rotated_scaled_teacher_positive_otherwise(random_orthogonal) -> None:
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(12, 6, generator=gen)
    student = 2.5 * teacher @ random_orthogonal(6, seed=2)
    assert similarity_preserving_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert similarity_preserving_loss(torch.randn(12, 6, generator=gen), teacher).item() > 1e-3


def test_permutation_invariant_and_gradient_to_student_only() -> None:
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(10, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(10, 8, generator=gen, requires_grad=True)
    perm = torch.randperm(10, generator=gen)
    base = similarity_preserving_loss(student, teacher)
    assert similarity_preserving_loss(student[perm], teacher[perm]).item() == pytest.approx(
        base.item(), rel=1e-5
    )
    base.backward()
    assert student.grad is not None and teacher.grad is None
