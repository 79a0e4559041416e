"""The video-only student: its own backbone, frozen T-Nets that hallucinate the privileged modalities, fusion.

``V = backbone(x)`` ``(B, N, D)``, ``P_m = T_m(mean_n V)[:, None, :]`` per privileged modality (none with
``distill.use_tnet = False``), ``z, gates = fusion({video: V, m: P_m})``, ``logits = head(z)``. With a frozen
backbone distillation can cache ``V`` and train from :meth:`Student.forward_from_features`."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

from torch import Tensor, nn

from pkdot.errors import ConfigError, StageError
from pkdot.models.fusion import GatedCrossAttentionFusion, module_dict
from pkdot.models.heads import Backbone, ModelOutput, TaskHead, seeded
from pkdot.models.teacher import build_backbone, check_backbone, fusion_and_head
from pkdot.models.tnet import TNet, build_tnets

if TYPE_CHECKING:
    from pkdot.config import RunConfig

log = logging.getLogger(__name__)


class Student(nn.Module):
    """Student model: ``video_backbone`` reads ``modality``; ``tnets`` (privileged modality -> T-Net, frozen;
    empty: no hallucination) feed ``fusion`` over ``[modality, *tnets]``. ``freeze_backbone``: no gradient and
    eval mode (batch-norm statistics do not move)."""

    def __init__(
        self,
        modality: str,
        video_backbone: Backbone,
        tnets: dict[str, TNet],
        fusion: GatedCrossAttentionFusion,
        head: TaskHead,
        freeze_backbone: bool,
    ) -> None:
        super().__init__()
        expected = [modality, *tnets]
        if list(fusion.modalities) != expected:
            raise StageError(
                f"student: fusion modalities {fusion.modalities} != {expected} (input, then T-Nets)"
            )
        self.modality, self.video_backbone = modality, video_backbone
        self.tnets = module_dict(dict(tnets))
        self.fusion, self.head, self.backbone_frozen = fusion, head, bool(freeze_backbone)
        self.tnets.requires_grad_(False).eval()
        self.video_backbone.requires_grad_(not self.backbone_frozen)
        if self.backbone_frozen:
            self.video_backbone.eval()

    def train(self, mode: bool = True) -> Student:
        """Set train/eval mode, the frozen parts staying in eval mode."""
        super().train(mode)
        self.tnets.eval()
        if self.backbone_frozen:
            self.video_backbone.eval()
        return self

    def forward(self, video: Tensor) -> ModelOutput:
        """Input batch of the student modality (``uint8 (B, T, H, W, 3)`` for video) -> :class:`ModelOutput`."""
        return self.forward_from_features(self.video_backbone(video))

    def forward_from_features(self, video_tokens: Tensor) -> ModelOutput:
        """Run from the backbone's tokens ``(B, N, D)`` (e.g. cached frozen-backbone features)."""
        if video_tokens.dim() != 3 or video_tokens.shape[-1] != self.fusion.dim:
            raise StageError(
                f"student: expected {self.modality} tokens (B, N, {self.fusion.dim}), got {tuple(video_tokens.shape)}"
            )
        pooled = video_tokens.mean(dim=1)
        tokens = {self.modality: video_tokens} | {m: t(pooled).unsqueeze(1) for m, t in self.tnets.items()}
        z, gates = self.fusion(tokens)
        return ModelOutput(embedding=z, logits=self.head(z), tokens=tokens, gates=gates)


def build_student(
    cfg: RunConfig,
    input_shapes: dict[str, tuple[int, ...]],
    *,
    video_backbone: Backbone | None = None,
    tnets: dict[str, TNet] | None = None,
    freeze_backbone: bool | None = None,
    seed: int | None = None,
) -> Student:
    """Compose the student of a run (``input_shapes``: one sample's shape per modality).

    ``video_backbone`` and ``tnets`` (trained, one per privileged modality) are *copied*, so freezing them leaves
    the caller's modules alone; by default new ones (fresh T-Nets, with a warning, to load a state_dict into).
    ``freeze_backbone`` default: ``train.student_init == "teacher-frozen"``. ``seed``: of the new weights
    (global RNG restored afterwards)."""
    (modality,) = cfg.data.student_modalities
    dim = cfg.model.embed_dim
    freeze = cfg.train.student_backbone_frozen if freeze_backbone is None else bool(freeze_backbone)
    privileged = cfg.data.privileged_modalities
    with seeded(seed):
        if video_backbone is not None:
            check_backbone("build_student", video_backbone, modality, input_shapes.get(modality), dim)
            backbone = copy.deepcopy(video_backbone)
        else:
            if modality not in input_shapes:
                raise StageError(f"build_student: no input shape for the student modality {modality!r}")
            backbone = build_backbone(modality, input_shapes[modality], cfg.model)
        if not cfg.distill.use_tnet:
            if tnets:
                raise ConfigError("build_student: T-Nets were given but distill.use_tnet is false")
            chosen: dict[str, TNet] = {}
        elif tnets is None:
            log.warning(
                "build_student: T-Nets freshly initialised for %s; load trained weights before use",
                privileged,
            )
            chosen = build_tnets(cfg)
        else:
            if sorted(tnets) != sorted(privileged):
                raise StageError(
                    f"build_student: T-Nets given for {sorted(tnets)}, privileged modalities are {privileged}"
                )
            for m, t in tnets.items():
                if not isinstance(t, TNet) or t.dim != dim:
                    raise StageError(f"build_student: the T-Net for {m!r} must be a TNet of dim {dim}")
            chosen = {m: copy.deepcopy(tnets[m]) for m in privileged}
        fusion, head = fusion_and_head(cfg, [modality, *chosen])
    return Student(modality, backbone, chosen, fusion, head, freeze_backbone=freeze)
