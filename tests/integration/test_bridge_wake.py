"""The bridge's wake timer is based on what get_job can take: a job whose own lock
expired, in a serial queue another job holds, must not make an idle bridge poll
Postgres in a loop (issue #14, item 6: 4,091 transactions in 3 s before the fix)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from lqjobs.celery import create_app
from lqjobs.db import Connection, JobsDB
from lqjobs.db.reads import Reads
from lqjobs.ops.embedded import wait_until
from tests.stack import bridge, flush_broker, make_settings

pytestmark = pytest.mark.integration
TENANT = "11111111-2222-3333-4444-555555555555"
WINDOW = 3.0  # seconds of an idle bridge whose transactions are counted

# The timer as it was: an expired lock counted as runnable now, whatever its queue.
OLD_QUERY = """
SELECT extract(epoch FROM least(
    (SELECT min(run_at) FROM app_jobs.jobs
      WHERE locked_at IS NULL AND attempts < max_attempts AND run_at > now()),
    (SELECT min(locked_at) + %(expiry)s::interval FROM app_jobs.jobs
      WHERE locked_at IS NOT NULL AND attempts < max_attempts)
) - now())::float8
"""


def old_timer(
    self: Reads, conn: Connection, tasks: Sequence[str] | None, job_expiry: timedelta
) -> float | None:
    row = conn.execute(OLD_QUERY, {"expiry": job_expiry}).fetchone()
    return None if row is None or row[0] is None else max(0.0, float(row[0]))


def hold_a_queue_behind_an_expired_lock(db_url: str) -> None:
    """Job A holds serial queue q (fresh lock, another worker); job B of q holds a
    lock that expired an hour ago: get_job can take neither."""
    jobs_db = JobsDB()
    with psycopg.connect(db_url, autocommit=True) as conn:
        jobs_db.queue.add_job(conn, TENANT, "noop", queue_name="q")
        stuck = jobs_db.queue.add_job(conn, TENANT, "noop", queue_name="q")
        holder = jobs_db.queue.get_job(conn, "bridge-elsewhere-1", None, timedelta(minutes=5))
        assert holder is not None and holder.id != stuck.id
        conn.execute(
            "UPDATE app_jobs.jobs SET locked_by = 'bridge-gone-1', attempts = 1, "
            "locked_at = now() - interval '1 hour' WHERE id = %s",
            [stuck.id],
        )


def commits(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def settled_commits(db_url: str) -> int:
    """The counter once it stops moving: a session's counts reach it when the
    session ends, a moment after the client closed it."""
    seen = [commits(db_url)]

    def settled() -> bool:
        seen.append(commits(db_url))
        return seen[-1] - seen[-2] <= 5  # the probes' own, and background noise

    wait_until(settled, 10, "the transaction counters to settle")
    return seen[-1]


def idle_bridge_commits(db_url: str, redis_url: str) -> int:
    """Transactions a bridge runs over WINDOW seconds with nothing it can take,
    start and stop included (each a handful)."""
    settings = make_settings(db_url, redis_url, poll_interval=30.0)
    flush_broker(redis_url)
    before = settled_commits(db_url)
    with bridge(settings, create_app(settings)):
        time.sleep(WINDOW)  # the measurement itself: how busy an idle bridge is
    return settled_commits(db_url) - before


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed", "negative-control"])
def test_an_expired_lock_in_a_held_queue_does_not_busy_poll(
    db_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, fixed: bool
) -> None:
    hold_a_queue_behind_an_expired_lock(db_url)
    if not fixed:
        monkeypatch.setattr(Reads, "seconds_until_next_job", old_timer)
    transactions = idle_bridge_commits(db_url, redis_url)
    if fixed:
        assert transactions < 60, f"{transactions} transactions in {WINDOW:g} s"
    else:
        assert transactions > 500  # the control: the old timer polls in a loop


def test_the_timer_wakes_when_the_held_queue_s_lock_expires(db_url: str) -> None:
    hold_a_queue_behind_an_expired_lock(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        due = Reads().seconds_until_next_job(conn, None, timedelta(minutes=5))
        no_queue: Any = Reads().seconds_until_next_job(conn, ["other"], timedelta(minutes=5))
    assert due is not None and 290 < due <= 300  # the holder's queue lock, 5 min
    assert no_queue is None
