"""How the suite is spread over pytest-xdist workers (``make test`` runs ``pytest -n 2``).

Each test module is one unit of work, so a module's own fixtures (a tiny run, a trained model) are built once, on
one worker; ``tests/integration/`` is one unit, because its modules share the servers its conftest starts (a
session fixture: one stack per worker that needs it). Units go out longest first, as far as a mark tells: the
integration unit, then the other modules with ``integration`` tests (real servers, whole tiny pipelines), then the
rest in collection order; a long unit that starts last keeps one worker busy while the other idles (measured:
871 s of tests on 2 workers with only the integration unit first, for 1,636 s of work).
Without xdist (plain ``pytest``) only the order changes.
"""

from __future__ import annotations

from typing import Any

import pytest

INTEGRATION = "tests/integration/"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    heavy = {i.nodeid.split("::", 1)[0] for i in items if i.get_closest_marker("integration") is not None}
    items.sort(  # stable: otherwise collection order
        key=lambda item: (not item.nodeid.startswith(INTEGRATION), item.nodeid.split("::", 1)[0] not in heavy)
    )


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return INTEGRATION if module.startswith(INTEGRATION) else module

    config.option.loadscopereorder = False  # keep the order above (xdist would sort units by test count)
    return ByModule(config, log)
