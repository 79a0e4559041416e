"""Prefect orchestration of the pkdot pipeline: the flow ``pkdot`` and its deployment ``full-pipeline``.

The flow is a thin wrapper: each task calls :func:`pkdot.pipeline.run_stage`; no pipeline logic lives here.
"""

from __future__ import annotations
