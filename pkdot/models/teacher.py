"""The multimodal teacher (backbones + gated cross-attention fusion + head) and the backbone factory.

``tokens_m = backbone_m(inputs[m])`` ``(B, N_m, D)`` for every modality of ``cfg.data.modalities`` (student
modalities first), ``z, gates = fusion(tokens)``, ``logits = head(z)``; ``z`` ``(B, D)`` is what the student distils.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from pkdot.errors import ConfigError, StageError
from pkdot.models.fusion import GatedCrossAttentionFusion, module_dict
from pkdot.models.heads import Backbone, MLPBackbone, ModelOutput, TaskHead, seeded
from pkdot.models.physio import LogMelCNN, SpectrogramCNN, WindowCNN
from pkdot.models.video import VideoBackbone, load_pretrained_video

if TYPE_CHECKING:
    from pkdot.config import ModelConfig, RunConfig


def build_backbone(
    modality: str, input_shape: tuple[int, ...], cfg: ModelConfig, *, seed: int | None = None
) -> Backbone:
    """The backbone for one modality, by its name and the rank of one sample's shape: any modality's ``(D_in,)``
    -> :class:`MLPBackbone`; ``video`` ``(T, H, W, 3)`` uint8 -> :class:`VideoBackbone` (``cfg.pretrained_video``
    loaded); ``physio`` ``(C, F, T)`` -> :class:`SpectrogramCNN`, ``(C, L)`` -> :class:`WindowCNN`; ``audio``
    ``(n_mels, T)`` -> :class:`LogMelCNN`. ``seed``: of the initial weights (global RNG restored; None draws from it).
    """
    shape = tuple(int(s) for s in input_shape)
    dim = cfg.embed_dim
    with seeded(seed):
        if len(shape) == 1:
            return MLPBackbone(shape, dim, hidden=cfg.mlp_hidden, dropout=cfg.dropout, modality=modality)
        if modality == "video":
            backbone = VideoBackbone(shape, dim, arch=cfg.video_backbone, width=cfg.video_width)
            if cfg.pretrained_video is not None:
                load_pretrained_video(backbone, cfg.pretrained_video)
            return backbone
        encoders = {3: ("spectrogram", SpectrogramCNN), 2: ("window", WindowCNN)}
        if modality == "physio" and len(shape) in encoders:
            expected, encoder = encoders[len(shape)]
            if expected != cfg.physio_input:
                raise ConfigError(
                    f"model.physio_input is {cfg.physio_input!r} but the physio input has shape {shape} "
                    f"(a {expected}); set model.physio_input={expected} or feed the {cfg.physio_input}"
                )
            return encoder(shape, dim, width=cfg.physio_width, modality=modality)
        if modality == "audio":
            return LogMelCNN(shape, dim, width=cfg.audio_width, modality=modality)
    raise ConfigError(
        f"no backbone for modality {modality!r} with input shape {shape}: expected a vector (D,) for table "
        f"modalities, (T, H, W, 3) for video, (C, F, T) or (C, L) for physio, (n_mels, T) for audio"
    )


class Teacher(nn.Module):
    """Multimodal teacher: one backbone per modality (in fusion order), the fusion over them, a head on ``z``."""

    def __init__(
        self, backbones: dict[str, Backbone], fusion: GatedCrossAttentionFusion, head: TaskHead
    ) -> None:
        super().__init__()
        if list(backbones) != list(fusion.modalities):
            raise StageError(
                f"teacher: backbones {list(backbones)} do not match the fusion's {fusion.modalities}"
            )
        self.modalities = list(fusion.modalities)
        self.backbones = module_dict(dict(backbones))
        self.fusion, self.head = fusion, head

    def forward(self, inputs: dict[str, Tensor]) -> ModelOutput:
        """``{modality: batch}`` (extra keys such as ``target`` are ignored) -> :class:`ModelOutput`."""
        if missing := [m for m in self.modalities if m not in inputs]:
            raise StageError(f"teacher: inputs for modalities {missing} are missing (got {sorted(inputs)})")
        tokens = {m: self.backbones[m](inputs[m]) for m in self.modalities}
        z, gates = self.fusion(tokens)
        return ModelOutput(embedding=z, logits=self.head(z), tokens=tokens, gates=gates)


def check_backbone(
    name: str, backbone: Backbone, modality: str, shape: tuple[int, ...] | None, dim: int
) -> None:
    """Raise :class:`StageError` (prefixed ``name``) unless ``backbone`` fits ``modality``, ``shape`` and ``dim``."""
    if not isinstance(backbone, Backbone):
        raise StageError(f"{name}: expected a pkdot Backbone for {modality!r}, got {type(backbone).__name__}")
    if backbone.embed_dim != dim:
        raise StageError(
            f"{name}: the {modality!r} backbone has embed_dim {backbone.embed_dim}, model.embed_dim is {dim}"
        )
    if shape is not None and tuple(shape) != backbone.input_shape:
        raise StageError(
            f"{name}: the {modality!r} backbone was built for input {backbone.input_shape}, the data has {tuple(shape)}"
        )


def build_teacher(
    cfg: RunConfig,
    input_shapes: dict[str, tuple[int, ...]],
    backbones: dict[str, Backbone] | None = None,
    *,
    seed: int | None = None,
) -> Teacher:
    """Compose the teacher of a run; ``input_shapes``: one sample's shape per modality; ``backbones``: used as
    they are (e.g. pre-trained unimodal ones); ``seed``: of the new weights (global RNG restored)."""
    modalities = cfg.data.modalities
    given = dict(backbones or {})
    if extra := sorted(set(given) - set(modalities)):
        raise StageError(
            f"build_teacher: backbones given for {extra}, which are not modalities of the run {modalities}"
        )
    if missing := [m for m in modalities if m not in input_shapes and m not in given]:
        raise StageError(
            f"build_teacher: no input shape for modalities {missing} (got {sorted(input_shapes)})"
        )
    with seeded(seed):
        for m, backbone in given.items():
            check_backbone("build_teacher", backbone, m, input_shapes.get(m), cfg.model.embed_dim)
        parts = {
            m: given[m] if m in given else build_backbone(m, input_shapes[m], cfg.model) for m in modalities
        }
        return Teacher(parts, *fusion_and_head(cfg, modalities))


def fusion_and_head(cfg: RunConfig, modalities: list[str]) -> tuple[GatedCrossAttentionFusion, TaskHead]:
    """The fusion over ``modalities`` and the task head of a run (drawn from the current RNG, in that order)."""
    dim = cfg.model.embed_dim
    fusion = GatedCrossAttentionFusion(
        modalities, dim, cfg.model.fusion_heads, layers=cfg.model.fusion_layers, dropout=cfg.model.dropout
    )
    return fusion, TaskHead(
        dim, cfg.data.num_outputs, cfg.data.is_regression, bounded=cfg.data.task != "regression"
    )
