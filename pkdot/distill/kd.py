r"""Knowledge distillation with soft targets (Hinton, Vinyals & Dean, 2015).

Classification: :math:`T^2\, \mathrm{KL}\big(\mathrm{softmax}(t / T) \,\|\, \mathrm{softmax}(s / T)\big)`,
averaged over the batch; regression: mean squared error to the teacher's outputs.

Weight (1, ``distill.kd.weight``): Hinton et al. multiply the soft-target term by
:math:`T^2` so that its gradients keep the scale of the hard-target term's when T changes, and report the
best results with a lower weight on the hard targets, without one fixed value. With :math:`T^2` inside
:func:`kd_loss`, weight 1 next to the task loss's 1 is their formulation with equal weights. (RepDistiller's
KD runs use 0.9 soft / 0.1 hard.) Per-sample loss: no global-batch gather under DDP.

References
----------
.. [1] G. Hinton, O. Vinyals, J. Dean. "Distilling the Knowledge in a Neural Network." NIPS DL Workshop 2015.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from pkdot.distill.base import DistillBatch, DistillLoss, register
from pkdot.errors import ConfigError


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    r"""Hinton's soft-target loss of (B, C) logits (the teacher's detached); >= 0, zero iff they agree at T.

    .. math::
        \mathcal{L}_\text{KD} = \frac{T^2}{B} \sum_{b=1}^{B} \sum_{c=1}^{C} p^t_{bc} \log\frac{p^t_{bc}}{p^s_{bc}},
        \quad p^t = \mathrm{softmax}(t / T),\ p^s = \mathrm{softmax}(s / T).
    """
    if temperature <= 0:
        raise ConfigError(f"distill.kd.temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().to(student_logits) / temperature, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def kd_regression_loss(student_outputs: Tensor, teacher_outputs: Tensor) -> Tensor:
    r"""Regression KD: :math:`\frac{1}{B\,C} \sum_{b,c} (s_{bc} - t_{bc})^2` (shapes (B, C), usually C = 1)."""
    return F.mse_loss(student_outputs, teacher_outputs.detach().to(student_outputs))


@register("kd")
class KnowledgeDistillation(DistillLoss):
    """Soft targets at ``temperature`` (classification) or MSE to the teacher's outputs (regression)."""

    def __init__(self, *, temperature: float, **dims: Any) -> None:
        super().__init__(**dims)
        self.temperature = temperature

    def compute(self, batch: DistillBatch) -> Tensor:
        if self.regression:
            return kd_regression_loss(batch.student_logits, batch.teacher_logits)
        return kd_loss(batch.student_logits, batch.teacher_logits, self.temperature)
