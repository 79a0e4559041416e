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

from torch import Tensor, nn

from pkdot.errors import ConfigError
from pkdot.models.heads import Backbone, BasicBlock


def _stages(dims: int, width: int, kernel: int) -> nn.Sequential:
    """Four stages of two :class:`BasicBlock`, widths ``w, 2w, 4w, 8w``, the first block of each with stride 2."""
    layers: list[nn.Module] = []
    cin = width
    for mult in (1, 2, 4, 8):
        cout = mult * width
        layers += [BasicBlock(dims, cin, cout, 2, kernel), BasicBlock(dims, cout, cout, 1, kernel)]
        cin = cout
    return nn.Sequential(*layers)


def _projection(channels: int, embed_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(channels, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim))


class SpectrogramCNN(Backbone):
    """2-D ResNet-ish encoder of a ``(C, F, T)`` spectrogram: ``(B, C, F, T) -> tokens (B, T', D)``.

    Parameters
    ----------
    input_shape : ``(C, F, T)``: channels, frequencies, time frames.
    embed_dim : Token dimension ``D``.
    width : Channels of the first stage ``w``.
    modality : Modality name (``physio``; :class:`pkdot.models.audio.LogMelCNN` reuses it for ``audio``).
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
        self.stages = _stages(2, width, kernel=3)
        self.projection = _projection(8 * width, embed_dim)

    def encode(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))  # (B, 8w, F', T')
        tokens = features.mean(dim=2).transpose(1, 2)  # (B, T', 8w)
        return self.projection(tokens)


class WindowCNN(Backbone):
    """1-D ResNet-ish encoder of a raw ``(C, L)`` window: ``(B, C, L) -> tokens (B, L', D)``.

    Parameters
    ----------
    input_shape : ``(C, L)``: channels and samples.
    embed_dim : Token dimension ``D``.
    width : Channels of the first stage ``w``.
    modality : Modality name.
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
        self.stages = _stages(1, width, kernel=7)
        self.projection = _projection(8 * width, embed_dim)

    def encode(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))  # (B, 8w, L')
        return self.projection(features.transpose(1, 2))
