r"""Knowledge distillation with soft targets (Hinton, Vinyals & Dean, NIPS DL Workshop 2015).

Weight 1 (``distill.kd.weight``): with the :math:`T^2` factor inside :func:`kd_loss` (which keeps the
gradient scale as T changes), weight 1 next to the task loss's 1 is Hinton et al.'s formulation with equal
weights (they give no fixed value; RepDistiller's KD runs use 0.9 soft / 0.1 hard)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from pkdot.distill.base import DistillBatch, DistillLoss, register


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    r"""Hinton's soft-target loss of (B, C) logits (the teacher's detached), T > 0; >= 0, zero iff they agree at T.

    .. math::
        \mathcal{L}_\text{KD} = \frac{T^2}{B} \sum_{b=1}^{B} \sum_{c=1}^{C} p^t_{bc} \log\frac{p^t_{bc}}{p^s_{bc}},
        \quad p^t = \mathrm{softmax}(t / T),\ p^s = \mathrm{softmax}(s / T)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().to(student_logits) / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


@register("kd")
class KnowledgeDistillation(DistillLoss):
    """Soft targets at ``temperature`` (classification) or the mean squared error to the teacher's (B, C) outputs
    (regression)."""

    def compute(self, batch: DistillBatch) -> Tensor:
        if self.regression:
            return F.mse_loss(batch.student_logits, batch.teacher_logits.to(batch.student_logits))
        return kd_loss(batch.student_logits, batch.teacher_logits, **self.options)
