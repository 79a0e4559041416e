"""No distillation: the student is trained with the task loss alone (the lower baseline)."""

from __future__ import annotations

from torch import Tensor

from pkdot.distill.base import DistillBatch, DistillLoss, register


def no_distillation_loss(student_z: Tensor) -> Tensor:
    """A scalar zero (dtype and device of ``student_z``): total = task_weight * task loss."""
    return student_z.new_zeros(())


@register("none")
class NoDistillation(DistillLoss):
    """Task loss only: the distillation term is 0 (its weight, 0, changes nothing)."""

    def compute(self, batch: DistillBatch) -> Tensor:
        return no_distillation_loss(batch.student_z)
