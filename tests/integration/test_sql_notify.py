"""NOTIFY "jobs:insert" / "scheduled_jobs:insert": empty payload, on insert only,
delivered at commit."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

SENTINEL = "lqjobs_test_sentinel"


def _until_sentinel(listener, timeout: float = 10) -> list[tuple[str, str]]:
    """Every notification up to the sentinel (they arrive in commit order)."""
    seen = []
    for note in listener.notifies(timeout=timeout):
        if note.channel == SENTINEL:
            return seen
        seen.append((note.channel, note.payload))
    raise AssertionError(f"no sentinel notification within {timeout}s; got {seen}")


@pytest.fixture
def listener(connect):
    conn = connect()
    conn.execute('LISTEN "jobs:insert"')
    conn.execute('LISTEN "scheduled_jobs:insert"')
    conn.execute(f"LISTEN {SENTINEL}")
    return conn


def test_add_job_notifies_jobs_insert(q, listener):
    q.add_job("t")
    notes = [(n.channel, n.payload, n.pid) for n in listener.notifies(timeout=10, stop_after=1)]
    assert notes == [("jobs:insert", "", q.conn.info.backend_pid)]


def test_add_scheduled_job_notifies_scheduled_jobs_insert(q, listener):
    q.add_scheduled_job("t")
    notes = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=1)]
    assert notes == [("scheduled_jobs:insert", "")]


def test_every_insert_notifies_not_only_add_job(q, listener, tenant):
    for values in ("(%s, 'a')", "(%s, 'b')"):
        q.execute(
            f"INSERT INTO app_jobs.jobs (database_id, task_identifier) VALUES {values}", [tenant]
        )
    q.execute(f"NOTIFY {SENTINEL}")
    # separate transactions: one notification each
    assert _until_sentinel(listener) == [("jobs:insert", ""), ("jobs:insert", "")]


def test_updates_and_deletes_do_not_notify(q, connect, make_q, tenant):
    job = q.add_job("t")
    sched = q.add_scheduled_job("t")
    listener = connect()
    listener.execute('LISTEN "jobs:insert"')
    listener.execute('LISTEN "scheduled_jobs:insert"')
    listener.execute(f"LISTEN {SENTINEL}")
    q.get_job("worker-1")
    q.one("SELECT * FROM app_jobs.fail_job('worker-1', %s, 'boom')", [job["id"]])
    q.rows("SELECT * FROM app_jobs.reschedule_jobs(%s, run_at => now())", [[job["id"]]])
    q.get_scheduled_job("scheduler-1")
    q.execute("SELECT app_jobs.release_scheduled_jobs('scheduler-1')")
    q.one("SELECT * FROM app_jobs.complete_job('worker-1', %s)", [job["id"]])
    q.execute("DELETE FROM app_jobs.scheduled_jobs WHERE id = %s", [sched["id"]])
    q.execute(f"NOTIFY {SENTINEL}")
    assert _until_sentinel(listener) == []


def test_notification_is_delivered_at_commit(q, connect, make_q, listener):
    writer = make_q(connect())
    with writer.conn.transaction():
        writer.add_job("t")
        q.execute(f"NOTIFY {SENTINEL}")  # committed while the insert is still open
        assert _until_sentinel(listener) == []
    notes = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=1)]
    assert notes == [("jobs:insert", "")]


def test_run_scheduled_job_notifies_jobs_insert(q, connect):
    sched = q.add_scheduled_job("t")
    listener = connect()
    listener.execute('LISTEN "jobs:insert"')
    q.one("SELECT * FROM app_jobs.run_scheduled_job(%s)", [sched["id"]])
    notes = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=1)]
    assert notes == [("jobs:insert", "")]
