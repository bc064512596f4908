"""Concurrent workers on their own connections: every job is handed out once,
and a serial queue never has two jobs running at the same time."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

pytestmark = pytest.mark.integration

WORKERS = 8


def _insert_jobs(q, count: int, queues: int | None = None) -> list[int]:
    queue = "NULL" if queues is None else f"'queue-' || (g %% {queues})"
    return [
        row[0]
        for row in q.conn.execute(
            f"""SELECT (app_jobs.add_job(%s, 't', json_build_object('n', g),
                                         queue_name => {queue})).id
                  FROM generate_series(1, %s) AS g""",
            [q.tenant, count],
        )
    ]


def test_concurrent_workers_never_get_the_same_job(q, connect, make_q, gate):
    ids = _insert_jobs(q, 500)
    taken: list[list[int]] = [[] for _ in range(WORKERS)]
    workers = [make_q(connect()) for _ in range(WORKERS)]

    def work(index: int) -> None:
        me = workers[index]
        worker_id = f"worker-{index}"
        while (job := me.get_job(worker_id)) is not None:
            assert job["locked_by"] == worker_id and job["attempts"] == 1
            taken[index].append(job["id"])
            if len(taken[index]) % 2:  # complete half of them while others keep picking
                me.conn.execute("SELECT app_jobs.complete_job(%s, %s)", [worker_id, job["id"]])

    gate.run(work, WORKERS, timeout=60)

    handed_out = [job_id for batch in taken for job_id in batch]
    duplicates = [job_id for job_id, n in Counter(handed_out).items() if n > 1]
    assert duplicates == []
    assert sorted(handed_out) == ids
    assert sum(1 for batch in taken if batch) > 1, "the work was not shared at all"
    left = q.rows("SELECT attempts, locked_by FROM app_jobs.jobs")
    assert len(left) == 500 - sum((len(batch) + 1) // 2 for batch in taken)
    assert all(row["attempts"] == 1 and row["locked_by"] is not None for row in left)


def test_concurrent_workers_respect_serial_queues(q, connect, make_q, gate):
    ids = _insert_jobs(q, 120, queues=4)
    workers = [make_q(connect()) for _ in range(WORKERS)]
    guard = threading.Lock()
    running: Counter[str] = Counter()
    overlaps: list[str] = []
    done: list[int] = []

    def work(index: int) -> None:
        me = workers[index]
        worker_id = f"worker-{index}"
        idle_rounds = 0
        while len(done) < len(ids) and idle_rounds < 10_000:
            job = me.get_job(worker_id)
            if job is None:  # every queue is busy right now: try again
                idle_rounds += 1
                continue
            queue = job["queue_name"]
            with guard:
                running[queue] += 1
                if running[queue] > 1:
                    overlaps.append(queue)
            # while we hold the queue, the database shows exactly one locked job in it
            locked = me.value(
                "SELECT count(*) FROM app_jobs.jobs "
                "WHERE queue_name = %s AND locked_by IS NOT NULL",
                [queue],
            )
            assert locked == 1
            with guard:
                running[queue] -= 1
                done.append(job["id"])
            me.conn.execute("SELECT app_jobs.complete_job(%s, %s)", [worker_id, job["id"]])

    gate.run(work, WORKERS, timeout=60)

    assert overlaps == []
    assert sorted(done) == ids
    assert q.value("SELECT count(*) FROM app_jobs.jobs") == 0
    assert q.queues() == {}
