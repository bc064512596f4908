"""Database errors around a call (docs/design.md, F8): before the call, any error
means "deliver again later", never ack-and-drop; after it, only the bookkeeping is
retried, on any error, and the function is never called again for it.

The errors come from the real server: a row-level security policy on ``jobs``
calls a function that raises the SQLSTATE under test for the worker's login, in
the statement that carries a marker (the preflight, or the fenced completion),
a given number of times. Sessions the server really ends (terminated, reaped by
``idle_session_timeout``) are tested as they are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

from lqjobs.broker_state import StartedMarks
from lqjobs.celery import create_app
from lqjobs.db import Connection
from lqjobs.db.base import translated_errors
from lqjobs.db.fence import Fence
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.worker import JobRunner, Result
from tests.least_privilege import Logins, granted_logins
from tests.runners import lock_job, make_runner, row
from tests.stack import bridge, count, flush_broker, make_settings, worker

pytestmark = pytest.mark.integration
BEFORE = "pg_try_advisory_lock"  # a marker of the preflight statement
AFTER = "complete_job"  # ... and of the fenced completion
STATES = ["08006", "57P01", "57P05", "25006", "40001", "40P01", "53300"]
INJECTOR = """
CREATE SCHEMA lqjobs_faults;
GRANT USAGE ON SCHEMA lqjobs_faults TO PUBLIC;
CREATE TABLE lqjobs_faults.plan (login name, marker text, sqlstate text, budget int);
CREATE SEQUENCE lqjobs_faults.fired;
CREATE FUNCTION lqjobs_faults.inject() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
  planned record;
BEGIN
  FOR planned IN SELECT * FROM lqjobs_faults.plan LOOP
    IF session_user = planned.login AND strpos(current_query(), planned.marker) > 0
       AND nextval('lqjobs_faults.fired') <= planned.budget THEN
      RAISE EXCEPTION 'injected fault' USING ERRCODE = planned.sqlstate;
    END IF;
  END LOOP;
  RETURN true;
END $$;
CREATE POLICY inject ON app_jobs.jobs USING (lqjobs_faults.inject());
ALTER TABLE app_jobs.jobs ENABLE ROW LEVEL SECURITY;
"""


@pytest.fixture
def logins(db_url: str) -> Iterator[Logins]:
    with granted_logins(db_url) as granted:
        yield granted


@pytest.fixture
def faults(db_url: str, conn: psycopg.Connection[Any], logins: Logins) -> Any:
    conn.execute(INJECTOR)

    def plan(marker: str, sqlstate: str, budget: int) -> None:
        conn.execute(
            "INSERT INTO lqjobs_faults.plan VALUES (%s, %s, %s, %s)",
            [logins.users["worker"], marker, sqlstate, budget],
        )

    return plan


def fired(conn: psycopg.Connection[Any]) -> int:
    """How many times the injector was evaluated (each of the first budget ones raised)."""
    found = conn.execute("SELECT last_value FROM lqjobs_faults.fired").fetchone()
    return int(found[0]) if found else 0


@pytest.fixture
def runner(logins: Logins, redis_url: str, functions: FunctionServer) -> Iterator[JobRunner]:
    running = make_runner(logins.urls["worker"], redis_url, functions, check=True)
    yield running
    running.close()


@pytest.mark.parametrize("sqlstate", STATES)
def test_an_error_before_the_call_delivers_again_later(
    conn: psycopg.Connection[Any],
    runner: JobRunner,
    functions: FunctionServer,
    faults: Any,
    sqlstate: str,
) -> None:
    faults(BEFORE, sqlstate, 2)
    lease = lock_job(conn, "noop", {})
    results = [runner.run(lease, "noop", f"call-{i}", redelivered=False) for i in range(3)]
    assert results == [Result.UNAVAILABLE, Result.UNAVAILABLE, Result.COMPLETED]
    assert len(functions.calls.calls_for(lease.job_id)) == 1
    assert row(conn, lease.job_id) is None


@pytest.mark.parametrize("sqlstate", STATES)
def test_an_error_after_the_call_retries_the_bookkeeping_only(
    conn: psycopg.Connection[Any],
    runner: JobRunner,
    functions: FunctionServer,
    faults: Any,
    sqlstate: str,
) -> None:
    faults(AFTER, sqlstate, 2)
    lease = lock_job(conn, "noop", {})
    assert runner.run(lease, "noop", "call-1", redelivered=False) is Result.COMPLETED
    assert len(functions.calls.calls_for(lease.job_id)) == 1
    assert row(conn, lease.job_id) is None
    assert fired(conn) > 2  # both faults were raised, then the write went through


@pytest.mark.parametrize(
    "error", [psycopg.InterfaceError("no state"), psycopg.OperationalError("no state")]
)
def test_a_driver_error_without_sqlstate_before_the_call_delivers_again(
    conn: psycopg.Connection[Any],
    runner: JobRunner,
    functions: FunctionServer,
    monkeypatch: pytest.MonkeyPatch,
    error: psycopg.Error,
) -> None:
    lease = lock_job(conn, "noop", {})
    real = Fence.preflight
    failures = iter([error])

    def failing_once(self: Fence, c: Connection, lease: Any) -> Any:
        for raised in failures:
            with translated_errors():
                raise raised
        return real(self, c, lease)

    monkeypatch.setattr(Fence, "preflight", failing_once)
    assert runner.run(lease, "noop", "call-1", redelivered=False) is Result.UNAVAILABLE
    assert runner.run(lease, "noop", "call-2", redelivered=False) is Result.COMPLETED
    assert len(functions.calls.calls_for(lease.job_id)) == 1


def worker_sessions(conn: psycopg.Connection[Any], login: str) -> int:
    found = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s", [login]
    ).fetchone()
    return int(found[0]) if found else 0


def terminate(conn: psycopg.Connection[Any], login: str) -> None:
    conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [login]
    )
    wait_until(lambda: worker_sessions(conn, login) == 0, 5, "the sessions to end")


@pytest.mark.parametrize("check", [True, False], ids=["checked", "negative-control"])
def test_the_pool_never_hands_out_a_session_the_server_ended(
    conn: psycopg.Connection[Any],
    logins: Logins,
    redis_url: str,
    functions: FunctionServer,
    check: bool,
) -> None:
    login = logins.users["worker"]
    conn.execute(
        sql.SQL("ALTER ROLE {} SET idle_session_timeout = '1s'").format(sql.Identifier(login))
    )
    runner = make_runner(logins.urls["worker"], redis_url, functions, check=check)
    try:
        first = lock_job(conn, "noop", {})
        assert runner.run(first, "noop", "call-1", redelivered=False) is Result.COMPLETED
        # The server reaps the idle pooled session (57P05).
        wait_until(lambda: worker_sessions(conn, login) == 0, 10, "the idle session to be reaped")
        second = lock_job(conn, "noop", {})
        result = runner.run(second, "noop", "call-2", redelivered=False)
    finally:
        runner.close()
    if check:
        assert result is Result.COMPLETED
    else:  # the oracle sees the bug: the dead session fails the delivery
        assert result is Result.UNAVAILABLE


def test_a_session_ended_during_the_call_costs_no_second_call(
    db_url: str,
    conn: psycopg.Connection[Any],
    logins: Logins,
    runner: JobRunner,
    functions: FunctionServer,
) -> None:
    """The session holding the advisory lock is terminated while the function runs:
    the outcome is written on a fresh session, the function called once."""
    lease = lock_job(conn, "slow", {"sleep": 1.0})
    results: list[Result] = []
    call = threading.Thread(
        target=lambda: results.append(runner.run(lease, "slow", "call-1", redelivered=False))
    )
    call.start()
    wait_until(lambda: _locked(conn), 5, "the call to start")
    terminate(conn, logins.users["worker"])
    call.join(30)
    assert results == [Result.COMPLETED]
    assert len(functions.calls.calls_for(lease.job_id)) == 1
    assert row(conn, lease.job_id) is None


def _locked(conn: psycopg.Connection[Any]) -> bool:
    found = conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
    ).fetchone()
    return bool(found and found[0])


def test_a_real_worker_delivers_again_after_a_read_only_window(
    db_url: str,
    redis_url: str,
    logins: Logins,
    functions: FunctionServer,
    faults: Any,
) -> None:
    """Through Celery: the failing deliveries are retried, not acknowledged and
    lost; once the database accepts the preflight, the function runs once."""
    faults(BEFORE, "25006", 2)
    flush_broker(redis_url)
    options = {"executor": "knative", "knative_ingress_url": functions.url}
    worker_settings = make_settings(logins.urls["worker"], redis_url, **options)
    app = create_app(worker_settings)
    with psycopg.connect(db_url, autocommit=True) as owner:
        lease = lock_job(owner, "noop", {})
        owner.execute(
            "UPDATE app_jobs.jobs SET locked_by = NULL, locked_at = NULL, attempts = 0 "
            "WHERE id = %s",
            [lease.job_id],
        )
    with worker(app, concurrency=2), bridge(make_settings(db_url, redis_url, **options), app):
        wait_until(lambda: count(db_url) == 0, 30, "the job to complete")
    assert len(functions.calls.calls_for(lease.job_id)) == 1


@pytest.mark.parametrize("marked", [True, False], ids=["recording-mark", "negative-control"])
def test_a_second_delivery_waits_while_the_outcome_is_being_written(
    conn: psycopg.Connection[Any],
    runner: JobRunner,
    functions: FunctionServer,
    faults: Any,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    marked: bool,
) -> None:
    """The call is over but its bookkeeping keeps failing (a read-only window) past the
    call bound; a redelivery (the visibility timeout ran out) must not take the worker,
    alive and retrying, for lost: that would run the job a second time."""
    client = redis.Redis.from_url(redis_url)
    runner.marks = StartedMarks(client, timedelta(minutes=1))
    runner.call_bound = timedelta(0)  # the call's own bound is long past
    if not marked:
        monkeypatch.setattr(StartedMarks, "recording", lambda self, lease, ttl: None)
    faults(AFTER, "25006", 5)  # about 3 s of failing bookkeeping
    lease = lock_job(conn, "noop", {})
    first: list[Result] = []
    writing = threading.Thread(
        target=lambda: first.append(runner.run(lease, "noop", "call-1", redelivered=False))
    )
    writing.start()
    wait_until(lambda: fired(conn) >= 2, 5, "the bookkeeping to fail")
    second = runner.run(lease, "noop", "call-2", redelivered=True)
    writing.join(30)
    client.close()
    if marked:
        assert (second, first) == (Result.BUSY, [Result.COMPLETED])
    else:  # the oracle sees the bug: the live attempt is failed as lost, its outcome dropped
        assert (second, first) == (Result.WORKER_LOST, [Result.STALE])
    assert len(functions.calls.calls_for(lease.job_id)) == 1
