r"""PKDOT: structural distillation by optimal transport between similarity structures.

For a batch of B samples with teacher embeddings :math:`Z_t \in \mathbb{R}^{B \times D_t}` and student
embeddings :math:`Z_s \in \mathbb{R}^{B \times D_s}`:

1. cosine-similarity matrices :math:`S_t, S_s \in [-1, 1]^{B \times B}`, each shifted to be non-negative,
   :math:`\tilde S = S - \min_{ij} S_{ij}`;
2. anchors from the *teacher*: for each row i, the k columns :math:`A_i \subset \{1..B\}` with the least
   (``anchors="least"``, the authors' default) or most (``"most"``) teacher similarity; ``k="all"`` or
   :math:`k \ge B` keeps every column;
3. two point clouds in :math:`\mathbb{R}^k`, row i of each being :math:`(\tilde S_{i, A_{i1}}, \dots,
   \tilde S_{i, A_{ik}})` — the same columns gathered from both matrices;
4. the loss is the debiased Sinkhorn divergence between the two clouds with uniform weights 1/B, cost
   :math:`\tfrac12\|x - y\|^2`, :math:`\varepsilon = \text{blur}^2` (:func:`pkdot.distill.ot.sinkhorn_divergence`).

Weight (0.6, ``distill.pkdot.weight``): the paper's total loss is
:math:`\mathcal{L}_\text{CE} + 0.6\, \mathcal{L}_\text{PKDOT}`. Batch structure: under DDP the loss is
computed on the batch gathered from all workers, as in a single-process run.

Properties: zero when the student's cosine structure equals the teacher's (e.g. :math:`Z_s = Z_t Q` with Q
orthogonal), invariant to a joint permutation of the batch, differentiable in :math:`Z_s` only.

References
----------
.. [1] M. H. Aslam, M. O. Zeeshan, S. Belharbi, M. Pedersoli, A. L. Koerich, S. Bacon, E. Granger.
   "Distilling Privileged Multimodal Information for Expression Recognition using Optimal Transport."
   IEEE FG 2024, arXiv:2401.15489.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def _resolve_k(k: int | str, batch_size: int) -> int:
    if k == "all":
        return batch_size
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"distill.pkdot.k must be a positive int or 'all', got {k!r}")
    return min(k, batch_size)


@float32_math
def pkdot_structure(
    student_z: Tensor, teacher_z: Tensor, *, k: int | str = 30, anchors: str = "least"
) -> StructureClouds:
    """PKDOT's matrices and anchored clouds of student (B, Ds) and teacher (B, Dt, detached) embeddings.

    The ``min(k, B)`` anchors of a row are ordered by teacher similarity (ascending for "least",
    descending for "most"); ``k="all"`` or ``k >= B`` keeps every column in index order.
    """
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
    n_anchors = _resolve_k(k, batch_size)
    student_raw = cosine_similarity_matrix(student_z)
    teacher_raw = cosine_similarity_matrix(teacher_z.detach().to(student_z.dtype))
    student_sim = student_raw - student_raw.min()
    teacher_sim = teacher_raw - teacher_raw.min()
    if n_anchors == batch_size:
        anchor_index = torch.arange(batch_size, device=student_z.device).expand(batch_size, batch_size)
    else:
        anchor_index = torch.topk(teacher_raw, n_anchors, dim=1, largest=anchors == "most").indices
    return StructureClouds(
        student_sim=student_sim,
        teacher_sim=teacher_sim,
        anchor_index=anchor_index,
        student_cloud=student_sim.gather(1, anchor_index),
        teacher_cloud=teacher_sim.gather(1, anchor_index),
    )


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

    (:func:`pkdot_structure`). Paper: k = 30, anchors "least", blur 0.1, scaling 0.5.
    """
    clouds = pkdot_structure(student_z, teacher_z, k=k, anchors=anchors)
    return sinkhorn_divergence(clouds.student_cloud, clouds.teacher_cloud, blur=blur, scaling=scaling)


@register("pkdot")
class PKDOT(DistillLoss):
    """PKDOT (Aslam et al., FG 2024): :func:`pkdot_loss` with the options of ``distill.pkdot``."""

    batch_structure = True

    def __init__(self, *, k: int | str, anchors: str, blur: float, scaling: float, **dims: Any) -> None:
        super().__init__(**dims)
        self.options = {"k": k, "anchors": anchors, "blur": blur, "scaling": scaling}

    def compute(self, batch: DistillBatch) -> Tensor:
        return pkdot_loss(batch.student_z, batch.teacher_z, **self.options)


@register("pkdot-most")
class PKDOTMost(PKDOT):
    """Structure-faithful PKDOT: the k *most*-similar anchors (``distill.pkdot-most``)."""


@register("pkdot-all")
class PKDOTAll(PKDOT):
    """Structure-faithful PKDOT: every column as anchors (``distill.pkdot-all``, ``k: all``)."""
