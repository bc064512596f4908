"""Session services for the whole suite: a real Postgres and a real Redis.

By default both come from pip packages (the ``embedded`` extra), so ``pytest``
on a fresh machine starts what it needs. ``LQJOBS_TEST_DATABASE_URL`` /
``LQJOBS_TEST_REDIS_URL`` point the suite at external servers instead.
The schema is installed once into a template database; every test that asks
for ``db_url`` gets a fresh copy of it.
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
from lqjobs.ops.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.databases import database_url, drop_database, recreate_database

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


@pytest.fixture(scope="session")
def embedded_pg(services_dir: Path) -> Iterator[EmbeddedPostgres | None]:
    if os.environ.get("LQJOBS_TEST_DATABASE_URL"):
        yield None
        return
    server = EmbeddedPostgres(services_dir / "pg", durable=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_url(embedded_pg: EmbeddedPostgres | None) -> str:
    """Superuser URL of the test cluster's maintenance database."""
    return os.environ.get("LQJOBS_TEST_DATABASE_URL") or embedded_pg.url  # type: ignore[union-attr]


@pytest.fixture(scope="session")
def psql_bin(embedded_pg: EmbeddedPostgres | None) -> str:
    return embedded_pg.bin("psql") if embedded_pg else "psql"


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
