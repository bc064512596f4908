"""A managed Postgres (RDS, Cloud SQL, Azure, ...): no superuser, no extension, no
ALTER SYSTEM. lqjobs is set up and run entirely with the roles such a service gives.

What the test needs, and where it comes from: the fixture plays the service's
console. As the test cluster's superuser it creates, and does nothing else:

- an owner role: LOGIN CREATEROLE, and NOSUPERUSER NOCREATEDB NOREPLICATION
  NOBYPASSRLS (like RDS's and Cloud SQL's "postgres" user, which is not a superuser
  but may create roles);
- a database that role owns, with nothing installed in it.

Everything after runs as that owner: ``lqjobs migrate``, ``lqjobs grant --apply``,
one LOGIN user per component in its group role (``CREATE ROLE ... IN ROLE``, which
CREATEROLE allows), ``lqjobs doctor``. Then a bridge and a Celery worker, each
connected as its own login, run real jobs through a function server: one completes
through the worker's fenced complete, one is failed permanently by it. The test
cluster trusts local connections, so the passwords are set but not checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql

from lqjobs.celery import create_app
from lqjobs.ops import roles
from lqjobs.ops.cli import main
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests import stack
from tests.databases import database_url, drop_database
from tests.least_privilege import create_logins, drop_roles, unique_prefix

pytestmark = pytest.mark.integration
PASSWORD = "not-checked"


@dataclass(frozen=True)
class Managed:
    owner: str
    owner_url: str  # the owner, connected to the database it owns
    prefix: str  # of the group roles `lqjobs grant` creates


@pytest.fixture
def managed(pg_url: str) -> Iterator[Managed]:
    """The console's part, as superuser: the owner role and its database only."""
    prefix = unique_prefix()
    owner, dbname = f"{prefix}owner", f"{prefix}managed"
    with psycopg.connect(pg_url, autocommit=True) as console:
        console.execute(
            sql.SQL(
                "CREATE ROLE {} LOGIN PASSWORD {} CREATEROLE "
                "NOSUPERUSER NOCREATEDB NOREPLICATION NOBYPASSRLS"
            ).format(sql.Identifier(owner), sql.Literal(PASSWORD))
        )
        console.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(dbname), sql.Identifier(owner)
            )
        )
    owner_url = psycopg.conninfo.make_conninfo(
        database_url(pg_url, dbname), user=owner, password=PASSWORD
    )
    try:
        yield Managed(owner, owner_url, prefix)
    finally:
        drop_database(pg_url, dbname)
        groups = list(roles.RoleNames.with_prefix(prefix).by_component().values())
        created = [f"{group}_login" for group in groups] + groups + [owner]
        drop_roles(pg_url, created)  # logins, then groups, then the owner that made them
        with psycopg.connect(pg_url) as console:  # roles are cluster-wide: none may leak
            left = console.execute(
                "SELECT count(*) FROM pg_roles WHERE starts_with(rolname, %s)", [prefix]
            ).fetchone()
        assert left == (0,)


def lqjobs(url: str, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["--database-url", url, *args], env=env)


def test_a_non_superuser_owner_migrates_grants_and_runs_the_bridge_and_a_worker(
    managed: Managed, redis_url: str
) -> None:
    with psycopg.connect(managed.owner_url) as conn:
        powers = conn.execute(
            "SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, d.datdba = r.oid "
            "FROM pg_roles r, pg_database d "
            "WHERE r.rolname = current_user AND d.datname = current_database()"
        ).fetchone()
    assert powers == (False, True, False, True)  # not superuser; CREATEROLE; owns the database

    migrated = lqjobs(managed.owner_url, "migrate")
    assert migrated.exit_code == 0, migrated.output
    assert "schema app_jobs: installed" in migrated.output
    granted = lqjobs(managed.owner_url, "grant", "--apply", "--prefix", managed.prefix)
    assert granted.exit_code == 0, granted.output
    names = roles.RoleNames.with_prefix(managed.prefix)
    logins = create_logins(managed.owner_url, names, PASSWORD)
    with psycopg.connect(managed.owner_url) as conn:
        installed = conn.execute(
            "SELECT nspowner::regrole::text, (SELECT array_agg(extname::text) FROM pg_extension) "
            "FROM pg_namespace WHERE nspname = 'app_jobs'"
        ).fetchone()
    assert installed == (managed.owner, ["plpgsql"])  # the owner's schema; no extension

    env = {"LQJOBS_BROKER_URL": redis_url, "JOBS_SUPPORT_ANY": "true"}
    doctor = lqjobs(managed.owner_url, "doctor", env=env)
    assert doctor.exit_code == 0, doctor.output
    assert "ok    listener" in doctor.output and "ok    server" in doctor.output

    [done] = stack.add_jobs(managed.owner_url, "hello", 1)
    [parked] = stack.add_jobs(managed.owner_url, "hello", 1, {"status": 400}, max_attempts=3)
    with FunctionServer() as functions:
        seen = _run_bridge_and_worker(logins.urls, redis_url, functions, managed.owner_url)
        called = {call.job_id for call in functions.calls.all()}
    assert {logins.users["bridge"], logins.users["worker"]} <= seen
    assert called == {done, parked}
    with psycopg.connect(managed.owner_url) as conn:
        rows = conn.execute("SELECT id, attempts, last_error FROM app_jobs.jobs").fetchall()
    assert [row[:2] for row in rows] == [(parked, 3)]  # done is deleted; parked at once
    assert "HTTP 400" in rows[0][2]


def _run_bridge_and_worker(
    urls: dict[str, str], redis_url: str, functions: FunctionServer, owner_url: str
) -> set[str]:
    """Run until every job is settled; return the users connected meanwhile."""
    routed = {"executor": "openfaas", "internal_gateway_url": functions.url}
    worker_settings = stack.make_settings(urls["worker"], redis_url, **routed)
    bridge_settings = stack.make_settings(urls["bridge"], redis_url, **routed)
    stack.flush_broker(redis_url)
    app = create_app(worker_settings)
    unsettled = "NOT (locked_by IS NULL AND attempts >= max_attempts)"
    with stack.worker(app, 2), stack.bridge(bridge_settings, app) as bridge:
        wait_until(lambda: stack.count(owner_url, unsettled) == 0, 30, "both jobs to settle")
        with psycopg.connect(owner_url) as conn:
            users = conn.execute(
                "SELECT array_agg(DISTINCT usename::text) FROM pg_stat_activity "
                "WHERE datname = current_database()"
            ).fetchone()
        assert bridge.failures == 0
    return set(users[0]) if users and users[0] else set()
