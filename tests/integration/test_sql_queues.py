"""Serial queues: job_queues bookkeeping and one-job-at-a-time per queue."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_job_count_follows_inserts_moves_and_deletes(q, tenant):
    a = q.add_job("t", queue_name="q1")
    b = q.add_job("t", queue_name="q1")
    c = q.add_job("t", queue_name="q2")
    d = q.add_job("t")  # add_job passes NULL: no serial queue
    assert d["queue_name"] is None
    assert q.queues() == {"q1": 2, "q2": 1}

    q.execute("UPDATE app_jobs.jobs SET queue_name = 'q2' WHERE id = %s", [a["id"]])
    assert q.queues() == {"q1": 1, "q2": 2}
    q.execute("UPDATE app_jobs.jobs SET queue_name = NULL WHERE id = %s", [c["id"]])
    assert q.queues() == {"q1": 1, "q2": 1}
    q.execute("UPDATE app_jobs.jobs SET queue_name = 'q3' WHERE id = %s", [d["id"]])
    assert q.queues() == {"q1": 1, "q2": 1, "q3": 1}
    # an update that leaves queue_name alone (even when naming it) counts nothing
    q.execute("UPDATE app_jobs.jobs SET priority = 5, queue_name = queue_name")
    assert q.queues() == {"q1": 1, "q2": 1, "q3": 1}

    q.execute("DELETE FROM app_jobs.jobs WHERE id = %s", [d["id"]])
    assert q.queues() == {"q1": 1, "q2": 1}  # the emptied queue's row is gone
    q.execute("UPDATE app_jobs.jobs SET queue_name = 'q2' WHERE id = %s", [b["id"]])
    assert q.queues() == {"q2": 2}  # moving the last job out empties q1 too
    q.execute("DELETE FROM app_jobs.jobs")
    assert q.queues() == {}

    # a plain INSERT gets a random queue of its own
    name = q.value(
        "INSERT INTO app_jobs.jobs (database_id, task_identifier) "
        "VALUES (%s, 't') RETURNING queue_name",
        [tenant],
    )
    assert q.queues() == {name: 1}


def test_queue_row_is_deleted_at_zero_even_when_counts_were_off(q):
    q.add_job("t", queue_name="q1")
    q.execute("UPDATE app_jobs.job_queues SET job_count = -3 WHERE queue_name = 'q1'")
    q.add_job("t", queue_name="q1")
    assert q.queues() == {"q1": -2}
    q.execute("DELETE FROM app_jobs.jobs WHERE id = (SELECT min(id) FROM app_jobs.jobs)")
    assert q.queues() == {}  # -3: deleted, since job_count <= 0


def test_a_queue_runs_one_job_at_a_time(q):
    first = q.add_job("t", queue_name="serial")
    second = q.add_job("t", queue_name="serial")
    free = q.add_job("t", priority=10)

    assert q.get_job("worker-1")["id"] == first["id"]
    # the queue is held: worker-2 gets the unqueued job, then nothing
    assert q.get_job("worker-2")["id"] == free["id"]
    assert q.get_job("worker-3") is None
    assert q.queue("serial")["locked_by"] == "worker-1"

    done = q.one("SELECT * FROM app_jobs.complete_job('worker-1', %s)", [first["id"]])
    assert done["id"] == first["id"]
    assert q.queue("serial")["locked_by"] is None and q.queue("serial")["locked_at"] is None

    assert q.get_job("worker-3")["id"] == second["id"]
    assert q.queue("serial")["locked_by"] == "worker-3"
    failed = q.one("SELECT * FROM app_jobs.fail_job('worker-3', %s, 'boom')", [second["id"]])
    assert failed["id"] == second["id"]
    assert q.queue("serial") == {
        "queue_name": "serial",
        "job_count": 1,
        "locked_at": None,
        "locked_by": None,
    }


def test_completing_or_failing_for_another_worker_keeps_the_queue_locked(q):
    first = q.add_job("t", queue_name="serial")
    second = q.add_job("t", queue_name="serial")
    q.get_job("worker-1")
    # complete_job deletes regardless of the holder, but only the holder frees the queue
    q.one("SELECT * FROM app_jobs.complete_job('worker-9', %s)", [first["id"]])
    assert q.job(first["id"]) is None
    assert q.queue("serial")["locked_by"] == "worker-1"
    assert q.get_job("worker-2") is None  # second stays blocked behind the stale queue lock
    # until the queue's own lease expires
    q.execute("UPDATE app_jobs.job_queues SET locked_at = now() - interval '2 hours'")
    assert q.get_job("worker-2", expiry="1 hour")["id"] == second["id"]
    assert q.queue("serial")["locked_by"] == "worker-2"


def test_expired_queue_lock_lets_the_queue_move_on(q):
    first = q.add_job("t", queue_name="serial")
    q.add_job("t", queue_name="serial")
    q.get_job("worker-1")
    q.age_lock(first["id"], "2 hours")
    # expired job lease and expired queue lease: the stale job is taken over first
    taken = q.get_job("worker-2", expiry="1 hour")
    assert (taken["id"], taken["attempts"]) == (first["id"], 2)
    assert q.get_job("worker-3", expiry="1 hour") is None


def test_release_jobs_frees_queues(q):
    q.add_job("t", queue_name="qa")
    q.add_job("t", queue_name="qb")
    q.get_job("worker-1", tasks=["t"])
    q.get_job("worker-2", tasks=["t"])
    q.execute("SELECT app_jobs.release_jobs('worker-1')")
    assert q.queue("qa")["locked_by"] is None
    assert q.queue("qb")["locked_by"] == "worker-2"
