"""Audio backbone: a 2-D CNN on a log-mel spectrogram, tokens along time.

``(B, n_mels, T) -> (B, 1, n_mels, T) ->`` the :class:`pkdot.models.physio.SpectrogramCNN` design with one input
channel (width ``cfg.model.audio_width``) ``-> tokens (B, T', D)``, ``T' = ceil(T / 16)``.
"""

from __future__ import annotations

from torch import Tensor

from pkdot.errors import ConfigError
from pkdot.models.physio import SpectrogramCNN


class LogMelCNN(SpectrogramCNN):
    """Log-mel encoder: ``float (B, n_mels, T) -> tokens (B, T', D)``."""

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
