r"""PKDOT: structural distillation by optimal transport between similarity structures.

The teacher's and the student's batch cosine-similarity matrices (shifted to be non-negative), each row cut to
its k anchors (the columns of least, the authors' default, or most teacher similarity), make two clouds in R^k;
the loss is their debiased Sinkhorn divergence. Weight 0.6 (``distill.pkdot.weight``): the paper's CE + 0.6 PKDOT.
Reference: M. H. Aslam et al., "Distilling Privileged Multimodal Information for Expression Recognition using
Optimal Transport", IEEE FG 2024, arXiv:2401.15489."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pkdot.distill.base import DistillBatch, DistillLoss, register
from pkdot.distill.ot import float32_math, sinkhorn_divergence
from pkdot.errors import ConfigError, StageError


@dataclass
class StructureClouds:
    """PKDOT's shifted similarity matrices ``student_sim``, ``teacher_sim`` (B, B), the teacher's
    ``anchor_index`` (B, k) per row, and the clouds ``*_sim.gather(1, anchor_index)`` (B, k)."""

    student_sim: Tensor
    teacher_sim: Tensor
    anchor_index: Tensor
    student_cloud: Tensor
    teacher_cloud: Tensor


def cosine_similarity_matrix(z: Tensor) -> Tensor:
    """Pairwise cosine similarities (B, D) -> (B, B); a zero row has similarity 0 (norms clamped at 1e-8)."""
    unit = F.normalize(z, p=2, dim=1, eps=1e-8)
    return unit @ unit.T


@float32_math
def pkdot_structure(
    student_z: Tensor, teacher_z: Tensor, *, k: int | str = 30, anchors: str = "least"
) -> StructureClouds:
    """PKDOT's matrices, shifted to be non-negative (S - min S), and anchored clouds of student (B, Ds) and
    teacher (B, Dt, detached) embeddings. A row's ``min(k, B)`` anchors are ordered by teacher similarity
    (ascending for "least"); ``k="all"`` or ``k >= B`` keeps every column in index order."""
    if student_z.dim() != 2 or teacher_z.dim() != 2:
        raise StageError(
            f"pkdot: student_z and teacher_z must be (B, D), got {tuple(student_z.shape)} and {tuple(teacher_z.shape)}"
        )
    batch_size = student_z.shape[0]
    if teacher_z.shape[0] != batch_size:
        raise StageError(f"pkdot: student_z has {batch_size} rows but teacher_z has {teacher_z.shape[0]}")
    if batch_size < 2:
        raise StageError(f"pkdot: needs a batch of at least 2 samples, got {batch_size}")
    if anchors not in ("least", "most"):
        raise ConfigError(f"distill.pkdot.anchors must be 'least' or 'most', got {anchors!r}")
    if k != "all" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"distill.pkdot.k must be a positive int or 'all', got {k!r}")
    n_anchors = batch_size if k == "all" else min(k, batch_size)
    student_raw = cosine_similarity_matrix(student_z)
    teacher_raw = cosine_similarity_matrix(teacher_z.detach().to(student_z.dtype))
    student_sim, teacher_sim = (raw - raw.min() for raw in (student_raw, teacher_raw))
    if n_anchors == batch_size:
        anchor_index = torch.arange(batch_size, device=student_z.device).expand(batch_size, batch_size)
    else:
        anchor_index = torch.topk(teacher_raw, n_anchors, dim=1, largest=anchors == "most").indices
    clouds = (student_sim.gather(1, anchor_index), teacher_sim.gather(1, anchor_index))
    return StructureClouds(student_sim, teacher_sim, anchor_index, *clouds)


def pkdot_loss(
    student_z: Tensor,
    teacher_z: Tensor,
    *,
    k: int | str = 30,
    anchors: str = "least",
    blur: float = 0.1,
    scaling: float = 0.5,
) -> Tensor:
    r"""PKDOT loss (scalar) of student (B, Ds) and teacher (B, Dt) embeddings; the gradient reaches the student only.

    .. math::
        \mathcal{L}_\text{PKDOT} = S_\varepsilon\Big(\tfrac1B \sum_i \delta_{\tilde S_s[i, A_i]},\
            \tfrac1B \sum_i \delta_{\tilde S_t[i, A_i]}\Big), \qquad \varepsilon = \text{blur}^2

    (:func:`pkdot_structure`). Paper: k = 30, anchors "least", blur 0.1, scaling 0.5. Zero when the cosine
    structures agree (e.g. :math:`Z_s = Z_t Q`, Q orthogonal); invariant to a joint permutation of the batch.
    """
    clouds = pkdot_structure(student_z, teacher_z, k=k, anchors=anchors)
    return sinkhorn_divergence(clouds.student_cloud, clouds.teacher_cloud, blur=blur, scaling=scaling)


@register("pkdot")
class PKDOT(DistillLoss):
    """PKDOT (Aslam et al., FG 2024): :func:`pkdot_loss` with the options of ``distill.pkdot``."""

    batch_structure = True

    def compute(self, batch: DistillBatch) -> Tensor:
        return pkdot_loss(batch.student_z, batch.teacher_z, **self.options)


@register("pkdot-most")
class PKDOTMost(PKDOT):
    """Structure-faithful PKDOT: the k *most*-similar anchors (``distill.pkdot-most``)."""


@register("pkdot-all")
class PKDOTAll(PKDOT):
    """Structure-faithful PKDOT: every column as anchors (``distill.pkdot-all``, ``k: all``)."""
