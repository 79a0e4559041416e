"""Serve the flow ``pkdot`` as the deployment ``full-pipeline`` from this process (no work pool needed).

Usage (from the repository root, with ``PREFECT_API_URL`` pointing at a Prefect server)::

    python -m flows.serve                      # serves pkdot/full-pipeline until Ctrl-C
    prefect deployment run pkdot/full-pipeline --watch --param preset=demo

Flow runs execute in subprocesses of this one and inherit its environment (``MLFLOW_TRACKING_URI``,
``RAY_ADDRESS``). The team stack uses a process work pool instead (``prefect.yaml``, ``prefect deploy --all``);
both give the same deployment name, so ``prefect deployment run pkdot/full-pipeline`` works with either.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import Any

from flows.pipeline import pipeline
from pkdot.errors import ConfigError

logger = logging.getLogger(__name__)

DEPLOYMENT_NAME = "full-pipeline"


def parse_parameters(items: Sequence[str]) -> dict[str, Any]:
    """``["preset=demo", 'overrides={"synth.subjects": 4}']`` -> default parameters of the deployment.

    Each value is parsed as JSON when it is valid JSON, else kept as a string (like ``prefect deployment run
    --param``).
    """
    params: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--param {item!r}: expected NAME=VALUE, e.g. preset=demo")
        name, raw = item.split("=", 1)
        try:
            params[name.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            params[name.strip()] = raw
    return params


def main(argv: Sequence[str] | None = None) -> None:
    """Serve ``pkdot/full-pipeline`` until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name (default: %(default)s)")
    parser.add_argument(
        "--limit", type=int, default=1, help="flow runs executed at once (default: %(default)s)"
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="default flow parameter of the deployment (JSON value), repeatable",
    )
    args = parser.parse_args(argv)
    if args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    logging.basicConfig(level=logging.INFO)
    pipeline.serve(
        name=args.name,
        limit=args.limit,
        parameters=parse_parameters(args.param),
        description="PKDOT: manifest -> extract -> train-teacher -> cache -> distill -> evaluate",
        tags=["pkdot"],
    )


if __name__ == "__main__":
    main()
