"""3-D CNN backbones for face clips: an R3D-18-like network (``r3d18``, Tran et al., CVPR 2018) and ``small3d``.

``uint8 (B, T, H, W, 3)`` crops are scaled to [0, 1], standardised with the Kinetics-400 statistics and permuted
to ``(B, 3, T, H, W)``; the body's output is averaged over space and projected to tokens ``(B, T', D)``. ``r3d18``
uses torchvision's ``r3d_18`` module names, so a local Kinetics state_dict loads (:func:`load_pretrained_video`).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
from torch import Tensor, nn

from pkdot.errors import ConfigError
from pkdot.models.heads import Backbone, BasicBlock, conv_bn

log = logging.getLogger(__name__)

#: Per-channel RGB mean / std of Kinetics-400 (the R3D-18 pre-training statistics).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


class R3D18Body(nn.Module):
    """R3D-18 body: stem (3x7x7, stride (1, 2, 2)), 4 stages of 2 3-D :class:`BasicBlock`, widths ``w .. 8w``
    (``w = 64`` is R3D-18), strides 1, 2, 2, 2: ``(B, 3, T, H, W) -> (B, 8w, ceil(T / 8), H', W')``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.stem = conv_bn(3, 3, w, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
        self.layer1 = nn.Sequential(BasicBlock(3, w, w), BasicBlock(3, w, w))
        self.layer2 = nn.Sequential(BasicBlock(3, w, 2 * w, stride=2), BasicBlock(3, 2 * w, 2 * w))
        self.layer3 = nn.Sequential(BasicBlock(3, 2 * w, 4 * w, stride=2), BasicBlock(3, 4 * w, 4 * w))
        self.layer4 = nn.Sequential(BasicBlock(3, 4 * w, 8 * w, stride=2), BasicBlock(3, 8 * w, 8 * w))
        self.out_channels = 8 * w

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


class Small3dBody(nn.Module):
    """Three 3x3x3 conv + BN + ReLU stages, widths ``w, 2w, 4w``, strides (1,2,2), (1,2,2), (2,2,2):
    ``(B, 3, T, H, W) -> (B, 4w, ceil(T / 2), H / 8, W / 8)``, seconds per epoch on a CPU at demo sizes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        stages = ((3, w, (1, 2, 2)), (w, 2 * w, (1, 2, 2)), (2 * w, 4 * w, (2, 2, 2)))
        self.stages = nn.Sequential(
            *(conv_bn(3, cin, cout, 3, stride=s, padding=1) for cin, cout, s in stages)
        )
        self.out_channels = 4 * w

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)


class VideoBackbone(Backbone):
    """Face-clip encoder: ``uint8 (B, T, H, W, 3) -> tokens (B, T', D)``; the body's ``(B, T', C)`` spatial means
    go through ``Linear(C, D) -> ReLU -> Linear(D, D)`` (only the final ``Linear(D, D)`` when ``C == D``)."""

    expects_uint8 = True
    mean: Tensor
    std: Tensor

    def __init__(
        self, input_shape: tuple[int, ...], embed_dim: int, arch: str = "small3d", width: int = 8
    ) -> None:
        super().__init__("video", input_shape, embed_dim)
        if len(self.input_shape) != 4 or self.input_shape[3] != 3:
            raise ConfigError(f"video backbone: expected input_shape (T, H, W, 3), got {self.input_shape}")
        self.arch, self.body = arch, {"r3d18": R3D18Body, "small3d": Small3dBody}[arch](width)
        channels = self.body.out_channels
        to_embed = [] if channels == embed_dim else [nn.Linear(channels, embed_dim), nn.ReLU()]
        self.to_embed = nn.Sequential(*to_embed)
        self.projection = nn.Linear(embed_dim, embed_dim)
        self.register_buffer("mean", torch.tensor(KINETICS_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(KINETICS_STD).view(1, 3, 1, 1, 1), persistent=False)

    def normalise(self, x: Tensor) -> Tensor:
        """``uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W)`` scaled to [0, 1] and standardised."""
        x = x.permute(0, 4, 1, 2, 3).to(self.mean.dtype) / 255.0
        return (x - self.mean) / self.std

    def encode(self, x: Tensor) -> Tensor:
        features = self.body(self.normalise(x))  # (B, C, T', H', W')
        tokens = features.mean(dim=(3, 4)).transpose(1, 2)  # (B, T', C)
        return self.projection(self.to_embed(tokens))


def load_pretrained_video(backbone: VideoBackbone, path: str | Path) -> None:
    """Load a local state_dict (``torch.save`` of a dict of tensors) into a video backbone; nothing is downloaded.

    Either a whole :class:`VideoBackbone` state_dict (same architecture, width and ``embed_dim``), or the keys
    of ``backbone.body`` only (e.g. torchvision's ``r3d_18`` Kinetics weights for ``r3d18`` with
    ``video_width=64``; its classifier ``fc.*`` is ignored; the projection stays as initialised)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.pretrained_video: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ConfigError(
            f"model.pretrained_video: {path} is not a readable torch state_dict: {exc}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained_video: {path} does not hold a state_dict (a dict of tensors)")
    keys, full_keys, body_keys = set(state), set(backbone.state_dict()), set(backbone.body.state_dict())
    if keys == full_keys:
        target: nn.Module = backbone
    elif keys - {"fc.weight", "fc.bias"} == body_keys:
        target = backbone.body
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    else:
        expected = full_keys if keys & full_keys else body_keys
        missing, unexpected = sorted(expected - keys), sorted(keys - expected)
        raise ConfigError(
            f"model.pretrained_video: {path} does not match the {backbone.arch} video backbone "
            f"(width/embed_dim of this run): {len(missing)} missing keys, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}"
        )
    current = target.state_dict()
    if wrong := [
        f"{k}: file {tuple(v.shape)} vs model {tuple(current[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(current[k].shape)
    ]:
        raise ConfigError(
            f"model.pretrained_video: {path} has {len(wrong)} tensors of the wrong shape "
            f"(check model.video_width / model.embed_dim), e.g. {wrong[:3]}"
        )
    target.load_state_dict(state, strict=True)
    part = "whole backbone" if target is backbone else "CNN body (projection freshly initialised)"
    log.info("loaded pretrained video weights from %s into the %s", path, part)
