"""One bounded scheduler over Ray tasks (training runs and extraction shards): :func:`run_bounded`, Ray's "limit
pending tasks with ``ray.wait``" pattern. Failures end in one error naming every failed item:
:class:`InfrastructureError` (the flow retries it) when every failure is one of the infrastructure, else ``error``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pkdot.errors import InfrastructureError, PkdotError, StageError, resource_error
from pkdot.progress import report
from pkdot.ray_utils import is_infrastructure_error

T = TypeVar("T")


def run_bounded(
    items: Sequence[T],
    start: Callable[[T], Any],
    *,
    limit: int,
    what: str,
    describe: Callable[[T], str] = str,
    error: type[PkdotError] = StageError,
    drain: bool = True,
    on_result: Callable[[T, Any], None] | None = None,
    stage: str | None = None,
    unit: str = "tasks",
    done: int = 0,
    total: int | None = None,
    weight: Callable[[T], int] = lambda _item: 1,
    poll: Callable[[list[T]], str | None] | None = None,
    poll_s: float | None = None,
) -> list[Any]:
    """Run ``start(item)`` (submits a Ray task, returns its ref) for every item, ``limit`` at a time; return the
    results in completion order. After a failure no task starts and the running ones finish (``drain``) or are
    cancelled; an interrupt cancels them. Progress (only with ``stage``): ``done`` units before this call of
    ``total``, each finished item adds ``weight(item)``; ``poll(in flight)`` every ``poll_s`` s: a detail text."""
    import ray

    total = done + sum(weight(i) for i in items) if total is None else total
    waiting, in_flight = list(items), {}
    results: list[Any] = []
    failures: list[tuple[T, BaseException]] = []
    detail = ""

    def progress() -> None:
        if stage is not None:
            report(stage, done, total, unit, detail)

    progress()
    try:
        while waiting or in_flight:
            while waiting and len(in_flight) < max(1, limit) and not failures:
                item = waiting.pop(0)
                in_flight[start(item)] = item
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_s)
            if poll is not None:
                detail = poll(list(in_flight.values())) or detail
            for ref in ready:
                item = in_flight.pop(ref)
                try:
                    results.append(result := ray.get(ref))
                except Exception as exc:  # Ray wraps the task's errors in its own types
                    failures.append((item, exc))
                    if not drain:
                        for other in in_flight:
                            ray.cancel(other)
                        in_flight.clear()
                    continue
                if on_result is not None:
                    on_result(item, result)
                done += weight(item)
            progress()
    except BaseException:
        for ref in in_flight:  # interrupted: stop what runs
            ray.cancel(ref, force=True)
        raise
    if failures:
        described = "; ".join(f"{describe(i)}: {type(e).__name__}: {e}" for i, e in failures)
        not_started = f", {len(waiting)} not started" if waiting else ""
        message = f"{what} failed in {len(failures)} task(s){not_started}: {described}"
        exhausted = next((r for r in (resource_error(e) for _, e in failures) if r is not None), None)
        if exhausted is not None:  # a full disk, memory, ...: one line, never retried
            raise exhausted from failures[0][1]
        if all(is_infrastructure_error(e) for _, e in failures):
            raise InfrastructureError(
                f"{message} (Ray infrastructure failure; finished work is kept, re-run to resume)"
            ) from failures[0][1]
        raise error(message) from failures[0][1]
    return results
