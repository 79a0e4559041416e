r"""Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019): distance- and angle-wise terms.

Weight 1 (``distill.rkd.weight``): the paper's weights 25 (distance) and 50 (angle) are inside
:func:`rkd_loss` (``distill.rkd.distance_weight``, ``angle_weight``); RepDistiller also adds it with weight 1.
Gathered across workers under DDP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pkdot.distill.base import DistillBatch, DistillLoss, register


def _normalised_distances(z: Tensor, eps: float = 1e-12) -> Tensor:
    """(B, B) Euclidean distances with a zero diagonal, divided by the mean off-diagonal distance."""
    sq_norms = (z * z).sum(dim=1)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (z @ z.T)).clamp(min=eps)
    off_diagonal = 1.0 - torch.eye(z.shape[0], dtype=z.dtype, device=z.device)
    dist = sq_dist.sqrt() * off_diagonal
    mean = dist.sum() / off_diagonal.sum()
    return dist / mean.clamp(min=eps)


def _triplet_angles(z: Tensor) -> Tensor:
    """(B, B, B) cosines: entry (j, i, k) = cos of the angle at z_j between z_i - z_j and z_k - z_j."""
    diff = F.normalize(z.unsqueeze(0) - z.unsqueeze(1), p=2, dim=2)  # diff[j, i] = unit(z_i - z_j)
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_loss(
    student_z: Tensor, teacher_z: Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> Tensor:
    r"""RKD loss :math:`w_d \mathcal{L}_d + w_a \mathcal{L}_a` of (B, Ds) and (B, Dt, detached) embeddings: Huber
    losses between the mean-normalised distance matrices (B, B) and between the triplet-angle cosines (B, B, B).

    >= 0; zero when :math:`Z_s = c\, Z_t Q + t` (similarity transform); permutation invariant. Memory is
    O(B^2 D) for the angle term."""
    teacher_z = teacher_z.detach().to(student_z)
    distance = F.smooth_l1_loss(_normalised_distances(student_z), _normalised_distances(teacher_z))
    angle = F.smooth_l1_loss(_triplet_angles(student_z), _triplet_angles(teacher_z))
    return distance_weight * distance + angle_weight * angle


@register("rkd")
class RelationalKD(DistillLoss):
    """RKD: :func:`rkd_loss` with ``distance_weight`` and ``angle_weight`` (``distill.rkd``)."""

    batch_structure = True

    def compute(self, batch: DistillBatch) -> Tensor:
        return rkd_loss(batch.student_z, batch.teacher_z, **self.options)
