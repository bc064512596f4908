"""Session services for the whole suite: a real Postgres and a real Redis.

By default both come from pip packages (the ``embedded`` extra), so ``pytest``
on a fresh machine starts what it needs, and when a system PostgreSQL is
installed (Debian's ``postgresql``, as users run it: JIT on) every test that
needs a database runs on it too, on a private server started from its binaries.
``LQJOBS_TEST_POSTGRES`` picks the servers: a comma-separated list of
``embedded``, ``system`` and URLs (a superuser's, to a maintenance database), for
example ``LQJOBS_TEST_POSTGRES=system``. ``LQJOBS_TEST_REDIS_URL`` points the suite
at an external Redis. Under ``CI`` a missing system server is an error, not a skip.
The schema is installed once into a template database per server; every test
that asks for ``db_url`` gets a fresh copy of it.
"""

from __future__ import annotations

import gc
import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from lqjobs.ops import migrate
from lqjobs.ops.embedded import EmbeddedPostgres, EmbeddedRedis, system_postgres_bin_dir
from tests.databases import PostgresServer, database_url, drop_database, recreate_database

TEMPLATE_DB = "lqjobs_template"
_counter = itertools.count()

# The suite constructs Settings itself; the developer's shell must not leak in.
for _name in list(os.environ):
    if _name.startswith(
        ("LQJOBS_", "JOBS_", "PG", "INTERNAL_", "KNATIVE_")
    ) and not _name.startswith("LQJOBS_TEST_"):
        del os.environ[_name]
os.environ.pop("DATABASE_URL", None)


def pytest_collection_finish(session: pytest.Session) -> None:
    # What exists now (the imported modules, the collected tests) is never scanned
    # again: a full collection after each test then costs about 1 ms, not 50.
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def collect_garbage_after_each_test() -> Iterator[None]:
    """A socket or file left open in a reference cycle warns (an error here) when the
    collector frees it, which may be during any later test. Collecting after each
    test makes the leak fail the test that made it, at its teardown, with the
    socket's allocation traceback under PYTHONTRACEMALLOC=20."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="lqjobs-test-"))
    folder.chmod(0o755)  # postgres runs as a non-root user when the suite runs as root
    yield folder


def chosen_servers() -> list[str]:
    chosen = os.environ.get("LQJOBS_TEST_POSTGRES") or os.environ.get("LQJOBS_TEST_DATABASE_URL")
    if chosen:
        return [part.strip() for part in chosen.split(",") if part.strip()]
    if system_postgres_bin_dir() is not None or os.environ.get("CI"):
        return ["embedded", "system"]
    return ["embedded"]


def _server_id(server: str) -> str:
    return server if server in ("embedded", "system") else "url"  # never a password in an id


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that needs a database runs once per chosen server, grouped by
    server (one server runs at a time); ``one_postgres`` tests run on the first."""
    if "postgres_server" not in metafunc.fixturenames:
        return
    servers = chosen_servers()
    if metafunc.definition.get_closest_marker("one_postgres"):
        servers = servers[:1]
    metafunc.parametrize(
        "postgres_server",
        servers,
        indirect=True,
        scope="session",
        ids=[_server_id(server) for server in servers],
    )


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest, services_dir: Path) -> Iterator[PostgresServer]:
    kind: str = request.param
    if kind not in ("embedded", "system"):
        yield PostgresServer("url", kind, None)
        return
    bin_dir = None
    if kind == "system":
        bin_dir = system_postgres_bin_dir()
        if bin_dir is None:
            raise RuntimeError("no system PostgreSQL: apt-get install postgresql (.ci/run does)")
    # A throwaway cluster: fsync off on either server (the only setting a test changes
    # from the server's defaults but for address, port, socket and max_connections).
    server = EmbeddedPostgres(services_dir / f"pg-{kind}", durable=False, bin_dir=bin_dir)
    server.start()
    try:
        bin_dir = Path(server.bin("psql")).parent
        yield PostgresServer(kind, server.url, bin_dir, server.data_dir / "server.log")
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_url(postgres_server: PostgresServer) -> str:
    """Superuser URL of the test cluster's maintenance database."""
    return postgres_server.url


@pytest.fixture(scope="session")
def psql_bin(postgres_server: PostgresServer) -> str:
    return postgres_server.bin("psql")


@pytest.fixture(scope="session")
def template_db(pg_url: str) -> str:
    """Name of a database holding the freshly migrated app_jobs schema."""
    recreate_database(pg_url, TEMPLATE_DB)
    migrate.migrate(database_url(pg_url, TEMPLATE_DB))
    return TEMPLATE_DB


@pytest.fixture
def empty_db_url(pg_url: str) -> Iterator[str]:
    """A fresh database with nothing installed."""
    name = f"lqjobs_empty_{os.getpid()}_{next(_counter)}"
    recreate_database(pg_url, name)
    yield database_url(pg_url, name)
    drop_database(pg_url, name)


@pytest.fixture
def db_url(pg_url: str, template_db: str) -> Iterator[str]:
    """A fresh database, copied from the template: app_jobs installed, no jobs."""
    name = f"lqjobs_test_{os.getpid()}_{next(_counter)}"
    recreate_database(pg_url, name, template=template_db)
    yield database_url(pg_url, name)
    drop_database(pg_url, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to a fresh database with app_jobs installed."""
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


@pytest.fixture(scope="session")
def redis_url(services_dir: Path) -> Iterator[str]:
    external = os.environ.get("LQJOBS_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = EmbeddedRedis(services_dir / "redis")
    server.start()
    yield server.url
    server.stop()
