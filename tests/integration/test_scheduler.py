"""The scheduler against a real database: ticks on time, release on start and stop,
deleted / replaced / invalid scheduled jobs, ALREADY_SCHEDULED, taken keys, reconnects.

Timing tests run the loop in a thread; the others drive ``poll()`` / ``run_due()``
themselves with a clock they choose, so they need no waiting at all."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import sql

from lqjobs.db import JobsDB
from lqjobs.ops.embedded import wait_until
from lqjobs.scheduler.service import Scheduler
from lqjobs.settings import Settings
from tests.job_sink import install_sink, sunk, whole_seconds
from tests.stack import in_thread

pytestmark = pytest.mark.integration
TENANT = UUID("11111111-2222-3333-4444-555555555555")
SID = "scheduler-test-host"
EVERY_SECOND = {"rule": "*/1 * * * * *"}
jobs_db = JobsDB()


def settings(db_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "jobs_support_any": True,
        "poll_interval": 0.5,
        "job_expiry": 60.0,
        "hostname": "test-host",
    }
    return Settings(**(values | overrides))


def add(conn: psycopg.Connection[Any], task: str, info: Any, **kwargs: Any) -> int:
    return jobs_db.scheduled.add_scheduled_job(
        conn, TENANT, task, {"secret": "CANARY-3"}, info, **kwargs
    ).id


def holder(conn: psycopg.Connection[Any], scheduled_id: int) -> str | None:
    row = conn.execute(
        "SELECT locked_by FROM app_jobs.scheduled_jobs WHERE id = %s", [scheduled_id]
    ).fetchone()
    assert row is not None, f"scheduled job {scheduled_id} is gone"
    return row[0]  # type: ignore[no-any-return]


def job_count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM app_jobs.jobs").fetchone()
    return int(row[0]) if row else 0


def actions(caplog: pytest.LogCaptureFixture, action: str, level: int = logging.DEBUG) -> list[Any]:
    return [
        r for r in caplog.records if getattr(r, "action", None) == action and r.levelno >= level
    ]


def allow_connections(admin_url: str, dbname: str, allow: bool) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:  # not from the database itself
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(dbname), sql.Literal(allow)
            )
        )


def running(scheduler: Scheduler) -> contextlib.AbstractContextManager[Scheduler]:
    return in_thread(scheduler, "scheduler", 5)


@pytest.fixture
def driven(db_url: str) -> Iterator[Scheduler]:
    """A scheduler the test drives itself (no thread)."""
    scheduler = Scheduler(settings(db_url))
    yield scheduler
    scheduler.close()


def later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


# -- ticking on time (a thread) ------------------------------------------------------


def test_cron_and_recurrence_schedules_tick_once_per_fire_time(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    install_sink(db_url)
    cron_id = add(conn, "sink-cron", EVERY_SECOND)
    recurrence_id = add(conn, "sink-recurrence", {"second": {"start": 0, "end": 59, "step": 2}})
    with running(Scheduler(settings(db_url))) as scheduler:
        wait_until(lambda: len(sunk(conn, "sink-cron")) >= 10, 20, "ten ticks")
    cron = whole_seconds(sunk(conn, "sink-cron"))[:10]
    assert [b - a for a, b in itertools.pairwise(cron)] == [1] * 9, cron
    recurrence = whole_seconds(sunk(conn, "sink-recurrence"))
    assert len(recurrence) >= 4, recurrence
    assert all(second % 2 == 0 for second in recurrence), recurrence
    assert [b - a for a, b in itertools.pairwise(recurrence)] == [2] * (len(recurrence) - 1)
    assert scheduler.counters["already_scheduled"] == 0
    assert holder(conn, cron_id) is None and holder(conn, recurrence_id) is None  # released


def test_releases_its_id_on_start_and_everything_on_stop(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    install_sink(db_url)
    mine = add(conn, "sink-mine", EVERY_SECOND)
    theirs = add(conn, "sink-theirs", EVERY_SECOND)
    # A crashed run with the same id left its row locked; another scheduler holds theirs.
    assert jobs_db.scheduled.get_scheduled_job(conn, SID, ["sink-mine"]) is not None
    assert jobs_db.scheduled.get_scheduled_job(conn, "scheduler-elsewhere", None) is not None
    conn.execute("UPDATE app_jobs.scheduled_jobs SET locked_at = now() - interval '1 day'")
    scheduler = Scheduler(settings(db_url))
    with running(scheduler):
        wait_until(lambda: len(sunk(conn, "sink-mine")) >= 1, 10, "the released row to tick")
        # released, then claimed afresh: not merely adopted under the old lock
        assert conn.execute(
            "SELECT locked_at > now() - interval '1 minute' FROM app_jobs.scheduled_jobs "
            "WHERE id = %s",
            [mine],
        ).fetchone() == (True,)
        stopped_at = datetime.now(UTC)
        scheduler.stop()
        scheduler.stop()  # idempotent
    assert (datetime.now(UTC) - stopped_at).total_seconds() < 2
    assert holder(conn, mine) is None
    assert holder(conn, theirs) == "scheduler-elsewhere"  # never another id's rows
    assert sunk(conn, "sink-theirs") == []


def test_new_and_replaced_rows_are_claimed_on_notify(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    install_sink(db_url)
    with running(Scheduler(settings(db_url, poll_interval=60.0))):
        first = add(conn, "sink-notify", EVERY_SECOND, job_key="k")
        wait_until(lambda: holder(conn, first) == SID, 3, "the new row to be claimed")
        # a key upsert of a held row deletes it and inserts a fresh, free one
        second = add(conn, "sink-notify", {"rule": "0 0 1 1 *"}, job_key="k")
        assert second != first
        wait_until(lambda: holder(conn, second) == SID, 3, "the replacement to be claimed")


def test_reconnects_listens_and_claims_at_once_keeping_its_timers(
    db_url: str, pg_url: str, conn: psycopg.Connection[Any]
) -> None:
    install_sink(db_url)
    add(conn, "sink-reconnect", EVERY_SECOND)
    with running(Scheduler(settings(db_url, poll_interval=60.0))) as scheduler:
        wait_until(lambda: len(sunk(conn, "sink-reconnect")) >= 1, 10, "the first tick")
        allow_connections(pg_url, conn.info.dbname, False)
        try:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = %s",
                [f"lqjobs-scheduler:{SID}"],
            ).fetchone()
            assert killed == (2,)  # its listener and its work connection, found by name
            # inserted while nobody listens: no NOTIFY will ever reach the scheduler
            missed = add(conn, "sink-missed", EVERY_SECOND)
            wait_until(lambda: scheduler.counters["failures"] >= 2, 10, "failed reconnects")
        finally:
            allow_connections(pg_url, conn.info.dbname, True)
        # claimed right after the reconnect, not at the next poll a minute later
        wait_until(lambda: holder(conn, missed) == SID, 5, "the missed row to be claimed")
        before = len(sunk(conn, "sink-reconnect"))
        wait_until(lambda: len(sunk(conn, "sink-reconnect")) >= before + 2, 5, "more ticks")
    seconds = whole_seconds(sunk(conn, "sink-reconnect"))
    assert len(set(seconds)) == len(seconds), seconds


# -- driven passes (no thread, no waiting) ---------------------------------------------


def test_a_deleted_scheduled_job_stops_its_timer(
    driven: Scheduler, conn: psycopg.Connection[Any]
) -> None:
    gone_at_tick = add(conn, "report", EVERY_SECOND)
    gone_at_poll = add(conn, "report", EVERY_SECOND)
    driven.poll()
    assert set(driven.next_fire_times()) == {gone_at_tick, gone_at_poll}
    conn.execute("DELETE FROM app_jobs.scheduled_jobs WHERE id = %s", [gone_at_tick])
    assert driven.run_due(later(2)) == 2  # its run_scheduled_job finds nothing: dropped
    assert set(driven.next_fire_times()) == {gone_at_poll}
    conn.execute("DELETE FROM app_jobs.scheduled_jobs WHERE id = %s", [gone_at_poll])
    conn.execute("DELETE FROM app_jobs.jobs")
    driven.poll()  # the re-read notices
    assert driven.next_fire_times() == {}
    assert driven.run_due(later(60)) == 0
    assert job_count(conn) == 0
    assert driven.counters["dropped"] == 2


def test_changed_schedule_info_re_arms_and_a_key_upsert_replaces(
    driven: Scheduler, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lqjobs.scheduler.service")
    edited = add(conn, "report", EVERY_SECOND)
    keyed = add(conn, "report", EVERY_SECOND, job_key="nightly")
    driven.poll()
    conn.execute(
        "UPDATE app_jobs.scheduled_jobs SET schedule_info = %s WHERE id = %s",
        ['{"rule": "0 0 1 1 *"}', edited],
    )
    replacement = add(conn, "report", {"rule": "0 0 1 1 *"}, job_key="nightly")
    assert replacement != keyed
    driven.poll()
    new_year = datetime(datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC)
    assert driven.next_fire_times() == {edited: new_year, replacement: new_year}
    assert [r.scheduled_job_id for r in actions(caplog, "schedule_rearmed")] == [edited]
    assert driven.run_due(later(5)) == 0  # the every-second timers are gone
    assert holder(conn, replacement) == SID


def test_a_takeover_never_repeats_the_tick_its_predecessor_ran(
    driven: Scheduler, conn: psycopg.Connection[Any]
) -> None:
    scheduled = add(conn, "report", EVERY_SECOND)
    # the predecessor's clock ran ahead: its last tick is later than our "now"
    conn.execute(
        "UPDATE app_jobs.scheduled_jobs SET last_scheduled = now() + interval '30 seconds'"
    )
    driven.poll()
    last = conn.execute("SELECT last_scheduled FROM app_jobs.scheduled_jobs").fetchone()
    assert last is not None
    first = driven.next_fire_times()[scheduled]
    assert first is not None and first > last[0]
    assert driven.run_due(later(20)) == 0


def test_invalid_schedule_info_is_released_and_reported_once(
    driven: Scheduler, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lqjobs.scheduler.service")
    bad_cron = add(conn, "report", {"rule": "61 * * * *"})
    bad_shape = add(conn, "report", [1, 2])
    good = add(conn, "report", EVERY_SECOND)
    driven.poll()
    driven.poll()
    assert holder(conn, bad_cron) is None and holder(conn, bad_shape) is None
    assert holder(conn, good) == SID
    warnings = actions(caplog, "invalid_schedule", logging.WARNING)
    assert sorted(r.scheduled_job_id for r in warnings) == [bad_cron, bad_shape]  # not twice
    [cron_line] = [r.getMessage() for r in warnings if r.scheduled_job_id == bad_cron]
    assert f"scheduled job {bad_cron}" in cron_line and "61" in cron_line
    assert len(actions(caplog, "invalid_schedule")) == 4  # the repeats went to DEBUG
    assert driven.run_due(later(2)) == 1  # the valid one keeps ticking
    assert job_count(conn) == 1
    assert "CANARY-3" not in caplog.text


def test_already_scheduled_while_the_previous_job_is_pending(
    driven: Scheduler, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lqjobs.scheduler.service")
    add(conn, "report", EVERY_SECOND)
    driven.poll()
    assert driven.run_due(later(2)) == 1
    assert driven.run_due(later(4)) == 1
    assert driven.run_due(later(6)) == 1
    assert job_count(conn) == 1  # no duplicate while the first is pending
    assert len(actions(caplog, "already_scheduled")) == 2
    assert actions(caplog, "already_scheduled", logging.WARNING) == []
    conn.execute("DELETE FROM app_jobs.jobs")  # completed
    assert driven.run_due(later(8)) == 1
    assert job_count(conn) == 1
    assert driven.counters["jobs"] == 2


def test_a_taken_key_is_reported_for_that_scheduled_job_only(
    driven: Scheduler, conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lqjobs.scheduler.service")
    keyed = add(conn, "keyed", EVERY_SECOND, job_key="only-one")
    plain = add(conn, "plain", EVERY_SECOND)
    driven.poll()
    assert driven.run_due(later(2)) == 2
    # keyed's job was locked long ago, beyond job_expiry: run_scheduled_job goes on to
    # insert a second job with the same key, which the unique index refuses.
    conn.execute(
        "UPDATE app_jobs.jobs SET locked_by = 'worker-x', locked_at = now() - interval '2 hours'"
    )
    assert driven.run_due(later(4)) == 2
    assert driven.run_due(later(6)) == 2
    errors = actions(caplog, "scheduled_run_failed", logging.ERROR)
    assert [(r.scheduled_job_id, r.sqlstate) for r in errors] == [(keyed, "23505")]
    assert len(actions(caplog, "scheduled_run_failed")) == 2  # the repeat at DEBUG
    assert set(driven.next_fire_times()) == {keyed, plain}  # still armed
    tasks = conn.execute("SELECT task_identifier FROM app_jobs.jobs ORDER BY id").fetchall()
    assert tasks == [("keyed",), ("plain",), ("plain",)]  # then ALREADY_SCHEDULED
