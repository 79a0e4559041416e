"""Relational KD: distance (Huber on mean-normalised distances) + angle (Huber on triplet cosines)."""

from __future__ import annotations

import pytest
import torch

from pkdot.distill.rkd import rkd_loss


def rkd_distance_loss(student, teacher):
    return rkd_loss(student, teacher, distance_weight=1.0, angle_weight=0.0)


def rkd_angle_loss(student, teacher):
    return rkd_loss(student, teacher, distance_weight=0.0, angle_weight=1.0)


def test_zero_under_a_similarity_transform_positive_otherwise(random_orthogonal) -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(10, 6, dtype=torch.float64, generator=gen)
    student = 3.0 * teacher @ random_orthogonal(6, seed=1, dtype=torch.float64) + 0.7
    assert rkd_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-8)
    other = torch.randn(10, 6, dtype=torch.float64, generator=gen)
    assert rkd_distance_loss(other, teacher).item() > 1e-3
    assert rkd_angle_loss(other, teacher).item() > 1e-3


def test_weights_25_50_and_permutation_invariance() -> None:
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(8, 4, generator=gen), torch.randn(8, 9, generator=gen)
    expected = 25 * rkd_distance_loss(student, teacher) + 50 * rkd_angle_loss(student, teacher)
    assert rkd_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)
    perm = torch.randperm(8, generator=gen)
    assert rkd_loss(student[perm], teacher[perm]).item() == pytest.approx(
        rkd_loss(student, teacher).item(), rel=1e-5
    )


def test_distance_term_uses_normalised_distances() -> None:
    gen = torch.Generator().manual_seed(3)
    teacher = torch.randn(7, 3, generator=gen)
    # Scaling the student changes raw distances, not mean-normalised ones.
    assert rkd_distance_loss(10.0 * teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_finite_gradient_to_student_only_with_duplicate_rows() -> None:
    gen = torch.Generator().manual_seed(4)
    student = torch.randn(6, 5, generator=gen)
    student = torch.cat([student, student[:1]]).requires_grad_(True)  # a zero distance
    teacher = torch.randn(7, 5, generator=gen, requires_grad=True)
    rkd_loss(student, teacher).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and teacher.grad is None
