"""Progress of a long stage, reported by the library (:func:`report`, on the driver) and shown by whoever listens
(:func:`listening`: a Prefect artifact, a bar); with no listener :func:`report` does nothing."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units (``"jobs"``, ``"video shards"``...) of ``stage`` are finished; ``detail``: what
    runs now, e.g. the latest epoch's validation metric."""

    stage: str
    done: int
    total: int
    unit: str
    detail: str = ""

    @property
    def percent(self) -> float:
        """``100 * done / total`` in [0, 100] (100 when there is nothing to do)."""
        return 100.0 if self.total <= 0 else max(0.0, min(100.0, 100.0 * self.done / self.total))


Listener = Callable[[Progress], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


def report(stage: str, done: int, total: int, unit: str, detail: str = "") -> None:
    """Tell every listener; one that raises is logged and skipped (showing progress must never fail the stage)."""
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
