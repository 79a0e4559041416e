"""Backbones for physiological signals: a 2-D CNN on spectrograms and a 1-D CNN on raw windows.

- :class:`SpectrogramCNN`: ``(B, C, F, T) -> tokens (B, T', D)``: a small ResNet (stem + 4 stages of 2 basic
  blocks, widths ``w, 2w, 4w, 8w``, stride 2 each, like ResNet-18 without the max-pool) over the
  ``(F, T)`` plane with ``C`` input channels (one per physiological channel), then the mean over frequency,
  so the tokens run along time (``T' = ceil(T / 16)``). The paper used a ResNet-18 with 1 input channel on one
  EMG channel's spectrogram.
- :class:`WindowCNN`: ``(B, C, L) -> tokens (B, L', D)``: the same design in 1-D over the filtered window
  (stem stride 2 + 4 stages of stride 2: ``L' = ceil(L / 32)``).

Both end in ``Linear(8w, D) -> ReLU -> Linear(D, D)`` (the paper's 512 -> 512 projection).
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from pkdot.errors import ConfigError
from pkdot.models.heads import Backbone

log = logging.getLogger(__name__)


class BasicBlock2d(nn.Module):
    """ResNet basic block in 2-D: ``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        )
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + shortcut)


class BasicBlock1d(nn.Module):
    """ResNet basic block in 1-D (kernel 7): ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, kernel: int = 7) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Sequential(
            nn.Conv1d(in_channels, channels, kernel, stride=stride, padding=pad, bias=False),
            nn.BatchNorm1d(channels),
            nn.ReLU(inplace=True),
        )
        self.conv2 = nn.Sequential(
            nn.Conv1d(channels, channels, kernel, padding=pad, bias=False), nn.BatchNorm1d(channels)
        )
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv1d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm1d(channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + shortcut)


def _stages(block: type[nn.Module], width: int) -> nn.Sequential:
    """Four stages of two blocks, widths ``w, 2w, 4w, 8w``, the first block of each with stride 2."""
    layers: list[nn.Module] = []
    cin = width
    for mult in (1, 2, 4, 8):
        cout = mult * width
        layers += [block(cin, cout, stride=2), block(cout, cout)]
        cin = cout
    return nn.Sequential(*layers)


def _projection(channels: int, embed_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim))


class SpectrogramCNN(Backbone):
    """2-D ResNet-ish encoder of a ``(C, F, T)`` spectrogram: ``(B, C, F, T) -> tokens (B, T', D)``.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, F, T)``: channels, frequencies, time frames.
    embed_dim : int
        Token dimension ``D``.
    width : int
        Channels of the first stage ``w``.
    modality : str
        Modality name (``physio``; :class:`pkdot.models.audio.LogMelCNN` reuses it for ``audio``).
    """

    def __init__(
        self, input_shape: tuple[int, ...], embed_dim: int, width: int = 8, modality: str = "physio"
    ) -> None:
        super().__init__(modality, input_shape, embed_dim)
        if len(self.input_shape) != 3:
            raise ConfigError(
                f"{modality} backbone: expected a spectrogram shape (C, F, T), got {self.input_shape}"
            )
        self.stem = nn.Sequential(
            nn.Conv2d(self.input_shape[0], width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.stages = _stages(BasicBlock2d, width)
        self.projection = _projection(8 * width, embed_dim)

    def encode(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))  # (B, 8w, F', T')
        tokens = features.mean(dim=2).transpose(1, 2)  # (B, T', 8w)
        return self.projection(tokens)


class WindowCNN(Backbone):
    """1-D ResNet-ish encoder of a raw ``(C, L)`` window: ``(B, C, L) -> tokens (B, L', D)``.

    Parameters
    ----------
    input_shape : tuple of int
        ``(C, L)``: channels and samples.
    embed_dim : int
        Token dimension ``D``.
    width : int
        Channels of the first stage ``w``.
    modality : str
        Modality name.
    """

    def __init__(
        self, input_shape: tuple[int, ...], embed_dim: int, width: int = 8, modality: str = "physio"
    ) -> None:
        super().__init__(modality, input_shape, embed_dim)
        if len(self.input_shape) != 2:
            raise ConfigError(f"{modality} backbone: expected a window shape (C, L), got {self.input_shape}")
        self.stem = nn.Sequential(
            nn.Conv1d(self.input_shape[0], width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
        )
        self.stages = _stages(BasicBlock1d, width)
        self.projection = _projection(8 * width, embed_dim)

    def encode(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))  # (B, 8w, L')
        return self.projection(features.transpose(1, 2))
