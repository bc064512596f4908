"""get_job: which job it hands out, what it stamps, and lease expiry."""

from __future__ import annotations

import psycopg
import pytest

pytestmark = pytest.mark.integration

JOB_COLUMNS = [
    "id",
    "database_id",
    "queue_name",
    "task_identifier",
    "payload",
    "priority",
    "run_at",
    "attempts",
    "max_attempts",
    "key",
    "last_error",
    "locked_at",
    "locked_by",
    "created_at",
    "updated_at",
]


def drain(q, worker: str = "worker-1", **kwargs) -> list[int]:
    ids = []
    while (job := q.get_job(worker, **kwargs)) is not None:
        ids.append(job["id"])
        assert len(ids) < 1000
    return ids


def test_order_is_priority_then_run_at_then_id(q):
    a = q.add_job("a", priority=1, run_at="1999-01-01T00:00:00Z")
    b = q.add_job("b", priority=0, run_at="2000-01-02T00:00:00Z")
    c = q.add_job("c", priority=0, run_at="2000-01-01T00:00:00Z")
    d = q.add_job("d", priority=0, run_at="2000-01-01T00:00:00Z")
    e = q.add_job("e", priority=-5)  # run_at = now(): still first
    assert drain(q) == [e["id"], c["id"], d["id"], b["id"], a["id"]]


def test_job_due_in_the_future_is_not_picked_until_due(q):
    later = q.add_job("t", run_at="2999-01-01T00:00:00Z")
    assert q.get_job("worker-1") is None
    q.execute("UPDATE app_jobs.jobs SET run_at = now() WHERE id = %s", [later["id"]])
    assert q.get_job("worker-1")["id"] == later["id"]


def test_job_without_attempts_left_is_never_picked(q):
    spent = q.add_job("t", max_attempts=3)
    over = q.add_job("t", max_attempts=3)
    q.execute("UPDATE app_jobs.jobs SET attempts = 3 WHERE id = %s", [spent["id"]])
    q.execute("UPDATE app_jobs.jobs SET attempts = 7 WHERE id = %s", [over["id"]])
    assert q.get_job("worker-1") is None
    q.execute("UPDATE app_jobs.jobs SET attempts = 2 WHERE id = %s", [spent["id"]])
    got = q.get_job("worker-1")
    assert (got["id"], got["attempts"]) == (spent["id"], 3)


def test_task_filter(q):
    a = q.add_job("a")
    b = q.add_job("b")
    c = q.add_job("c")
    assert q.get_job("worker-1", tasks=[]) is None  # an empty list wants nothing
    assert q.get_job("worker-1", tasks=["zzz"]) is None
    assert q.get_job("worker-1", tasks=["c", "b"])["id"] == b["id"]
    assert q.get_job("worker-1", tasks=["b", "c"])["id"] == c["id"]
    assert q.get_job("worker-1", tasks=None)["id"] == a["id"]  # NULL: any task
    assert q.get_job("worker-1") is None


def test_null_worker_raises_invalid_worker_id(q):
    q.add_job("t")
    with pytest.raises(psycopg.errors.RaiseException) as raised:
        q.get_job(None)
    assert raised.value.diag.message_primary == "INVALID_WORKER_ID"
    assert raised.value.sqlstate == "P0001"
    assert q.value("SELECT count(*) FROM app_jobs.jobs WHERE locked_by IS NOT NULL") == 0


def test_nothing_to_do_returns_one_all_null_row(q):
    with q.conn.cursor() as cur:
        cur.execute("SELECT * FROM app_jobs.get_job('worker-1')")
        rows = cur.fetchall()
        names = [column.name for column in cur.description]
    assert names == JOB_COLUMNS
    assert rows == [(None,) * len(JOB_COLUMNS)]


def test_pick_counts_an_attempt_and_stamps_the_transaction_start(q, tenant):
    job = q.add_job("t", payload={"x": 1}, queue_name="q1")
    assert job["attempts"] == 0 and job["locked_by"] is None
    with q.conn.transaction():
        started = q.value("SELECT now()")
        row = q.one("SELECT statement_timestamp() AS st, * FROM app_jobs.get_job('worker-1')")
    assert row["st"] > started  # the call ran later than the transaction began ...
    assert row["locked_at"] == started  # ... but the lease is stamped with its start
    assert (row["id"], row["attempts"], row["locked_by"]) == (job["id"], 1, "worker-1")
    assert (row["database_id"], row["payload"], row["task_identifier"]) == (tenant, {"x": 1}, "t")
    stored = q.job(job["id"])
    assert {k: stored[k] for k in ("attempts", "locked_by", "locked_at")} == {
        "attempts": 1,
        "locked_by": "worker-1",
        "locked_at": started,
    }
    assert q.queue("q1")["locked_by"] == "worker-1"
    assert q.queue("q1")["locked_at"] == started


def test_locked_job_is_not_picked_again(q):
    job = q.add_job("t")
    assert q.get_job("worker-1")["id"] == job["id"]
    assert q.get_job("worker-2") is None
    assert q.get_job("worker-1") is None  # not even by its holder


def test_expired_lease_is_taken_over(q):
    job = q.add_job("t")
    q.get_job("worker-1")
    q.age_lock(job["id"], "10 seconds")
    assert q.get_job("worker-2", expiry="1 hour") is None
    taken = q.get_job("worker-2", expiry="5 seconds")
    assert (taken["id"], taken["attempts"], taken["locked_by"]) == (job["id"], 2, "worker-2")
    assert taken["locked_at"] > q.value("SELECT now() - interval '1 second'")


def test_default_expiry_is_four_hours(q):
    young = q.add_job("t")
    old = q.add_job("t")
    q.get_job("worker-1")
    q.get_job("worker-1")
    q.age_lock(young["id"], "3 hours 59 minutes")
    q.age_lock(old["id"], "4 hours 1 minute")
    assert q.get_job("worker-2")["id"] == old["id"]
    assert q.get_job("worker-2") is None


def test_row_locked_by_another_transaction_is_skipped_not_waited_for(q, connect, make_q):
    first = q.add_job("t")
    second = q.add_job("t")
    other = connect()
    with other.transaction():
        other.execute("SELECT 1 FROM app_jobs.jobs WHERE id = %s FOR UPDATE", [first["id"]])
        q.execute("SET lock_timeout = '2s'")  # a wait would fail the test, not hang it
        assert q.get_job("worker-1")["id"] == second["id"]
    assert make_q(other).get_job("worker-2")["id"] == first["id"]


def test_get_job_within_a_rolled_back_transaction_leaves_no_trace(q):
    job = q.add_job("t")
    with pytest.raises(RuntimeError), q.conn.transaction():
        assert q.get_job("worker-1")["id"] == job["id"]
        raise RuntimeError("publish failed")
    stored = q.job(job["id"])
    assert (stored["attempts"], stored["locked_by"], stored["locked_at"]) == (0, None, None)
