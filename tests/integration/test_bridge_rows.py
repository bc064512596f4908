"""Rows the bridge meets in real databases: a job queued before the upstream
extension added ``created_at`` / ``updated_at`` keeps NULLs there, and a schema lqjobs
does not know may hold a row that fits no JobRow. Neither may stop the bridge (issue
#14, item 5: it exited on the pydantic error at every restart)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from lqjobs.db import JobsDB
from lqjobs.ops.example_functions import FunctionServer
from tests.stack import count, make_settings, stack

pytestmark = pytest.mark.integration
TENANT = "11111111-2222-3333-4444-555555555555"


def row(db_url: str, job_id: int) -> dict[str, Any] | None:
    with psycopg.connect(db_url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(
            "SELECT attempts, max_attempts, locked_by, last_error FROM app_jobs.jobs WHERE id = %s",
            [job_id],
        ).fetchone()


def test_upgraded_and_unreadable_rows_neither_stop_the_bridge(
    db_url: str, redis_url: str, functions: FunctionServer
) -> None:
    jobs_db = JobsDB()
    with psycopg.connect(db_url, autocommit=True) as conn:
        upgraded = jobs_db.queue.add_job(conn, TENANT, "old-job", {}).id
        # No trigger keeps the timestamps here: as in a table the upgrade altered.
        conn.execute("SET session_replication_role = replica")
        conn.execute(
            "UPDATE app_jobs.jobs SET created_at = NULL, updated_at = NULL WHERE id = %s",
            [upgraded],
        )
        conn.execute("RESET session_replication_role")
        # A schema without the NOT NULL lqjobs' own install has: a row no JobRow fits.
        conn.execute("ALTER TABLE app_jobs.jobs ALTER COLUMN database_id DROP NOT NULL")
        broken = conn.execute(
            "INSERT INTO app_jobs.jobs (database_id, task_identifier, payload) "
            "VALUES (NULL, 'broken', '{\"secret\": \"CANARY-3\"}') RETURNING id"
        ).fetchone()[0]  # type: ignore[index]
        healthy = [jobs_db.queue.add_job(conn, TENANT, "fine", {"i": i}).id for i in range(5)]
    settings = make_settings(
        db_url, redis_url, executor="knative", knative_ingress_url=functions.url
    )
    with stack(settings) as running:
        functions.calls.wait_for_calls(6, timeout=20)  # five healthy jobs and the old one
        assert running.failures == 0
    called = {call.job_id for call in functions.calls.all()}
    assert called == {upgraded, *healthy}
    assert count(db_url, f"id IN ({upgraded}, {', '.join(map(str, healthy))})") == 0
    parked = row(db_url, broken)
    assert parked is not None and parked["locked_by"] is None
    assert parked["attempts"] == parked["max_attempts"]
    assert parked["last_error"].startswith("unreadable job row: database_id: ")
    assert "CANARY" not in parked["last_error"]
    assert running.counters["unreadable"] == 1
