"""Stage 1: features from raw recordings (face crops, physiological windows, log-mel audio).

``run_extract`` (in :mod:`pkdot.features.extract`) is imported lazily so that reading feature tables
(:mod:`pkdot.features.schema`) does not pull in OpenCV, PyAV or Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_extract"]


def __getattr__(name: str) -> Any:
    if name == "run_extract":
        from pkdot.features.extract import run_extract

        return run_extract
    raise AttributeError(f"module 'pkdot.features' has no attribute {name!r}")
