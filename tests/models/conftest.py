"""Fixtures shared by the model tests: a tiny run configuration factory and random inputs.

(With ``--import-mode=importlib`` test modules cannot import this file, so helpers are fixtures.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from pkdot.config import RunConfig, load_config

#: Tiny model sizes on top of the demo preset (fast on a 2-core CPU).
TINY_MODEL: dict[str, Any] = {
    "model.embed_dim": 16,
    "model.video_width": 4,
    "model.physio_width": 4,
    "model.audio_width": 4,
    "model.mlp_hidden": 16,
    "model.fusion_heads": 2,
    "model.tnet_hidden": [8, 4, 8],
}


@pytest.fixture
def tiny_config() -> Callable[..., RunConfig]:
    """``tiny_config({"data.task": ...})``: the demo preset with tiny model sizes and dotted overrides."""

    def make(overrides: dict[str, Any] | None = None) -> RunConfig:
        return load_config(preset="demo", overrides={**TINY_MODEL, **(overrides or {})})

    return make


@pytest.fixture
def random_input() -> Callable[[tuple[int, ...], int, int], torch.Tensor]:
    """``random_input(shape, batch, seed)``: uint8 pixels for a (T, H, W, 3) clip, float32 features otherwise."""

    def make(shape: tuple[int, ...], batch: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if len(shape) == 4 and shape[-1] == 3:
            return torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, generator=g)
        return torch.randn((batch, *shape), generator=g)

    return make
