r"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020).

Linear heads map both embeddings to a unit sphere; two momentum memory banks (``num_samples`` rows) hold every
sample's vectors, and the NCE loss contrasts each pair with K negatives drawn from them. Weight 0.8
(``distill.crd.weight``): Tian et al.'s experiments and code (RepDistiller, ``crd/``). Gathered across workers
under DDP, so every worker keeps the same memory banks and the loss does not depend on their number."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pkdot.distill.base import DistillBatch, DistillLoss, register
from pkdot.errors import ConfigError, StageError

_NCE_EPS = 1e-7


def nce_loss(scores: Tensor, num_samples: int) -> Tensor:
    r"""NCE loss :math:`-\frac1B \sum_i [\log D(h_{i0}) + \sum_k \log(1 - D(h_{ik}))]`, :math:`D(h) = h / (h + K P_n)`.

    ``scores`` (B, K + 1), non-negative: column 0 the positive pair, 1..K the negatives; noise uniform over
    the ``num_samples`` = N memory rows, :math:`P_n = 1/N`."""
    noise = (scores.shape[1] - 1) / num_samples  # K * Pn
    positive, negatives = scores[:, 0], scores[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + _NCE_EPS))
    log_d0 = torch.log(noise / (negatives + noise + _NCE_EPS))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def sample_negatives(index: Tensor, num_samples: int, n_negatives: int, generator: torch.Generator) -> Tensor:
    """Rows (B, 1 + K): the positive ``index`` (B,) first, then K rows drawn with replacement, uniformly among
    the *other* N - 1, from the caller's seeded CPU ``generator``."""
    index_cpu = index.detach().to("cpu", torch.long)
    draws = torch.randint(0, num_samples - 1, (index_cpu.shape[0], n_negatives), generator=generator)
    draws = draws + (draws >= index_cpu[:, None]).long()  # skip the positive row
    return torch.cat([index_cpu[:, None], draws], dim=1).to(index.device)


@register("crd")
class ContrastiveRD(DistillLoss):
    r"""CRD (needs ``DistillBatch.index``); ``n_negatives`` None: ``min(4096, num_samples - 1)``.

    Unit vectors :math:`v^s_i = \mathrm{unit}(W_s z^s_i)`, :math:`v^t_i = \mathrm{unit}(W_t z^t_i)`; scores
    :math:`h^s_{ij} = \exp(v^s_i \cdot m^t_j / \tau) / Z_s` (and :math:`h^t` with :math:`m^s`) over the positive
    and K negative memory rows, :math:`Z` fixed on the first batch to :math:`N \cdot \mathrm{mean}(\exp(\cdot /
    \tau))`; loss :math:`\mathrm{NCE}(h^s) + \mathrm{NCE}(h^t)`, then the batch's memory rows move:
    :math:`m \gets \mathrm{unit}(\mu m + (1 - \mu) v)`."""

    batch_structure = True

    memory_student: Tensor
    memory_teacher: Tensor
    norm_student: Tensor
    norm_teacher: Tensor

    def __init__(
        self,
        *,
        n_negatives: int | None,
        temperature: float,
        momentum: float,
        feat_dim: int,
        seed: int,
        **dims: Any,
    ) -> None:
        super().__init__(**dims)
        if self.num_samples < 2:
            raise ConfigError(f"distill loss 'crd': num_samples must be >= 2, got {self.num_samples}")
        self.n_negatives = min(4096, self.num_samples - 1) if n_negatives is None else n_negatives
        self.temperature, self.momentum, self.feat_dim = temperature, momentum, feat_dim
        self.generator = torch.Generator().manual_seed(seed)
        self.embed_student = nn.Linear(self.student_dim, feat_dim)
        self.embed_teacher = nn.Linear(self.teacher_dim, feat_dim)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        init = torch.rand(2, self.num_samples, feat_dim, generator=self.generator) * 2 * bound - bound
        self.register_buffer("memory_student", init[0].clone())
        self.register_buffer("memory_teacher", init[1].clone())
        # NCE normalising constants, fixed on the first batch (-1 = not yet set), as in the reference code.
        self.register_buffer("norm_student", torch.tensor(-1.0))
        self.register_buffer("norm_teacher", torch.tensor(-1.0))

    def compute(self, batch: DistillBatch) -> Tensor:
        index = batch.index
        if index is None:
            raise StageError(
                "distill loss 'crd': DistillBatch.index is required (training-set row of each sample)"
            )
        if index.dtype not in (torch.int32, torch.int64):
            raise StageError(f"distill loss 'crd': DistillBatch.index must be integer, got {index.dtype}")
        if int(index.min()) < 0 or int(index.max()) >= self.num_samples:
            raise StageError(
                f"distill loss 'crd': DistillBatch.index must lie in [0, {self.num_samples}), "
                f"got [{int(index.min())}, {int(index.max())}]"
            )
        index = index.long()
        v_student = F.normalize(self.embed_student(batch.student_z), dim=1)
        v_teacher = F.normalize(self.embed_teacher(batch.teacher_z.to(self.embed_teacher.weight)), dim=1)
        rows = sample_negatives(index, self.num_samples, self.n_negatives, self.generator)
        scores_student, scores_teacher = (  # (B, K + 1)
            torch.exp(torch.bmm(memory[rows].detach(), v.unsqueeze(2)).squeeze(2) / self.temperature)
            for memory, v in ((self.memory_teacher, v_student), (self.memory_student, v_teacher))
        )
        if self.norm_student < 0:
            self.norm_student.fill_(float(scores_student.detach().mean()) * self.num_samples)
            self.norm_teacher.fill_(float(scores_teacher.detach().mean()) * self.num_samples)
        loss = nce_loss(scores_student / self.norm_student, self.num_samples) + nce_loss(
            scores_teacher / self.norm_teacher, self.num_samples
        )
        if self.training:
            with torch.no_grad():  # the batch's memory rows move: m <- unit(mu * m + (1 - mu) * v)
                for memory, v in ((self.memory_student, v_student), (self.memory_teacher, v_teacher)):
                    moved = memory[index] * self.momentum + v.to(memory) * (1.0 - self.momentum)
                    memory.index_copy_(0, index, F.normalize(moved, dim=1))
        return loss
