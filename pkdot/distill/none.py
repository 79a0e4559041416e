"""No distillation: the student is trained with the task loss alone (the lower baseline)."""

from __future__ import annotations

from torch import Tensor

from pkdot.distill.base import DistillBatch, DistillLoss, register


@register("none")
class NoDistillation(DistillLoss):
    """Task loss only: the distillation term is a scalar 0 (dtype and device of ``student_z``)."""

    def compute(self, batch: DistillBatch) -> Tensor:
        return batch.student_z.new_zeros(())
