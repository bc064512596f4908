"""lqjobs.db: the typed wrappers over app_jobs, against the real schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest

from lqjobs import db
from lqjobs.errors import DatabaseError, DatabaseUnavailable, InvalidWorkerId, SchemaMissing
from lqjobs.lease import Lease
from lqjobs.models import ALREADY_SCHEDULED, JobRow, ScheduledJobRow

pytestmark = pytest.mark.integration
TENANT = UUID("0e0e0e0e-1111-2222-3333-444444444444")
WORKER = "bridge-test-0001"
Conn = psycopg.Connection[Any]


@pytest.fixture
def jobs_db() -> db.JobsDB:
    return db.JobsDB()


def test_nothing_found_is_none_not_an_all_null_row(conn: Conn, jobs_db: db.JobsDB) -> None:
    assert jobs_db.queue.get_job(conn, WORKER, None) is None
    assert jobs_db.scheduled.get_scheduled_job(conn, WORKER, None) is None
    assert jobs_db.queue.complete_job(conn, WORKER, 12345) is None
    assert jobs_db.queue.fail_job(conn, WORKER, 12345, "boom") is None
    assert jobs_db.scheduled.run_scheduled_job(conn, 12345) is None


def test_rows_are_typed_and_payload_is_the_stored_text(conn: Conn, jobs_db: db.JobsDB) -> None:
    raw = '{"b": 1.0, "a": [1e400, "\\u0000"]}'  # not round-trippable through json.loads
    added = jobs_db.queue.add_job(
        conn, TENANT, "typed", db.RawJson(raw), queue_name="q1", priority=3, max_attempts=4
    )
    assert isinstance(added, JobRow)
    assert added.payload == raw
    assert (added.database_id, added.queue_name, added.priority, added.max_attempts) == (
        TENANT,
        "q1",
        3,
        4,
    )
    job = jobs_db.queue.get_job(conn, WORKER, ["typed"], timedelta(minutes=5))
    assert job is not None and job.id == added.id
    assert job.payload == raw
    assert (job.attempts, job.locked_by) == (1, WORKER)
    assert job.locked_at is not None and job.locked_at.tzinfo is not None


def test_add_job_omitted_arguments_keep_sql_defaults(conn: Conn, jobs_db: db.JobsDB) -> None:
    job = jobs_db.queue.add_job(conn, TENANT, "defaults")
    assert (job.queue_name, job.priority, job.max_attempts, job.key) == (None, 0, 25, None)
    assert job.payload == "{}"
    later = datetime.now(UTC) + timedelta(hours=1)
    keyed = jobs_db.queue.add_job(conn, TENANT, "defaults", {"x": 1}, job_key="k", run_at=later)
    assert keyed.key == "k" and abs((keyed.run_at - later).total_seconds()) < 0.001


def test_invalid_worker_id_is_a_typed_error(conn: Conn, jobs_db: db.JobsDB) -> None:
    with pytest.raises(InvalidWorkerId):
        jobs_db.queue.get_job(conn, None, None)  # type: ignore[arg-type]
    with pytest.raises(InvalidWorkerId):
        jobs_db.scheduled.get_scheduled_job(conn, None, None)  # type: ignore[arg-type]


def test_already_scheduled_is_an_outcome(conn: Conn, jobs_db: db.JobsDB) -> None:
    scheduled = jobs_db.scheduled.add_scheduled_job(conn, TENANT, "tick", {}, {"rule": "* * * * *"})
    assert isinstance(scheduled, ScheduledJobRow)
    first = jobs_db.scheduled.run_scheduled_job(conn, scheduled.id)
    assert isinstance(first, JobRow) and first.task_identifier == "tick"
    with conn.transaction():  # a savepoint keeps the caller's transaction usable
        assert jobs_db.scheduled.run_scheduled_job(conn, scheduled.id) is ALREADY_SCHEDULED
        assert jobs_db.queue.get_job(conn, WORKER, ["tick"]) is not None


def test_fail_job_never_passes_null(conn: Conn, jobs_db: db.JobsDB) -> None:
    jobs_db.queue.add_job(conn, TENANT, "fails")
    job = jobs_db.queue.get_job(conn, WORKER, None)
    assert job is not None
    failed = jobs_db.queue.fail_job(conn, WORKER, job.id, "")  # STRICT: NULL would do nothing
    assert failed is not None and failed.last_error == "unknown error"
    assert failed.locked_by is None


def test_fenced_writes_need_the_exact_lease(conn: Conn, jobs_db: db.JobsDB) -> None:
    jobs_db.queue.add_job(conn, TENANT, "fenced")
    job = jobs_db.queue.get_job(conn, WORKER, None)
    assert job is not None
    lease = Lease.of(job)
    wrong = Lease(job.id, WORKER, job.attempts, job.locked_at + timedelta(microseconds=1))  # type: ignore[operator]
    assert not jobs_db.fence.fenced_complete(conn, wrong)
    assert not jobs_db.fence.fenced_fail(conn, wrong, "x")
    assert jobs_db.reads.count_locked_by(conn, WORKER) == 1
    assert jobs_db.fence.fenced_complete(conn, lease)
    assert not jobs_db.fence.fenced_complete(conn, lease)  # a second complete finds nothing
    assert jobs_db.reads.count_locked_by(conn, WORKER) == 0


def test_next_job_timer_sees_delays_and_expiring_locks(conn: Conn, jobs_db: db.JobsDB) -> None:
    assert jobs_db.reads.seconds_until_next_job(conn, None, timedelta(minutes=1)) is None
    jobs_db.queue.add_job(conn, TENANT, "later", run_at=datetime.now(UTC) + timedelta(seconds=30))
    due = jobs_db.reads.seconds_until_next_job(conn, None, timedelta(minutes=1))
    assert due is not None and 28 < due <= 30
    assert jobs_db.reads.seconds_until_next_job(conn, ["other"], timedelta(minutes=1)) is None
    jobs_db.queue.add_job(conn, TENANT, "now")
    assert jobs_db.queue.get_job(conn, WORKER, ["now"]) is not None
    due = jobs_db.reads.seconds_until_next_job(conn, None, timedelta(seconds=10))
    assert due is not None and 8 < due <= 10  # the lock expires before the delay


def test_task_status_counts(conn: Conn, jobs_db: db.JobsDB) -> None:
    for _ in range(3):
        jobs_db.queue.add_job(conn, TENANT, "mail")
    jobs_db.queue.add_job(conn, TENANT, "mail", run_at=datetime.now(UTC) + timedelta(hours=1))
    jobs_db.queue.add_job(conn, TENANT, "mail", max_attempts=1)
    locked = jobs_db.queue.get_job(conn, WORKER, ["mail"])
    assert locked is not None
    parked = jobs_db.queue.add_job(conn, TENANT, "resize")
    jobs_db.queue.permanently_fail_jobs(conn, [parked.id], "bad")
    status = {row.task_identifier: row for row in jobs_db.reads.task_status(conn)}
    mail = status["mail"]
    assert (mail.ready, mail.delayed, mail.locked, mail.failed_permanently) == (3, 1, 1, 0)
    assert mail.oldest_ready_age_seconds is not None and mail.oldest_ready_age_seconds >= 0
    resize = status["resize"]
    assert (resize.ready, resize.failed_permanently, resize.oldest_ready_age_seconds) == (
        0,
        1,
        None,
    )


def test_schema_name_is_quoted_not_formatted(conn: Conn) -> None:
    conn.execute("CREATE TABLE canary (id int)")
    hostile = db.JobsDB("app_jobs.jobs; DROP TABLE canary; --")
    with pytest.raises(SchemaMissing):
        hostile.queue.get_job(conn, WORKER, None)
    assert not hostile.reads.schema_installed(conn)
    assert conn.execute("SELECT count(*) FROM canary").fetchone() == (0,)


def test_errors_are_translated_without_row_details(conn: Conn, jobs_db: db.JobsDB) -> None:
    with pytest.raises(DatabaseError) as caught:
        jobs_db.queue.add_job(conn, TENANT, "x" * 200, {"secret": "CANARY-3"})  # too long
    assert "CANARY-3" not in str(caught.value)
    assert caught.value.sqlstate == "23514"  # check_violation


def test_an_unreachable_database_is_database_unavailable(tmp_path: Any) -> None:
    with pytest.raises(DatabaseUnavailable):
        db.connect("postgresql://nobody@127.0.0.1:1/none")


def _get_job_calls(conn: Conn) -> int:
    """get_job calls made so far in the current transaction (track_functions on)."""
    row = conn.execute(
        "SELECT coalesce(pg_stat_get_xact_function_calls("
        "'app_jobs.get_job(text, text[], interval)'::regprocedure), 0)"
    ).fetchone()
    assert row is not None
    return int(row[0])


def queues(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.execute("SELECT queue_name, locked_by FROM app_jobs.job_queues").fetchall()


def test_get_jobs_is_the_same_as_get_job_called_n_times(conn: Conn, jobs_db: db.JobsDB) -> None:
    """One statement, but exactly the calls a loop makes: same jobs, same order, one
    attempt each, serial queues honoured, and it stops at the first empty call."""
    past = datetime.now(UTC) - timedelta(hours=1)
    for i in range(9):
        jobs_db.queue.add_job(
            conn,
            TENANT,
            "skipped" if i == 4 else "batched",
            {"i": i},
            priority=(i * 3) % 4,
            queue_name="serial" if i in (1, 2, 6) else None,
            run_at=past + timedelta(minutes=i % 3),
        )
    expiry, tasks = timedelta(minutes=5), ["batched"]
    conn.execute("SET track_functions = 'pl'")

    def one_by_one(limit: int) -> list[JobRow]:
        found: list[JobRow] = []
        while len(found) < limit and (job := jobs_db.queue.get_job(conn, WORKER, tasks, expiry)):
            found.append(job)
        return found

    for limit in (3, 50):
        with conn.transaction(force_rollback=True):
            looped = one_by_one(limit)
            looped_queues = queues(conn)
        with conn.transaction(force_rollback=True):
            before = _get_job_calls(conn)
            batched = jobs_db.queue.get_jobs(conn, WORKER, tasks, expiry, limit)
            calls = _get_job_calls(conn) - before
            batched_queues = queues(conn)
            stamp = conn.execute("SELECT now()").fetchone()
        strip = [(j.id, j.attempts, j.locked_by) for j in looped]
        assert [(j.id, j.attempts, j.locked_by) for j in batched] == strip
        assert len({j.id for j in batched}) == len(batched)
        assert {j.locked_at for j in batched} == {stamp[0] if stamp else None}
        assert batched_queues == looped_queues  # the serial queue: held the same way
        if limit == 3:
            assert (len(batched), calls) == (3, 3)
        else:  # 8 due jobs of the task, but the serial queue gives only one of its three
            assert (len(batched), calls) == (6, 7)  # the 7th call found nothing
            assert batched_queues == [("serial", WORKER)]
    assert jobs_db.queue.get_jobs(conn, WORKER, tasks, expiry, 0) == []


def test_get_jobs_under_cap_counts_what_the_worker_holds_first(
    conn: Conn, jobs_db: db.JobsDB
) -> None:
    """The in-flight cap, applied in the locking statement itself: never more calls
    than the room left, none at all at (or over) the cap."""
    for i in range(10):
        jobs_db.queue.add_job(conn, TENANT, "capped", {"i": i})
    expiry = timedelta(minutes=5)
    conn.execute("SET track_functions = 'pl'")

    def lock(limit: int, cap: int) -> tuple[int, int, int]:
        with conn.transaction():
            before = _get_job_calls(conn)
            batch = jobs_db.queue.get_jobs_under_cap(conn, WORKER, None, expiry, limit, cap)
            return len(batch.jobs), batch.room, _get_job_calls(conn) - before

    assert lock(limit=50, cap=4) == (4, 4, 4)  # the cap bounds the calls
    assert lock(limit=50, cap=4) == (0, 0, 0)  # at the cap: no call at all
    assert lock(limit=50, cap=2) == (0, -2, 0)  # a lowered cap: over it, still no call
    assert lock(limit=3, cap=100) == (3, 96, 3)  # the batch size bounds them too
    assert lock(limit=50, cap=100) == (3, 93, 4)  # the 4th call found nothing
    assert lock(limit=50, cap=100) == (0, 90, 1)
    assert jobs_db.reads.count_locked_by(conn, WORKER) == 10
    jobs = jobs_db.queue.get_jobs_under_cap(conn, "bridge-other-0000", None, expiry, 50, 5).jobs
    assert jobs == []  # every job is held by WORKER
