"""Progress of a long stage, reported by the library and shown by whoever listens (a Prefect artifact, a bar).

The library calls :func:`report` at natural boundaries (a shard extracted, a training job finished) on the
driver; :func:`listening` installs a listener for the duration of a block. With no listener, :func:`report`
does nothing, so library code never depends on who shows the progress.

Example::

    with listening(lambda p: print(f"{p.stage}: {p.done}/{p.total} {p.unit}")):
        stage_distill(cfg)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units (``"jobs"``, ``"video shards"``...) of ``stage`` are finished.

    ``detail``: what is running now, e.g. the latest epoch's validation metric (``""`` when unknown).
    """

    stage: str
    done: int
    total: int
    unit: str
    detail: str = ""

    @property
    def percent(self) -> float:
        """``100 * done / total`` in [0, 100] (100 when there is nothing to do)."""
        if self.total <= 0:
            return 100.0
        return max(0.0, min(100.0, 100.0 * self.done / self.total))


Listener = Callable[[Progress], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


def report(stage: str, done: int, total: int, unit: str, detail: str = "") -> None:
    """Tell every listener that ``done`` of ``total`` units of ``stage`` are finished (``detail``: what runs now).

    A listener that raises is logged and skipped: showing progress must never fail the stage.
    """
    progress = Progress(stage, int(done), int(total), unit, str(detail))
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(progress)
        except Exception as exc:  # noqa: BLE001 - a display problem must not stop the work
            logger.warning("progress listener %r failed on %s: %s", listener, progress, exc)


@contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    """Call ``listener`` on every :func:`report` made inside the block (in this process)."""
    with _lock:
        _listeners.append(listener)
    try:
        yield listener
    finally:
        with _lock:
            _listeners.remove(listener)
