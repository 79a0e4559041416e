"""Distillation losses: PKDOT (optimal transport between similarity structures) and the baselines.

Importing this package imports every module in it, so each ``@register("name")`` runs: adding a loss is
one new file with one decorated :class:`DistillLoss` subclass. Registered names: ``none``, ``kd``,
``fitnet``, ``sp``, ``rkd``, ``pkt``, ``crd``, ``pkdot``.

Example
-------
>>> from pkdot.config import DistillConfig
>>> from pkdot.distill import build_loss
>>> loss = build_loss("pkdot", student_dim=64, teacher_dim=64, num_outputs=2, regression=False,
...                   num_samples=100, cfg=DistillConfig())
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterable

from pkdot.distill.base import (
    DistillBatch,
    DistillLoss,
    available_losses,
    build_loss,
    check_weights,
    default_weights,
    gather_batch,
    gather_rows,
    loss_weight,
    register,
    total_loss,
    world_size,
)

logger = logging.getLogger(__name__)


def import_loss_modules(package_path: Iterable[str], package_name: str) -> list[str]:
    """Import every module of a package (non-recursive), so that their ``@register`` decorators run.

    Parameters
    ----------
    package_path : iterable of str
        The package's ``__path__``.
    package_name : str
        The package's ``__name__``.

    Returns
    -------
    list of str
        The imported module names, sorted.
    """
    names = sorted(f"{package_name}.{info.name}" for info in pkgutil.iter_modules(list(package_path)))
    for name in names:
        importlib.import_module(name)
    logger.debug("imported loss modules %s", names)
    return names


import_loss_modules(__path__, __name__)

from pkdot.distill.ot import sinkhorn_divergence, transport_plan  # noqa: E402
from pkdot.distill.pkdot import StructureClouds, pkdot_loss, pkdot_structure  # noqa: E402

__all__ = [
    "DistillBatch",
    "DistillLoss",
    "StructureClouds",
    "available_losses",
    "build_loss",
    "check_weights",
    "default_weights",
    "gather_batch",
    "gather_rows",
    "import_loss_modules",
    "loss_weight",
    "pkdot_loss",
    "pkdot_structure",
    "register",
    "sinkhorn_divergence",
    "total_loss",
    "transport_plan",
    "world_size",
]
