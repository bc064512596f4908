"""How Postgres runs the bridge's locking statement.

get_job's search walks the (priority, run_at, id) index and stops at the first free
job, instead of fetching and sorting every due job on every call
(lqjobs.db.base.WALK_JOB_INDEX). And the hint that makes it so costs the statement
nothing on a server with JIT: no plan is compiled, none costs more than
``jit_above_cost``."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from lqjobs.db import JobsDB
from tests.integration.conftest import TENANT

pytestmark = pytest.mark.integration

WAITING = 300
CALLS = 8  # plpgsql switches to its cached generic plan after five executions
SEARCH = "SELECT j.id, j.queue_name"  # get_job's search, as auto_explain quotes it
WORKER = "bridge-plan-test"
EXPIRY = timedelta(minutes=10)


def rows_read(plan: str, node: str) -> int:
    """The actual row count of the first plan node named ``node``."""
    found = re.search(re.escape(node) + r" .*\(actual time=\S+ rows=(\d+)", plan)
    assert found, plan
    return int(found.group(1))


def explain_nested(conn: psycopg.Connection[Any]) -> list[str]:
    """Make ``conn`` report the plans of every statement it runs, nested ones (inside
    get_job) included, as NOTICEs; returns the list they are collected in."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")  # superuser: the suite's own connection
    for setting in (
        "auto_explain.log_min_duration = 0",
        "auto_explain.log_nested_statements = on",
        "auto_explain.log_analyze = on",
        "auto_explain.log_level = notice",
        "client_min_messages = notice",
    ):
        conn.execute(f"SET {setting}")
    return notices


def lock_one(conn: psycopg.Connection[Any]) -> None:
    """One bridge lock pass for one job: its statement, in its own transaction."""
    with conn.transaction():
        assert JobsDB().queue.get_jobs(conn, WORKER, ["t"], EXPIRY, 1)


def single_get_job(conn: psycopg.Connection[Any]) -> None:
    assert JobsDB().queue.get_job(conn, WORKER, ["t"]) is not None


def search_plans(
    conn: psycopg.Connection[Any], lock: Callable[[psycopg.Connection[Any]], None]
) -> list[str]:
    """The plans of get_job's search over ``CALLS`` lock passes."""
    notices = explain_nested(conn)
    for _ in range(CALLS):
        lock(conn)
    return [notice for notice in notices if SEARCH in notice]


@pytest.fixture
def waiting_jobs(conn: psycopg.Connection[Any]) -> None:
    jobs_db = JobsDB()
    with conn.transaction():
        for i in range(WAITING):
            jobs_db.queue.add_job(conn, TENANT, "t", {"i": i})


@pytest.mark.usefixtures("waiting_jobs")
def test_the_lock_statement_walks_the_index_instead_of_sorting(
    connect: Callable[[], psycopg.Connection[Any]],
) -> None:
    plans = search_plans(connect(), lock_one)
    assert len(plans) == CALLS
    last = plans[-1]  # the cached generic plan
    assert "Sort" not in last, last
    assert rows_read(last, "Index Scan using priority_run_at_id_idx") == 1  # stopped at once


@pytest.mark.usefixtures("waiting_jobs")
def test_negative_control_a_plain_get_job_sorts_every_due_job(
    connect: Callable[[], psycopg.Connection[Any]],
) -> None:
    # What the hint is for: without it, the generic plan reads all due jobs and sorts
    # them to find the first. If this ever stops failing, the hint may go.
    last = search_plans(connect(), single_get_job)[-1]
    assert "Sort" in last, last
    assert rows_read(last, "Heap Scan on jobs") == WAITING - CALLS + 1  # every job still due


@pytest.mark.usefixtures("waiting_jobs")
def test_the_hint_ends_with_the_lock_transaction(
    connect: Callable[[], psycopg.Connection[Any]],
) -> None:
    session = connect()
    lock_one(session)
    setting = session.execute("SHOW enable_sort").fetchone()
    assert setting == ("on",)  # nothing leaks into the session (or a pooler's next client)


def test_jobs_come_out_in_queue_order_from_the_lock_statement(
    conn: psycopg.Connection[Any], connect: Callable[[], psycopg.Connection[Any]]
) -> None:
    jobs_db = JobsDB()
    added = [
        jobs_db.queue.add_job(conn, TENANT, "t", {}, priority=priority).id
        for priority in (3, 1, 2, 1, 0)
    ]
    session = connect()
    with session.transaction():
        taken = [job.id for job in jobs_db.queue.get_jobs(session, WORKER, None, EXPIRY, 10)]
    assert taken == [added[4], added[1], added[3], added[2], added[0]]


# -- on a server with JIT ---------------------------------------------------------


def jit_capable(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_jit_available() AND current_setting('jit')::bool").fetchone()
    return bool(row and row[0])


def explain_lock_statement(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """EXPLAIN ANALYZE (JSON) of one bridge lock pass, the statement as the bridge sends it."""
    queue = JobsDB().queue
    query = queue._statement(conn, "get_jobs_under_cap", queue._get_jobs_under_cap_query)
    params = {"worker": WORKER, "tasks": ["t"], "expiry": EXPIRY, "limit": 8, "cap": 200}
    with conn.transaction():
        row = conn.execute(b"EXPLAIN (ANALYZE, FORMAT JSON) " + query, params).fetchone()
    assert row is not None
    explained: dict[str, Any] = row[0][0]
    return explained


def jit_above_cost(conn: psycopg.Connection[Any]) -> float:
    row = conn.execute("SELECT current_setting('jit_above_cost')::float8").fetchone()
    assert row is not None
    return float(row[0])


@pytest.mark.usefixtures("waiting_jobs")
def test_no_lock_pass_is_jit_compiled(connect: Callable[[], psycopg.Connection[Any]]) -> None:
    session = connect()
    if not jit_capable(session):
        pytest.skip("this server has no JIT (the system server of the matrix has)")
    threshold = jit_above_cost(session)
    notices = explain_nested(session)
    for _ in range(CALLS):  # past plpgsql's switch to its cached generic plans
        explained = explain_lock_statement(session)
        assert explained["Plan"]["Total Cost"] < threshold, explained["Plan"]
        assert "JIT" not in explained, explained["JIT"]
    nested = [notice for notice in notices if "JIT:" in notice]
    assert not nested, nested[0]  # nor any statement inside get_job


@pytest.mark.usefixtures("waiting_jobs")
def test_negative_control_a_session_that_disables_sorting_compiles_every_pass(
    connect: Callable[[], psycopg.Connection[Any]],
) -> None:
    # The defect the statement-level hint replaced: with sorting disabled for the
    # whole session, the statement's outer sort costs 10^10 on Postgres before 18,
    # and every lock pass is JIT-compiled.
    session = connect()
    if not jit_capable(session):
        pytest.skip("this server has no JIT (the system server of the matrix has)")
    if session.info.server_version >= 180000:
        pytest.skip("Postgres 18 counts disabled nodes apart from the cost")
    session.execute("SET enable_sort = off")
    explained = explain_lock_statement(session)
    assert explained["Plan"]["Total Cost"] > jit_above_cost(session)
    assert explained["JIT"]["Functions"] > 0
