"""MLP backbone for feature vectors (bring-your-own tables): ``(B, D_in) -> one token (B, 1, D)``.

``x -> Linear(D_in, h) -> ReLU -> Dropout -> Linear(h, D) -> ReLU -> Linear(D, D)`` with ``h`` =
``cfg.model.mlp_hidden``; the last ``Linear(D, D)`` mirrors the other backbones' projection.
"""

from __future__ import annotations

from torch import Tensor, nn

from pkdot.errors import ConfigError
from pkdot.models.heads import Backbone


class MLPBackbone(Backbone):
    """Vector encoder: ``float (B, D_in) -> tokens (B, 1, D)`` (``modality``: the table column)."""

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
