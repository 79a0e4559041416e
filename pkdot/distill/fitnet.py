r"""FitNets: point-to-point regression of the teacher's embedding (Romero et al., ICLR 2015).

Weight 1 (``distill.fitnet.weight``), a deviation from the reference code (RepDistiller: 100, on C x H x W
maps): on our (B, D) embeddings 100 gives a gradient ~110x the cross-entropy's at initialisation (D = 64,
B = 32), outside the 0.05x-20x band ``tests/distill/test_weights.py`` checks; 1 gives ~1.4x."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from pkdot.distill.base import DistillBatch, DistillLoss, register


def fitnet_loss(
    student_z: Tensor, teacher_z: Tensor, adapter: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    r"""Hint loss :math:`\mathrm{MSE}(\text{adapter}(Z_s), Z_t)` of (B, Ds) and (B, Dt, detached) embeddings.

    ``adapter``: the (B, Ds) -> (B, Dt) regressor (a ``nn.Linear``); None requires Ds = Dt."""
    projected = adapter(student_z) if adapter is not None else student_z
    return F.mse_loss(projected, teacher_z.detach().to(projected))


@register("fitnet")
class FitNet(DistillLoss):
    """FitNet hint loss with a learned ``nn.Linear(student_dim, teacher_dim)`` adapter (trained with the student)."""

    def __init__(self, **dims: Any) -> None:
        super().__init__(**dims)
        self.adapter = nn.Linear(self.student_dim, self.teacher_dim)

    def compute(self, batch: DistillBatch) -> Tensor:
        return fitnet_loss(batch.student_z, batch.teacher_z, self.adapter)
