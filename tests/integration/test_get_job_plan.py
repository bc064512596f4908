"""How Postgres runs get_job's search on the bridge's session: it walks the
(priority, run_at, id) index and stops at the first free job, instead of
fetching and sorting every due job on every call (lqjobs.db.base.walk_job_index)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from lqjobs.db import JobsDB
from lqjobs.db.base import walk_job_index
from tests.integration.conftest import TENANT

pytestmark = pytest.mark.integration

WAITING = 300
CALLS = 8  # plpgsql switches to its cached generic plan after five executions
SEARCH = "SELECT j.id, j.queue_name"  # get_job's search, as auto_explain quotes it


def rows_read(plan: str, node: str) -> int:
    """The actual row count of the first plan node named ``node``."""
    found = re.search(re.escape(node) + r" .*\(actual time=\S+ rows=(\d+)", plan)
    assert found, plan
    return int(found.group(1))


def search_plans(conn: psycopg.Connection[Any], calls: int) -> list[str]:
    """The plans of get_job's search over ``calls`` calls, as auto_explain reports
    them to this client (nested statements, as NOTICEs)."""
    notices: list[str] = []
    conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    for setting in (
        "auto_explain.log_min_duration = 0",
        "auto_explain.log_nested_statements = on",
        "auto_explain.log_analyze = on",
        "auto_explain.log_level = notice",
        "client_min_messages = notice",
    ):
        conn.execute(f"SET {setting}")
    jobs_db = JobsDB()
    for _ in range(calls):
        assert jobs_db.queue.get_job(conn, "bridge-plan-test", ["t"]) is not None
    return [notice for notice in notices if SEARCH in notice]


@pytest.fixture
def waiting_jobs(conn: psycopg.Connection[Any]) -> None:
    jobs_db = JobsDB()
    with conn.transaction():
        for i in range(WAITING):
            jobs_db.queue.add_job(conn, TENANT, "t", {"i": i})


@pytest.mark.usefixtures("waiting_jobs")
def test_bridge_session_walks_the_index_instead_of_sorting(
    connect: Callable[[], psycopg.Connection[Any]],
) -> None:
    session = connect()
    walk_job_index(session)
    plans = search_plans(session, CALLS)
    assert len(plans) == CALLS
    last = plans[-1]  # the cached generic plan
    assert "Sort" not in last, last
    assert rows_read(last, "Index Scan using priority_run_at_id_idx") == 1  # stopped at once


@pytest.mark.usefixtures("waiting_jobs")
def test_negative_control_a_plain_session_sorts_every_due_job(
    connect: Callable[[], psycopg.Connection[Any]],
) -> None:
    # What walk_job_index is for: without it, the generic plan reads all due jobs
    # and sorts them to find the first. If this ever stops failing, the hint may go.
    plans = search_plans(connect(), CALLS)
    last = plans[-1]
    assert "Sort" in last, last
    assert rows_read(last, "Heap Scan on jobs") == WAITING - CALLS + 1  # every job still due


def test_jobs_come_out_in_queue_order_on_the_bridge_session(
    conn: psycopg.Connection[Any], connect: Callable[[], psycopg.Connection[Any]]
) -> None:
    jobs_db = JobsDB()
    added = [
        jobs_db.queue.add_job(conn, TENANT, "t", {}, priority=priority).id
        for priority in (3, 1, 2, 1, 0)
    ]
    session = connect()
    walk_job_index(session)
    taken = []
    while (job := jobs_db.queue.get_job(session, "bridge-plan-test", None)) is not None:
        taken.append(job.id)
    assert taken == [added[4], added[1], added[3], added[2], added[0]]
