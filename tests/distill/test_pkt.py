"""Probabilistic knowledge transfer: cosine-kernel conditional probabilities, KL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pkdot.distill.pkt import pkt_loss


def test_value_matches_the_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(7, 4, generator=gen), torch.randn(7, 9, generator=gen)

    def probabilities(z):
        unit = F.normalize(z, dim=1)
        kernel = (unit @ unit.T + 1) / 2
        return kernel / kernel.sum(dim=1, keepdim=True)

    p_s, p_t = probabilities(student), probabilities(teacher)
    expected = (p_t * torch.log((p_t + 1e-7) / (p_s + 1e-7))).mean()
    assert pkt_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


def test_zero_for_the_same_cosine_structure_positive_otherwise(random_orthogonal) -> None:
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 8, generator=gen)
    assert pkt_loss(0.3 * teacher @ random_orthogonal(8), teacher).item() == pytest.approx(0.0, abs=1e-6)
    assert pkt_loss(torch.randn(16, 8, generator=gen), teacher).item() > 1e-4


def test_permutation_invariant_and_gradient_to_student_only() -> None:
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(10, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(10, 6, generator=gen, requires_grad=True)
    perm = torch.randperm(10, generator=gen)
    base = pkt_loss(student, teacher)
    assert pkt_loss(student[perm], teacher[perm]).item() == pytest.approx(base.item(), rel=1e-5)
    base.backward()
    assert student.grad is not None and teacher.grad is None
