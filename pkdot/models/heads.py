"""Shared model pieces: the :class:`ModelOutput` every model returns, the :class:`Backbone` base (and the MLP
backbone of table data), task heads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pkdot.errors import ConfigError, StageError


@dataclass
class ModelOutput:
    """What every teacher, student and unimodal model returns.

    ``embedding`` (B, D): the distilled embedding (the fused ``z``; a unimodal model's mean token).
    ``logits`` (B, C), or the regression output (B, 1). ``tokens``: per-modality backbone tokens (B, N_m, D)
    (a student's privileged entries are its T-Nets' (B, 1, D)). ``gates`` (B, M): the fusion's mean gate of
    each modality, rows summing to 1 (None for unimodal models)."""

    embedding: Tensor
    logits: Tensor
    tokens: dict[str, Tensor]
    gates: Tensor | None = None


# ModelOutput crosses torch.export (mlflow.pytorch.log_model's default format) as a pytree node.
torch.export.register_dataclass(ModelOutput, serialized_type_name="pkdot.models.ModelOutput")


class Backbone(nn.Module):
    """A modality encoder: ``forward(x) -> tokens (B, N, D)`` for ``x`` of shape ``(B, *input_shape)``; checks
    the shape and dtype (``uint8`` face crops or floating features), then calls the subclass's :meth:`encode`."""

    #: ``True`` for backbones that read raw ``uint8`` pixels; others read floating-point features.
    expects_uint8: bool = False

    def __init__(self, modality: str, input_shape: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        self.modality = modality
        self.input_shape = tuple(int(s) for s in input_shape)
        self.embed_dim = int(embed_dim)

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement encode()")

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape or x.dim() != len(self.input_shape) + 1:
            raise StageError(
                f"{self.modality} backbone: expected input of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        if self.expects_uint8 and x.dtype != torch.uint8:
            raise StageError(f"{self.modality} backbone: expected uint8 pixels (0..255), got dtype {x.dtype}")
        if not self.expects_uint8:
            if not x.is_floating_point():
                raise StageError(
                    f"{self.modality} backbone: expected floating-point features, got dtype {x.dtype}"
                )
            weight = next(self.parameters(), None)
            x = x if weight is None else x.to(weight.dtype)  # e.g. float64 features into a float32 network
        return self.encode(x)


class MLPBackbone(Backbone):
    """Vector encoder for bring-your-own tables (``modality``: the table column): ``float (B, D_in) ->`` one token
    ``(B, 1, D)`` by ``Linear(D_in, hidden) -> ReLU -> Dropout -> Linear(hidden, D) -> ReLU -> Linear(D, D)``,
    the last ``Linear(D, D)`` mirroring the other backbones' projection."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        embed_dim: int,
        hidden: int = 64,
        dropout: float = 0.1,
        modality: str = "vector",
    ) -> None:
        super().__init__(modality, input_shape, embed_dim)
        if len(self.input_shape) != 1:
            raise ConfigError(f"{modality} backbone: expected a vector shape (D_in,), got {self.input_shape}")
        self.layers = nn.Sequential(
            nn.Linear(self.input_shape[0], hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, embed_dim),
            nn.ReLU(),
        )
        self.projection = nn.Linear(embed_dim, embed_dim)

    def encode(self, x: Tensor) -> Tensor:
        return self.projection(self.layers(x)).unsqueeze(1)


class TaskHead(nn.Module):
    """Linear head on a ``(B, dim)`` embedding: logits ``(B, num_outputs)``, or for regression ``tanh(w^T z + b)``
    ``(B, 1)`` in [-1, 1] (``bounded=False``, a table's free-range ``target``: ``w^T z + b``)."""

    def __init__(self, dim: int, num_outputs: int, regression: bool, *, bounded: bool = True) -> None:
        super().__init__()
        if regression and num_outputs != 1:
            raise StageError(f"TaskHead: a regression head has 1 output, got num_outputs={num_outputs}")
        if not regression and num_outputs < 2:
            raise StageError(
                f"TaskHead: a classification head needs >= 2 classes, got num_outputs={num_outputs}"
            )
        self.regression, self.bounded = regression, bounded
        self.linear = nn.Linear(dim, num_outputs)

    def forward(self, embedding: Tensor) -> Tensor:
        out = self.linear(embedding)
        return torch.tanh(out) if self.regression and self.bounded else out


class UnimodalModel(nn.Module):
    """One backbone + a :class:`TaskHead` on its mean token ``(B, D)`` (the unimodal baselines / pre-training)."""

    def __init__(
        self, backbone: Backbone, num_outputs: int, regression: bool, *, bounded: bool = True
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = TaskHead(backbone.embed_dim, num_outputs, regression, bounded=bounded)

    def forward(self, x: Tensor) -> ModelOutput:
        tokens = self.backbone(x)
        embedding = tokens.mean(dim=1)
        return ModelOutput(embedding, self.head(embedding), {self.backbone.modality: tokens})


def conv_bn(dims: int, cin: int, cout: int, kernel: Any, relu: bool = True, **conv: Any) -> nn.Sequential:
    """``Conv{dims}d(cin, cout, kernel, bias=False, **conv) -> BatchNorm{dims}d -> ReLU`` (no ReLU: ``relu=False``)."""
    layers = [(nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](cin, cout, kernel, bias=False, **conv)]
    layers.append((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1](cout))
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class BasicBlock(nn.Module):
    """ResNet basic block in ``dims`` = 1, 2 or 3 dimensions: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``,
    ``stride`` in the first convolution; torchvision's module names, so ``r3d_18`` weights load into the 3-D one."""

    def __init__(self, dims: int, in_channels: int, channels: int, stride: int = 1, kernel: int = 3) -> None:
        super().__init__()
        self.conv1 = conv_bn(dims, in_channels, channels, kernel, stride=stride, padding=kernel // 2)
        self.conv2 = conv_bn(dims, channels, channels, kernel, relu=False, padding=kernel // 2)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = conv_bn(dims, in_channels, channels, 1, relu=False, stride=stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + shortcut)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with ``torch.manual_seed(seed)``, restoring the global CPU RNG state afterwards (None: as is)."""
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield
