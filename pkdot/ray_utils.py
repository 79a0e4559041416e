"""Starting (or joining) Ray the same way everywhere in pkdot."""

from __future__ import annotations

import logging
import os

from pkdot.errors import ConfigError

logger = logging.getLogger(__name__)


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> bool:
    """Initialise Ray unless it already is; return True when this call started it (the caller shuts it down).

    Parameters
    ----------
    num_cpus : CPUs of a local Ray (None = all of the machine's). Ignored when joining a cluster.
    address : a Ray cluster (``"auto"`` or ``host:port``); None = ``$RAY_ADDRESS`` if set, else a new local
        Ray without the dashboard. Usage statistics are disabled (``RAY_USAGE_STATS_ENABLED=0``).
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target:
        logger.info("joining the Ray cluster at %s", target)
        try:
            ray.init(address=target, logging_level=logging.WARNING, log_to_driver=True)
        except ConnectionError as exc:
            source = "ray_address" if address else "$RAY_ADDRESS"
            raise ConfigError(f"{source} {target!r}: cannot connect to a Ray cluster there ({exc})") from exc
    else:
        logger.info("starting a local Ray (num_cpus=%s)", num_cpus)
        # The dashboard (ray[default]) also serves the State API that Ray Train's placement-group cleaner
        # polls; without it the cleaner floods the log. Bound to localhost only.
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
        )
        url = ray._private.worker.global_worker.node.address_info.get("webui_url")
        if url:
            logger.warning("local Ray started; dashboard at http://%s", url)
    return True
