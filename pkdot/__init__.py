"""pkdot: privileged multimodal knowledge distillation with optimal transport (PKDOT)."""

from __future__ import annotations

__version__ = "0.1.0"

from pkdot.errors import ConfigError, DatasetError, FeatureError, PkdotError, StageError, StaleCacheError

__all__ = [
    "ConfigError",
    "DatasetError",
    "FeatureError",
    "PkdotError",
    "StageError",
    "StaleCacheError",
    "__version__",
]
