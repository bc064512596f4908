"""get_scheduled_job, release_scheduled_jobs and run_scheduled_job."""

from __future__ import annotations

import threading

import psycopg
import pytest

pytestmark = pytest.mark.integration


def _run(q, scheduled_id: int, expiry: str | None = None) -> dict:
    if expiry is None:
        return q.one("SELECT * FROM app_jobs.run_scheduled_job(%s)", [scheduled_id])
    return q.one(
        "SELECT * FROM app_jobs.run_scheduled_job(%s, %s::interval)", [scheduled_id, expiry]
    )


def _already_scheduled(q, scheduled_id: int, expiry: str | None = None) -> bool:
    count = q.value("SELECT count(*) FROM app_jobs.jobs")
    try:
        _run(q, scheduled_id, expiry)
    except psycopg.errors.RaiseException as exc:
        assert exc.diag.message_primary == "ALREADY_SCHEDULED"
        assert q.value("SELECT count(*) FROM app_jobs.jobs") == count  # nothing inserted
        return True
    return False


# -- get_scheduled_job / release_scheduled_jobs ---------------------------------------


def test_get_scheduled_job_requires_a_worker_id(q):
    q.add_scheduled_job("t")
    with pytest.raises(psycopg.errors.RaiseException) as raised:
        q.get_scheduled_job(None)
    assert raised.value.diag.message_primary == "INVALID_WORKER_ID"


def test_get_scheduled_job_order_filter_and_lock(q):
    low = q.add_scheduled_job("a", priority=5)
    first = q.add_scheduled_job("b", priority=0)
    second = q.add_scheduled_job("a", priority=0)
    assert q.get_scheduled_job("scheduler-1", tasks=["zzz"]) is None
    with q.conn.transaction():
        now = q.value("SELECT now()")
        got = q.get_scheduled_job("scheduler-1", tasks=["a"])
    assert got["id"] == second["id"]
    assert (got["locked_by"], got["locked_at"]) == ("scheduler-1", now)
    assert q.scheduled(second["id"])["locked_by"] == "scheduler-1"
    assert q.get_scheduled_job("scheduler-2")["id"] == first["id"]
    assert q.get_scheduled_job("scheduler-2")["id"] == low["id"]
    with q.conn.cursor() as cur:
        cur.execute("SELECT * FROM app_jobs.get_scheduled_job('scheduler-3')")
        assert cur.fetchall() == [(None,) * 13]  # one all-NULL row


def test_scheduled_job_locks_never_expire(q):
    held = q.add_scheduled_job("t")
    q.get_scheduled_job("scheduler-1")
    q.execute("UPDATE app_jobs.scheduled_jobs SET locked_at = now() - interval '30 days'")
    assert q.get_scheduled_job("scheduler-2") is None
    q.execute("SELECT app_jobs.release_scheduled_jobs('scheduler-1')")
    assert q.get_scheduled_job("scheduler-2")["id"] == held["id"]


def test_get_scheduled_job_skips_rows_locked_by_another_transaction(q, connect):
    first = q.add_scheduled_job("t")
    second = q.add_scheduled_job("t")
    other = connect()
    with other.transaction():
        other.execute(
            "SELECT 1 FROM app_jobs.scheduled_jobs WHERE id = %s FOR UPDATE", [first["id"]]
        )
        q.execute("SET lock_timeout = '2s'")
        assert q.get_scheduled_job("scheduler-1")["id"] == second["id"]


def test_release_scheduled_jobs_all_or_some(q):
    ids = [q.add_scheduled_job("t")["id"] for _ in range(4)]
    for _ in range(3):
        q.get_scheduled_job("scheduler-1")
    q.get_scheduled_job("scheduler-2")

    def holders() -> list:
        return [q.scheduled(i)["locked_by"] for i in ids]

    q.execute("SELECT app_jobs.release_scheduled_jobs('scheduler-1', %s)", [[ids[0], ids[3]]])
    assert holders() == [None, "scheduler-1", "scheduler-1", "scheduler-2"]  # ids[3] is not theirs
    q.execute("SELECT app_jobs.release_scheduled_jobs('scheduler-1')")
    assert holders() == [None, None, None, "scheduler-2"]
    assert q.scheduled(ids[1])["locked_at"] is None


# -- run_scheduled_job -------------------------------------------------------------------


def test_run_scheduled_job_copies_the_template(q, tenant):
    sched = q.add_scheduled_job(
        "report",
        payload={"r": 1},
        schedule_info={"rule": "* * * * *"},
        job_key="report-key",
        queue_name="reports",
        max_attempts=7,
        priority=3,
    )
    with q.conn.transaction():
        now = q.value("SELECT now()")
        job = _run(q, sched["id"])
    assert (job["database_id"], job["task_identifier"], job["payload"]) == (
        tenant,
        "report",
        {"r": 1},
    )
    assert (job["queue_name"], job["priority"], job["max_attempts"], job["key"]) == (
        "reports",
        3,
        7,
        "report-key",
    )
    assert (job["run_at"], job["attempts"], job["locked_by"]) == (now, 0, None)
    after = q.scheduled(sched["id"])
    assert (after["last_scheduled"], after["last_scheduled_id"]) == (now, job["id"])
    assert q.queues() == {"reports": 1}


def test_run_scheduled_job_copies_a_null_queue(q):
    sched = q.add_scheduled_job("t")
    assert _run(q, sched["id"])["queue_name"] is None


def test_already_scheduled_while_the_last_job_is_pending(q):
    sched = q.add_scheduled_job("t")
    first = _run(q, sched["id"])
    assert _already_scheduled(q, sched["id"])
    # a failed job waiting for its retry is pending too (fail_job clears locked_at)
    q.get_job("worker-1")
    q.one("SELECT * FROM app_jobs.fail_job('worker-1', %s, 'boom')", [first["id"]])
    assert _already_scheduled(q, sched["id"])
    # ... and so is one that used up its attempts: it stays until someone removes it
    q.rows("SELECT * FROM app_jobs.permanently_fail_jobs(%s)", [[first["id"]]])
    assert _already_scheduled(q, sched["id"])
    assert q.scheduled(sched["id"])["last_scheduled_id"] == first["id"]


def test_already_scheduled_while_the_last_job_runs_within_job_expiry(q):
    sched = q.add_scheduled_job("t")
    first = _run(q, sched["id"])
    q.get_job("worker-1")
    assert _already_scheduled(q, sched["id"])
    q.age_lock(first["id"], "59 minutes")
    assert _already_scheduled(q, sched["id"])  # default job_expiry: 1 hour
    assert _already_scheduled(q, sched["id"], "2 hours")
    second = _run(q, sched["id"], "30 minutes")  # its lock is older than job_expiry
    assert second["id"] != first["id"]
    q.execute(
        "UPDATE app_jobs.jobs SET run_at = now() - interval '1 day' WHERE id = %s", [second["id"]]
    )
    assert _already_scheduled(q, sched["id"], "1 second")  # never locked: pending, however old


def test_lock_older_than_default_expiry_allows_the_next_run(q):
    sched = q.add_scheduled_job("t")
    first = _run(q, sched["id"])
    q.get_job("worker-1")
    q.age_lock(first["id"], "61 minutes")
    second = _run(q, sched["id"])
    assert second["id"] != first["id"]
    assert q.scheduled(sched["id"])["last_scheduled_id"] == second["id"]
    assert q.job(first["id"]) is not None  # the old run is left alone


def test_completed_last_job_allows_the_next_run(q):
    sched = q.add_scheduled_job("t", job_key="k")
    first = _run(q, sched["id"])
    q.get_job("worker-1")
    q.one("SELECT * FROM app_jobs.complete_job('worker-1', %s)", [first["id"]])
    second = _run(q, sched["id"])
    assert second["id"] != first["id"] and second["key"] == "k"


def test_run_of_a_deleted_scheduled_job_returns_the_null_row(q):
    sched = q.add_scheduled_job("t")
    _run(q, sched["id"])
    q.execute("DELETE FROM app_jobs.scheduled_jobs")
    assert q.value("SELECT count(*) FROM app_jobs.jobs") == 1
    with q.conn.cursor() as cur:
        cur.execute("SELECT * FROM app_jobs.run_scheduled_job(%s)", [sched["id"]])
        assert cur.fetchall() == [(None,) * 15]
    assert q.value("SELECT count(*) FROM app_jobs.jobs") == 1
    assert _run(q, 424242)["id"] is None


def test_concurrent_runs_of_one_scheduled_job_insert_one_job(q, connect, make_q, wait):
    sched = q.add_scheduled_job("t")
    other = make_q(connect())
    outcome: list[object] = []

    def second_tick() -> None:
        try:
            outcome.append(_run(other, sched["id"]))
        except psycopg.Error as exc:
            outcome.append(exc)

    with q.conn.transaction():
        first = _run(q, sched["id"])
        thread = threading.Thread(target=second_tick, daemon=True)
        thread.start()
        pid = other.conn.info.backend_pid
        wait(
            lambda: (
                q.value("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
                == "Lock"
            ),
            10,
            "the second run_scheduled_job to wait for the first",
        )
    thread.join(10)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.RaiseException)
    assert outcome[0].diag.message_primary == "ALREADY_SCHEDULED"
    assert [row["id"] for row in q.rows("SELECT id FROM app_jobs.jobs")] == [first["id"]]
