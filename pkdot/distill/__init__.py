"""Distillation losses: PKDOT (optimal transport between similarity structures) and the baselines.

One module per loss: a plain loss function and a class registered under its name. The losses are the names of
:data:`pkdot.config.LOSSES` (one options section each in :class:`pkdot.config.DistillConfig`), and the imports
below register exactly those (``tests/distill/test_base.py`` checks it); :func:`build_loss` builds one."""

from __future__ import annotations

from pkdot.distill import crd, fitnet, kd, none, pkdot, pkt, rkd, sp  # noqa: F401
from pkdot.distill.base import (
    CompositeLoss,
    DistillBatch,
    DistillLoss,
    available_losses,
    build_loss,
    gather_rows,
    register,
    total_loss,
    world_size,
)
from pkdot.distill.pkdot import pkdot_loss, pkdot_structure

__all__ = [
    "CompositeLoss",
    "DistillBatch",
    "DistillLoss",
    "available_losses",
    "build_loss",
    "gather_rows",
    "pkdot_loss",
    "pkdot_structure",
    "register",
    "total_loss",
    "world_size",
]
