"""Least-privilege roles (docs/design.md, S6): ``lqjobs grant`` creates one NOLOGIN role
per component; login users in them may do exactly what their component needs.

(a) each role is denied DDL, TRUNCATE, other schemas, and every queue function
    outside its set (SQLSTATE 42501);
(b) the real components run under their roles: sync jobs complete, a failing job
    fails, an oversized payload is parked by the bridge, an async callback settles,
    a missing callback is failed by the deadline reaper, a scheduled job fires.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from lqjobs.callback.server import build_server
from lqjobs.celery import create_app
from lqjobs.db import JobsDB
from lqjobs.db.fence import Fence
from lqjobs.db.queue import Queue
from lqjobs.db.reads import Reads
from lqjobs.db.scheduled import Scheduled
from lqjobs.errors import DatabaseError
from lqjobs.lease import Lease
from lqjobs.ops import roles
from lqjobs.ops.cli import main
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.scheduler.service import Scheduler
from tests import stack
from tests.least_privilege import Logins, drop_roles, granted_logins, unique_prefix

pytestmark = pytest.mark.integration
TENANT = UUID("11111111-2222-3333-4444-555555555555")
KEYS_TEXT = "k1:" + "least-privilege-signing-key" * 2

# One harmless call per queue function (ids that do not exist, a throwaway worker id).
CALLS = {
    "get_job": "get_job('deny-test', NULL::text[], '1 hour'::interval)",
    "complete_job": "complete_job('deny-test', 0::bigint)",
    "complete_jobs": "complete_jobs(ARRAY[0]::bigint[])",
    "fail_job": "fail_job('deny-test', 0::bigint, 'x')",
    "release_jobs": "release_jobs('deny-test')",
    "reschedule_jobs": "reschedule_jobs(ARRAY[0]::bigint[])",
    "permanently_fail_jobs": "permanently_fail_jobs(ARRAY[0]::bigint[])",
    "get_scheduled_job": "get_scheduled_job('deny-test', ARRAY['no-such-task'])",
    "release_scheduled_jobs": "release_scheduled_jobs('deny-test')",
    "run_scheduled_job": "run_scheduled_job(0::bigint)",
}
# Statements no component may run, whatever its role.
FORBIDDEN = {
    "create table in app_jobs": "CREATE TABLE app_jobs.intruder (i int)",
    "create table in public": "CREATE TABLE public.intruder (i int)",
    "create schema": "CREATE SCHEMA intruder",
    "truncate jobs": "TRUNCATE app_jobs.jobs",
    "truncate scheduled_jobs": "TRUNCATE app_jobs.scheduled_jobs",
    "alter function": "ALTER FUNCTION app_jobs.get_job(text, text[], interval) SECURITY DEFINER",
    "drop table": "DROP TABLE app_jobs.job_queues",
    "select another schema": "SELECT * FROM other.secrets",
    "select public table": "SELECT * FROM public.app_data",
    "alter table": "ALTER TABLE app_jobs.jobs ADD COLUMN intruder int",
    "create function": "CREATE FUNCTION app_jobs.intruder() RETURNS int LANGUAGE sql AS 'SELECT 1'",
}
# Table privileges a component must not have (its functions never need them).
NOT_GRANTED = {
    "bridge": [
        "DELETE FROM app_jobs.jobs",
        "INSERT INTO app_jobs.job_queues (queue_name) VALUES ('x')",
        "SELECT * FROM app_jobs.scheduled_jobs",
    ],
    "worker": [
        "INSERT INTO app_jobs.jobs (database_id, task_identifier) VALUES (gen_random_uuid(), 'x')",
        "SELECT * FROM app_jobs.scheduled_jobs",
    ],
    "callback": ["SELECT * FROM app_jobs.scheduled_jobs", "SELECT nextval('app_jobs.jobs_id_seq')"],
    "scheduler": [
        "UPDATE app_jobs.jobs SET priority = 0",
        "DELETE FROM app_jobs.jobs",
        "DELETE FROM app_jobs.scheduled_jobs",
        "INSERT INTO app_jobs.scheduled_jobs (database_id, task_identifier, schedule_info) "
        "VALUES (gen_random_uuid(), 'x', '{}')",
    ],
}


@pytest.fixture
def logins(db_url: str) -> Iterator[Logins]:
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute("CREATE SCHEMA other")
        admin.execute("CREATE TABLE other.secrets (s text)")
        admin.execute("CREATE TABLE public.app_data (s text)")
    with granted_logins(db_url) as granted:
        yield granted


def sqlstate(url: str, statement: str) -> str | None:
    """The SQLSTATE ``statement`` fails with as this login (None: it succeeded);
    rolled back either way."""
    with psycopg.connect(url) as conn:
        try:
            conn.execute(statement)
        except psycopg.Error as exc:
            return exc.sqlstate
        finally:
            conn.rollback()
    return None


def test_each_role_is_denied_ddl_truncate_other_schemas_and_foreign_functions(
    logins: Logins,
) -> None:
    outcomes: dict[tuple[str, str], str | None] = {}
    for component, url in logins.urls.items():
        for what, statement in FORBIDDEN.items():
            outcomes[(component, what)] = sqlstate(url, statement)
        for statement in NOT_GRANTED[component]:
            outcomes[(component, statement)] = sqlstate(url, statement)
        granted = roles.MATRIX[component].functions
        for function, call in CALLS.items():
            if function not in granted:
                outcomes[(component, function)] = sqlstate(url, f"SELECT * FROM app_jobs.{call}")
    wrong = {key: state for key, state in outcomes.items() if state != "42501"}
    assert not wrong, f"expected permission denied (42501), got: {wrong}"


def test_each_role_may_call_exactly_its_functions(logins: Logins) -> None:
    for component, url in logins.urls.items():
        for function in roles.MATRIX[component].functions:
            call = f"SELECT * FROM app_jobs.{CALLS[function]}"
            assert sqlstate(url, call) is None, (component, function)
    with psycopg.connect(logins.urls["bridge"]) as conn:
        attributes = conn.execute(
            "SELECT bool_or(rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication "
            "OR rolbypassrls OR rolcanlogin) FROM pg_roles WHERE rolname = ANY(%s)",
            [list(logins.groups.values())],
        ).fetchone()
        owned = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE r.rolname = ANY(%s)",
            [list(logins.groups.values()) + list(logins.users.values())],
        ).fetchone()
    assert attributes == (False,)  # NOLOGIN groups with no special powers
    assert owned == (0,)


def test_add_job_stays_callable_by_an_application_role(db_url: str, logins: Logins) -> None:
    """The contract: applications enqueue through add_job (SECURITY DEFINER) with no
    table privileges; only the worker-side functions lost PUBLIC EXECUTE."""
    app_user = f"{unique_prefix()}app"
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(app_user)))
        admin.execute(
            sql.SQL("GRANT USAGE ON SCHEMA app_jobs TO {}").format(sql.Identifier(app_user))
        )
    try:
        url = psycopg.conninfo.make_conninfo(db_url, user=app_user)
        assert sqlstate(url, f"SELECT * FROM app_jobs.add_job('{TENANT}'::uuid, 'x')") is None
        scheduled = (
            f"SELECT * FROM app_jobs.add_scheduled_job('{TENANT}'::uuid, 'x', "
            """schedule_info => '{"rule": "* * * * *"}'::json)"""
        )
        assert sqlstate(url, scheduled) is None
        assert sqlstate(url, f"SELECT * FROM app_jobs.{CALLS['get_job']}") == "42501"
        assert sqlstate(url, f"SELECT * FROM app_jobs.{CALLS['complete_job']}") == "42501"
    finally:
        drop_roles(db_url, [app_user])


def acls(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            """SELECT 'rel', relname, relacl::text FROM pg_class
                WHERE relnamespace = 'app_jobs'::regnamespace
               UNION ALL
               SELECT 'fn', oid::regprocedure::text, proacl::text FROM pg_proc
                WHERE pronamespace = 'app_jobs'::regnamespace
               UNION ALL
               SELECT 'schema', nspname, nspacl::text FROM pg_namespace WHERE nspname = 'app_jobs'
               ORDER BY 1, 2"""
        ).fetchall()


def test_grant_cli_prints_then_applies_idempotently(db_url: str) -> None:
    prefix = unique_prefix()
    names = list(roles.RoleNames.with_prefix(prefix).by_component().values())
    runner = CliRunner()
    try:
        printed = runner.invoke(
            main, ["--database-url", db_url, "grant", "--prefix", prefix], catch_exceptions=False
        )
        assert printed.exit_code == 0, printed.output
        assert printed.output.startswith("-- lqjobs least-privilege roles")
        assert f'GRANT USAGE ON SCHEMA "app_jobs" TO "{prefix}bridge";' in printed.output
        assert "FROM PUBLIC;" in printed.output
        before = acls(db_url)
        assert all(prefix not in str(row) for row in before)  # printing changed nothing
        first = runner.invoke(
            main, ["--database-url", db_url, "grant", "--apply", "--prefix", prefix]
        )
        assert first.exit_code == 0, first.output
        assert f"roles {', '.join(names)} granted" in first.output
        after_first = acls(db_url)
        assert after_first != before
        second = runner.invoke(
            main, ["--database-url", db_url, "grant", "--apply", "--prefix", prefix]
        )
        assert second.exit_code == 0, second.output
        assert acls(db_url) == after_first  # re-running is a no-op
        # The printed script is the same SQL: psql-style, it applies cleanly as well.
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(printed.output.encode())
        assert acls(db_url) == after_first
    finally:
        drop_roles(db_url, names)


def test_keep_public_execute_and_an_over_privileged_existing_role(db_url: str) -> None:
    names = roles.RoleNames.with_prefix(unique_prefix())
    try:
        with psycopg.connect(db_url) as conn:
            roles.apply_grants(conn, roles=names, revoke_public=False)
        with psycopg.connect(db_url) as conn:
            public = conn.execute(
                "SELECT has_function_privilege('public', "
                "'app_jobs.get_job(text, text[], interval)', 'EXECUTE')"
            ).fetchone()
        assert public == (True,)
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute(sql.SQL("ALTER ROLE {} CREATEDB").format(sql.Identifier(names.worker)))
        with psycopg.connect(db_url) as conn, pytest.raises(DatabaseError, match="least privilege"):
            roles.apply_grants(conn, roles=names)
    finally:
        drop_roles(db_url, list(names.by_component().values()))


def test_role_names_are_validated() -> None:
    with pytest.raises(Exception, match="invalid role name"):
        roles.RoleNames.with_prefix('x"; DROP ROLE postgres; --')
    script = roles.grant_sql("we\nird", roles.RoleNames.with_prefix("p_"))
    assert 'ON SCHEMA "we\nird"' in script  # quoted as an identifier, comment line cleaned
    assert script.splitlines()[1].startswith("-- Schema: we ird.")


# -- (b) the components under their roles ---------------------------------------------


@contextlib.contextmanager
def in_thread_stack(logins: Logins, db_url: str, redis_url: str) -> Iterator[Any]:
    """Bridge, Celery worker, callback service and scheduler, each connected as its
    own login, against one function server (sync + async)."""
    stack.flush_broker(redis_url)
    common: dict[str, Any] = {
        "callback_keys": KEYS_TEXT,
        "callback_deadline": 2,
        "max_payload_bytes": 200,
    }
    callback_settings = stack.make_settings(logins.urls["callback"], redis_url, **common)
    service = build_server(callback_settings, host="127.0.0.1", port=0, reaper_interval=0.2)
    service.start()
    try:
        with FunctionServer() as functions:
            routed = {
                "executor": "openfaas",
                "task_executors": {"async-fn": "openfaas-async"},
                "internal_gateway_url": functions.url,
                "internal_jobs_callback_url": f"{service.url}/callback",
                **common,
            }
            worker_settings = stack.make_settings(logins.urls["worker"], redis_url, **routed)
            bridge_settings = stack.make_settings(logins.urls["bridge"], redis_url, **routed)
            scheduler_settings = stack.make_settings(logins.urls["scheduler"], redis_url, **routed)
            app = create_app(worker_settings)
            with (
                stack.worker(app, 4),
                stack.bridge(bridge_settings, app) as bridge,
                stack.in_thread(Scheduler(scheduler_settings), "scheduler", 10) as scheduler,
            ):
                yield functions, service, bridge, scheduler
    finally:
        service.stop()


def test_components_run_under_their_roles(db_url: str, redis_url: str, logins: Logins) -> None:
    jobs_db = JobsDB()
    with psycopg.connect(db_url, autocommit=True) as conn:
        sync_ids = [jobs_db.queue.add_job(conn, TENANT, "sync-fn", {"i": i}).id for i in range(5)]
        serial = jobs_db.queue.add_job(conn, TENANT, "sync-fn", {"q": 1}, queue_name="serial").id
        failing = jobs_db.queue.add_job(
            conn, TENANT, "sync-fn", {"error": "boom"}, max_attempts=1
        ).id
        permanent = jobs_db.queue.add_job(conn, TENANT, "sync-fn", {"status": 400}).id
        oversized = jobs_db.queue.add_job(conn, TENANT, "sync-fn", {"pad": "x" * 300}).id
        async_ids = [jobs_db.queue.add_job(conn, TENANT, "async-fn", {"i": i}).id for i in range(3)]
        async_failed = jobs_db.queue.add_job(
            conn, TENANT, "async-fn", {"error": "async boom"}, max_attempts=1
        ).id
        silent = jobs_db.queue.add_job(
            conn, TENANT, "async-fn", {"drop_callback": True}, max_attempts=1
        ).id
        scheduled = jobs_db.scheduled.add_scheduled_job(
            conn, TENANT, "tick-fn", {}, {"rule": "* * * * * *"}
        ).id
    parked = {failing, permanent, oversized, async_failed, silent}

    def unsettled() -> int:  # besides the scheduled job's own runs
        return stack.count(
            db_url,
            "task_identifier <> 'tick-fn' AND NOT (locked_by IS NULL AND attempts >= max_attempts)",
        )

    with in_thread_stack(logins, db_url, redis_url) as (functions, service, bridge, scheduler):
        wait_until(lambda: unsettled() == 0, 30, "every job to settle")
        wait_until(
            lambda: any(call.task == "tick-fn" for call in functions.calls.all()),
            15,
            "a scheduled job to fire and run",
        )
        metrics = {sample.name: sample.value for sample in bridge.metrics()}  # queue gauges
        assert scheduler.failures == 0 and bridge.failures == 0
        assert service.service.healthy()
    assert metrics["jobs_failed_permanently"] >= 4
    with psycopg.connect(db_url, autocommit=True) as conn:
        errors = dict(
            conn.execute(
                "SELECT id, last_error FROM app_jobs.jobs WHERE id = ANY(%s)", [list(parked)]
            ).fetchall()
        )
        fired = conn.execute(
            "SELECT last_scheduled_id FROM app_jobs.scheduled_jobs WHERE id = %s", [scheduled]
        ).fetchone()
    assert errors[failing] is not None and "boom" in errors[failing]
    assert errors[permanent] is not None and "HTTP 400" in errors[permanent]
    assert errors[oversized] is not None and errors[oversized].startswith("payload too large")
    assert errors[async_failed] is not None and "async boom" in errors[async_failed]
    assert errors[silent] == "callback not received within 2s"
    assert set(errors) == parked
    assert fired is not None and fired[0] is not None
    counters = service.service.counters
    assert counters["completed"] == len(async_ids) and counters["failed"] == 1
    assert counters["deadline_failed"] == 1
    called = {call.job_id for call in functions.calls.all()}
    assert set(sync_ids) | {serial} | set(async_ids) <= called


def _statement_calls() -> dict[str, Any]:
    """One harmless call of every statement ``roles.STATEMENTS`` lists (a lease and
    ids that match no row): what each needs of its role is checked as it starts."""
    hour = timedelta(hours=1)
    lease = Lease(0, "deny-test", 1, datetime(2026, 1, 1, tzinfo=UTC))
    queue, reads, fence, scheduled = Queue(), Reads(), Fence(), Scheduled()
    return {
        "Queue.get_jobs_under_cap": lambda c: queue.get_jobs_under_cap(
            c, "deny-test", ["no-such-task"], hour, 1, 10
        ),
        "Queue.fail_job_permanently": lambda c: queue.fail_job_permanently(c, "deny-test", 0, "x"),
        "Queue.fail_abandoned_leases": lambda c: queue.fail_abandoned_leases(c, hour, "x"),
        "Reads.count_locked_by": lambda c: reads.count_locked_by(c, "deny-test"),
        "Reads.jobs_locked_by": lambda c: reads.jobs_locked_by(c, "deny-test", hour),
        "Reads.queue_gauges": lambda c: reads.queue_gauges(c, None, hour),
        "Reads.seconds_until_next_job": lambda c: reads.seconds_until_next_job(c, None, hour),
        "Fence.preflight": lambda c: fence.preflight(c, lease),
        "Fence.release_advisory": lambda c: fence.release_advisory(c, 0),
        "Fence.fenced_complete": lambda c: (
            fence.fenced_complete(c, lease),
            fence.fenced_complete(c, lease, release_advisory=True),
        ),
        "Fence.fenced_fail": lambda c: (
            fence.fenced_fail(c, lease, "x"),
            fence.fenced_fail(c, lease, "x", release_advisory=True),
        ),
        "Fence.fenced_fail_permanently": lambda c: fence.fenced_fail_permanently(c, lease, "x"),
        "Fence.fenced_give_back": lambda c: fence.fenced_give_back(c, lease, "x"),
        "Fence.lock_lease_state": lambda c: fence.lock_lease_state(c, lease, lease.locked_at),
        "Scheduled.get_scheduled_job": lambda c: scheduled.get_scheduled_job(
            c, "deny-test", ["no-such-task"]
        ),
        "Scheduled.release_scheduled_jobs": lambda c: scheduled.release_scheduled_jobs(
            c, "deny-test"
        ),
        "Scheduled.run_scheduled_job": lambda c: scheduled.run_scheduled_job(c, 0, hour),
        "Scheduled.scheduled_jobs_locked_by": lambda c: scheduled.scheduled_jobs_locked_by(
            c, "deny-test"
        ),
    }


def test_each_component_may_run_every_statement_it_lists(logins: Logins) -> None:
    calls = _statement_calls()
    denied: dict[tuple[str, str], str | None] = {}
    for component, statements in roles.STATEMENTS.items():
        with psycopg.connect(logins.urls[component], autocommit=True) as conn:
            for statement in statements:
                try:
                    calls[statement](conn)
                except DatabaseError as exc:
                    denied[(component, statement)] = exc.sqlstate
    assert denied == {}


def test_a_statement_outside_a_components_list_is_denied(logins: Logins) -> None:
    """The negative control: the grants are narrow enough that borrowing another
    component's statement fails."""
    calls = _statement_calls()
    with (
        psycopg.connect(logins.urls["bridge"], autocommit=True) as conn,
        pytest.raises(DatabaseError) as denied,
    ):
        calls["Fence.fenced_complete"](conn)  # the bridge never deletes
    assert denied.value.sqlstate == "42501"
    with (
        psycopg.connect(logins.urls["scheduler"], autocommit=True) as conn,
        pytest.raises(DatabaseError) as denied,
    ):
        calls["Queue.get_jobs_under_cap"](conn)
    assert denied.value.sqlstate == "42501"
