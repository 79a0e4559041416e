"""How the suite is spread over pytest-xdist workers (``make test`` runs ``pytest -n 2``).

Each test module is one unit of work, so a module's own fixtures (a tiny run, a trained model) are built once, on
one worker; ``tests/integration/servers/`` is one unit, because its modules share the servers
``tests/integration/conftest.py`` starts (a session fixture: one stack per worker that needs it). Units go out in
collection order with the integration units first: they are the longest, and a long unit that starts last keeps one
worker busy while the other idles. Without xdist (plain ``pytest``) only the order changes.
"""

from __future__ import annotations

from typing import Any

import pytest

INTEGRATION = "tests/integration/"
SERVERS = INTEGRATION + "servers/"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(INTEGRATION))  # stable: otherwise collection order


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return SERVERS if module.startswith(SERVERS) else module

    config.option.loadscopereorder = False  # keep the order above (xdist would sort units by test count)
    return ByModule(config, log)
