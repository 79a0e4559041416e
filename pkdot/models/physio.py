"""CNN backbones on spectrograms (physio; audio's log-mel as one channel) and on raw physio windows (1-D).

Both are a small ResNet (stem + 4 stages of 2 basic blocks, widths ``w, 2w, 4w, 8w``, stride 2 each, like
ResNet-18 without the max-pool; the paper used a ResNet-18 on one EMG channel's spectrogram) ending in
``Linear(8w, D) -> ReLU -> Linear(D, D)`` (the paper's 512 -> 512 projection), tokens along time."""

from __future__ import annotations

from torch import Tensor, nn

from pkdot.errors import ConfigError
from pkdot.models.heads import Backbone, BasicBlock, conv_bn


class _ResNetEncoder(Backbone):
    """Stem, four stages of two :class:`BasicBlock` (widths ``w, 2w, 4w, 8w``, the first of each with stride 2)
    and the projection, in the subclass's ``dims`` = 1 or 2 dimensions over ``input_shape = (C, *spatial)``."""

    dims: int
    kernel: int

    def __init__(
        self, input_shape: tuple[int, ...], embed_dim: int, width: int = 8, modality: str = "physio"
    ) -> None:
        super().__init__(modality, input_shape, embed_dim)
        dims, kernel = self.dims, self.kernel
        if len(self.input_shape) != dims + 1:
            what = "a spectrogram shape (C, F, T)" if dims == 2 else "a window shape (C, L)"
            raise ConfigError(f"{modality} backbone: expected {what}, got {self.input_shape}")
        stride = 2 if dims == 1 else 1
        self.stem = conv_bn(dims, self.input_shape[0], width, kernel, stride=stride, padding=kernel // 2)
        layers: list[nn.Module] = []
        for cin, cout in ((width, width), (width, 2 * width), (2 * width, 4 * width), (4 * width, 8 * width)):
            layers += [BasicBlock(dims, cin, cout, 2, kernel), BasicBlock(dims, cout, cout, 1, kernel)]
        self.stages = nn.Sequential(*layers)
        self.projection = nn.Sequential(
            nn.Linear(8 * width, embed_dim), nn.ReLU(), nn.Linear(embed_dim, embed_dim)
        )


class SpectrogramCNN(_ResNetEncoder):
    """2-D encoder of a ``(C, F, T)`` spectrogram (channels, frequencies, time frames) -> tokens ``(B, T', D)``,
    ``T' = ceil(T / 16)`` (mean over frequency)."""

    dims, kernel = 2, 3

    def encode(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))  # (B, 8w, F', T')
        return self.projection(features.mean(dim=2).transpose(1, 2))


class WindowCNN(_ResNetEncoder):
    """1-D encoder of a raw ``(C, L)`` window (channels, samples) -> tokens ``(B, L', D)``, ``L' = ceil(L / 32)``."""

    dims, kernel = 1, 7

    def encode(self, x: Tensor) -> Tensor:
        features = self.stages(self.stem(x))  # (B, 8w, L')
        return self.projection(features.transpose(1, 2))


class LogMelCNN(SpectrogramCNN):
    """Log-mel encoder: ``float (B, n_mels, T) -> (B, 1, n_mels, T) ->`` :class:`SpectrogramCNN` ``-> (B, T', D)``."""

    def __init__(
        self, input_shape: tuple[int, ...], embed_dim: int, width: int = 8, modality: str = "audio"
    ) -> None:
        if len(input_shape) != 2:
            raise ConfigError(
                f"{modality} backbone: expected a log-mel shape (n_mels, T), got {tuple(input_shape)}"
            )
        super().__init__((1, *input_shape), embed_dim, width=width, modality=modality)
        self.input_shape = tuple(int(s) for s in input_shape)

    def encode(self, x: Tensor) -> Tensor:
        return super().encode(x.unsqueeze(1))
