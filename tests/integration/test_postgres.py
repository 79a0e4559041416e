"""The compose stack's Postgres setup, natively: infra/postgres/init-databases.sh on a real PostgreSQL server,
then a Prefect server on the database it created (the URL form docker-compose.yml gives prefect-server).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pkdot.ray_utils import free_port

pytestmark = pytest.mark.integration

SUPERUSER = "pkdot"


def _as_postgres(command: str) -> subprocess.CompletedProcess:
    # initdb refuses to run as root: the cluster belongs to the `postgres` system user.
    argv = ["su", "postgres", "-c", command] if os.geteuid() == 0 else ["sh", "-c", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _postgres_tool(name: str) -> str:
    """A PostgreSQL server program: on PATH, else in Debian's versioned folder."""
    found = shutil.which(name) or next(
        iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.fail(f"{name} is not installed (Debian: apt-get install postgresql)")
    return str(found)


@pytest.fixture(scope="module")
def postgres() -> Iterator[dict[str, str]]:
    initdb, pg_ctl = _postgres_tool("initdb"), _postgres_tool("pg_ctl")
    if shutil.which("psql") is None:
        pytest.fail("psql is not installed (Debian: apt-get install postgresql-client)")
    root = Path(tempfile.mkdtemp(prefix="pkdot-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    done = _as_postgres(f"{initdb} -D {data} -U {SUPERUSER} --auth=trust")
    assert done.returncode == 0, done.stderr
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    done = _as_postgres(f"{pg_ctl} -D {data} -o '{opts}' -l {root}/server.log -w start")
    assert done.returncode == 0, done.stderr + (root / "server.log").read_text(errors="replace")
    try:
        yield {"PGHOST": "127.0.0.1", "PGPORT": str(port), "POSTGRES_USER": SUPERUSER}
    finally:
        _as_postgres(f"{pg_ctl} -D {data} -m fast -w stop")
        shutil.rmtree(root, ignore_errors=True)


def _databases(pg: dict[str, str]) -> set[str]:
    out = subprocess.run(
        ["psql", "-h", pg["PGHOST"], "-p", pg["PGPORT"], "-U", SUPERUSER, "-d", "postgres", "-tAc",
         "select datname from pg_database"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return set(out.stdout.split())


def _init(it, pg: dict[str, str], prefect_db: str, mlflow_db: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **pg, PREFECT_DB=prefect_db, MLFLOW_DB=mlflow_db)
    script = it.REPO / "infra" / "postgres" / "init-databases.sh"
    return subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)


def test_init_script_creates_both_databases_idempotently(it, postgres) -> None:
    for _ in range(2):  # a restart of the container must not fail on existing databases
        done = _init(it, postgres, "prefect", "mlflow")
        assert done.returncode == 0, done.stderr
    assert {"prefect", "mlflow"} <= _databases(postgres)
    same = _init(it, postgres, "shared", "shared")
    assert same.returncode != 0 and "must differ" in same.stderr
    assert "shared" not in _databases(postgres)


def test_prefect_server_runs_on_the_created_database(
    it, postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _init(it, postgres, "prefect", "mlflow").returncode == 0
    # the stack's own Prefect server (and its start-up rule on a port another program takes), on the database
    monkeypatch.setenv(
        "PREFECT_API_DATABASE_CONNECTION_URL",
        f"postgresql+asyncpg://{SUPERUSER}:@{postgres['PGHOST']}:{postgres['PGPORT']}/prefect",
    )
    stack = it.local_stack.LocalStack(tmp_path / "stack", free_ports=True)
    try:
        stack.start(["prefect"], timeout=180)
        tables = subprocess.run(
            ["psql", "-h", postgres["PGHOST"], "-p", postgres["PGPORT"], "-U", SUPERUSER, "-d", "prefect", "-tAc",
             "select count(*) from information_schema.tables where table_name in ('flow', 'flow_run', 'deployment')"],
            capture_output=True, text=True, check=True, timeout=30,
        )  # fmt: skip
    finally:
        stack.stop()
    assert tables.stdout.strip() == "3", "Prefect did not create its tables in the Postgres database"
