"""Shared helpers for the distillation-loss tests: a seeded batch factory and a tiny config."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pkdot.config import DistillConfig
from pkdot.distill import DistillBatch


def _make_batch(
    batch_size: int = 16,
    student_dim: int = 12,
    teacher_dim: int = 20,
    num_outputs: int = 3,
    *,
    regression: bool = False,
    num_samples: int = 50,
    seed: int = 0,
) -> DistillBatch:
    gen = torch.Generator().manual_seed(seed)
    labels = (
        torch.randn(batch_size, generator=gen)
        if regression
        else torch.randint(0, num_outputs, (batch_size,), generator=gen)
    )
    return DistillBatch(
        student_z=torch.randn(batch_size, student_dim, generator=gen).requires_grad_(True),
        teacher_z=torch.randn(batch_size, teacher_dim, generator=gen).requires_grad_(True),
        student_logits=torch.randn(batch_size, num_outputs, generator=gen).requires_grad_(True),
        teacher_logits=torch.randn(batch_size, num_outputs, generator=gen).requires_grad_(True),
        labels=labels,
        index=torch.randperm(num_samples, generator=gen)[:batch_size],
    )


@pytest.fixture
def make_batch() -> Callable[..., DistillBatch]:
    """``make_batch(B, Ds, Dt, C, regression=..., num_samples=..., seed=...)``; teacher tensors require grad
    so that tests can check that no gradient reaches them."""
    return _make_batch


@pytest.fixture
def distill_cfg() -> DistillConfig:
    return DistillConfig(pkdot={"k": 5})


def _random_orthogonal(dim: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


@pytest.fixture
def random_orthogonal() -> Callable[..., torch.Tensor]:
    """``random_orthogonal(dim, seed=0, dtype=float32)``: a (dim, dim) orthogonal matrix (QR of a Gaussian)."""
    return _random_orthogonal
