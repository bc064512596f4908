"""The task's lease fencing, driven directly (no broker): stale deliveries,
overlapping duplicates, redelivery after a lost worker, outcomes written under
the lease only."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

import psycopg
import pytest

from lqjobs.broker_state import Claim, StartedMarks
from lqjobs.db import Connection, JobsDB
from lqjobs.db.fence import Fence, Held
from lqjobs.db.queue import Queue
from lqjobs.lease import Lease
from lqjobs.metrics import render
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.worker import JobRunner, Result
from tests.runners import WORKER, lock_job, row

pytestmark = pytest.mark.integration


def before_any_running_call(runner: JobRunner, lease: Lease) -> datetime:
    """A start time so long ago that no call started then can still be running."""
    return lease.locked_at - timedelta(seconds=runner.settings.call_bound_seconds())


def test_a_delivery_for_an_old_lease_is_dropped_untouched(
    conn: psycopg.Connection[Any], runner: JobRunner, functions: FunctionServer
) -> None:
    lease = lock_job(conn, "noop", {})
    before = row(conn, lease.job_id)
    for stale in (
        Lease(lease.job_id, "bridge-other-0000", lease.attempts, lease.locked_at),
        Lease(lease.job_id, lease.worker_id, lease.attempts - 1, lease.locked_at),
        Lease(
            lease.job_id,
            lease.worker_id,
            lease.attempts,
            lease.locked_at - timedelta(microseconds=1),
        ),
        Lease(lease.job_id + 1000, lease.worker_id, lease.attempts, lease.locked_at),
    ):
        assert runner.run(stale, "noop", "call-1", redelivered=False) is Result.STALE
    assert row(conn, lease.job_id) == before
    assert len(functions.calls) == 0
    assert runner.run(lease, "noop", "call-2", redelivered=False) is Result.COMPLETED
    assert row(conn, lease.job_id) is None
    text = render(runner.metrics())
    assert 'lqjobs_task_results_total{result="stale"} 4' in text
    assert 'lqjobs_task_results_total{result="completed"} 1' in text


def test_two_deliveries_of_one_lease_never_overlap(
    db_url: str, conn: psycopg.Connection[Any], runner: JobRunner, functions: FunctionServer
) -> None:
    lease = lock_job(conn, "slow", {"sleep": 1.0})
    results: list[Result] = []
    first = threading.Thread(
        target=lambda: results.append(runner.run(lease, "slow", "call-1", redelivered=False))
    )
    first.start()
    wait_for_call_in_progress(db_url)
    # The duplicate arrives while the first call is running: busy, not called, not dropped.
    assert runner.run(lease, "slow", "call-2", redelivered=False) is Result.BUSY
    first.join(10)
    assert results == [Result.COMPLETED]
    assert len(functions.calls.calls_for(lease.job_id)) == 1
    # Once the first has settled, the duplicate finds no lease: dropped.
    assert runner.run(lease, "slow", "call-2", redelivered=False) is Result.STALE


def wait_for_call_in_progress(db_url: str) -> None:
    """The runner holds the job's advisory lock exactly while it calls the function."""

    def held() -> bool:
        with psycopg.connect(db_url, autocommit=True) as probe:
            found = probe.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            ).fetchone()
        return bool(found and found[0])

    wait_until(held, 5, "the call to start")


def test_a_redelivery_after_a_lost_worker_is_failed_not_rerun(
    conn: psycopg.Connection[Any], runner: JobRunner, functions: FunctionServer
) -> None:
    lease = lock_job(conn, "noop", {})
    # The lost worker had started the call longer ago than any call can run.
    runner.marks.claim(lease, before_any_running_call(runner, lease))
    assert runner.run(lease, "noop", "call-2", redelivered=True) is Result.WORKER_LOST
    attempts, locked_by, error = row(conn, lease.job_id)  # type: ignore[misc]
    assert (attempts, locked_by, error) == (1, None, "worker lost during attempt")
    assert len(functions.calls) == 0


def test_a_redelivery_that_never_started_runs_normally(
    conn: psycopg.Connection[Any], runner: JobRunner, functions: FunctionServer
) -> None:
    lease = lock_job(conn, "noop", {})  # e.g. restored on a warm shutdown, never started
    assert runner.run(lease, "noop", "call-1", redelivered=True) is Result.COMPLETED
    assert len(functions.calls.calls_for(lease.job_id)) == 1


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "negative-control"])
def test_an_outcome_for_a_re_leased_job_is_not_written(
    db_url: str,
    conn: psycopg.Connection[Any],
    runner: JobRunner,
    functions: FunctionServer,
    monkeypatch: pytest.MonkeyPatch,
    fenced: bool,
) -> None:
    if not fenced:  # what complete_job alone does: delete by id, whoever holds the job

        def unfenced(self: Fence, c: Connection, lease: Lease, release_advisory: bool) -> bool:
            done = Queue(self.schema).complete_job(c, lease.worker_id, lease.job_id)
            if release_advisory:
                self.release_advisory(c, lease.job_id)
            return done is not None

        monkeypatch.setattr(Fence, "fenced_complete", unfenced)
    lease = lock_job(conn, "slow", {"sleep": 0.5})
    done: list[Result] = []
    call = threading.Thread(
        target=lambda: done.append(runner.run(lease, "slow", "call-1", redelivered=False))
    )
    call.start()
    wait_for_call_in_progress(db_url)
    # Meanwhile the lock expires and another bridge re-takes the job.
    conn.execute(
        "UPDATE app_jobs.jobs SET locked_at = now() - interval '1 hour' WHERE id = %s",
        [lease.job_id],
    )
    relocked = JobsDB().queue.get_job(conn, "bridge-other-0000", None, timedelta(minutes=5))
    assert relocked is not None and relocked.id == lease.job_id
    call.join(10)
    if not fenced:  # the oracle sees the bug: the new attempt's job is gone
        assert done == [Result.COMPLETED] and row(conn, lease.job_id) is None
        return
    assert done == [Result.STALE]
    attempts, locked_by, _ = row(conn, lease.job_id)  # type: ignore[misc]
    assert (attempts, locked_by) == (2, "bridge-other-0000")  # the new lease is intact


@pytest.mark.parametrize(
    ("payload", "expected", "attempts_left"),
    [({"status": 503}, Result.FAILED, True), ({"status": 400}, Result.FAILED_PERMANENTLY, False)],
)
def test_failures_are_recorded_under_the_lease(
    conn: psycopg.Connection[Any],
    runner: JobRunner,
    payload: dict[str, int],
    expected: Result,
    attempts_left: bool,
) -> None:
    lease = lock_job(conn, "broken", payload)
    assert runner.run(lease, "broken", "call-1", redelivered=False) is expected
    attempts, max_attempts, locked_by, error = conn.execute(
        "SELECT attempts, max_attempts, locked_by, last_error FROM app_jobs.jobs WHERE id = %s",
        [lease.job_id],
    ).fetchone()  # type: ignore[misc]
    assert locked_by is None
    assert str(payload["status"]) in error
    assert (attempts < max_attempts) is attempts_left


class KillsItsSession:
    """An executor whose call succeeds while the runner's database session is
    terminated under it (a Postgres restart, a failover)."""

    name = "kills-its-session"

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.calls = 0

    def invoke(self, invocation: Any) -> Any:
        from lqjobs.executors import Done

        self.calls += 1
        with psycopg.connect(self.db_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'"
            )
        return Done()


def test_a_lost_database_after_a_successful_call_retries_only_the_bookkeeping(
    db_url: str, conn: psycopg.Connection[Any], runner: JobRunner
) -> None:
    lease = lock_job(conn, "noop", {})
    executor = KillsItsSession(db_url)
    runner.router.for_task = lambda _task, _job_id=0: executor  # type: ignore[method-assign]
    assert runner.run(lease, "noop", "call-1", redelivered=False) is Result.COMPLETED
    assert executor.calls == 1  # the function was not called again
    assert row(conn, lease.job_id) is None  # and the job is settled


def test_an_unreachable_marks_store_never_strands_the_job(
    db_url: str, conn: psycopg.Connection[Any], runner: JobRunner, functions: FunctionServer
) -> None:
    import redis

    from lqjobs.ops.embedded import free_port

    dead = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2)
    runner.marks = StartedMarks(dead, timedelta(minutes=1))
    lease = lock_job(conn, "noop", {})
    assert runner.run(lease, "noop", "call-1", redelivered=True) is Result.COMPLETED
    assert len(functions.calls.calls_for(lease.job_id)) == 1
    dead.close()


def run_two_deliveries_at_once(runner: JobRunner, lease: Lease) -> list[Result]:
    results: list[Result] = []
    threads = [
        threading.Thread(
            target=lambda n=n: results.append(
                runner.run(lease, "slow", f"call-{n}", redelivered=False)
            )
        )
        for n in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    return results


def overlapping(calls: list[Any]) -> bool:
    first, *rest = sorted(calls, key=lambda c: c.started)
    return any(other.started < first.ended for other in rest)


@pytest.mark.parametrize("protected", [True, False], ids=["advisory-lock", "negative-control"])
def test_duplicate_deliveries_overlap_only_without_the_advisory_lock(
    conn: psycopg.Connection[Any],
    runner: JobRunner,
    functions: FunctionServer,
    monkeypatch: pytest.MonkeyPatch,
    protected: bool,
) -> None:
    if not protected:  # switch the protection off: every delivery "gets" the lock
        real = Fence.preflight

        def unguarded(self: Fence, c: Connection, lease: Lease) -> Held | None:
            held = real(self, c, lease)
            return None if held is None else dataclasses.replace(held, advisory=True)

        monkeypatch.setattr(Fence, "preflight", unguarded)
        # ... with the start marks unavailable too (best effort: Redis down), so the
        # advisory lock is the only protection left to switch off.
        runner.marks = StartedMarks(None, timedelta(minutes=1))
    lease = lock_job(conn, "slow", {"sleep": 0.5})
    results = run_two_deliveries_at_once(runner, lease)
    calls = functions.calls.calls_for(lease.job_id)
    if protected:
        assert sorted(r.value for r in results) == ["busy", "completed"]
        assert len(calls) == 1
    else:  # the oracle sees the bug this protection prevents
        assert len(calls) == 2 and overlapping(calls)


class DefersItsCall:
    """An executor that hands every call to an asynchronous callback."""

    name = "defers"

    def __init__(self) -> None:
        self.calls = 0

    def invoke(self, invocation: Any) -> Any:
        from lqjobs.executors import Deferred

        self.calls += 1
        return Deferred()


@pytest.fixture
def redis_marks(redis_url: str, runner: JobRunner) -> Iterator[Any]:
    """The runner with its real Redis start marks and deferred-deadline set (a set
    of its own, so that no callback service of another test reaps it)."""
    import redis

    from lqjobs.broker_state import DeferredDeadlines

    client = redis.Redis.from_url(redis_url)
    key = f"lqjobs:deferred:test-{uuid4().hex}"
    runner.marks = StartedMarks(client, timedelta(minutes=1), deferred_key=key)
    runner.deadlines = DeferredDeadlines(client, key)
    yield client
    client.delete(key)
    client.close()


def advisory_locks(conn: psycopg.Connection[Any]) -> int:
    found = conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()
    return int(found[0]) if found else 0


@pytest.mark.parametrize("redelivered", [True, False], ids=["redelivered", "re-published"])
def test_a_started_deferred_lease_delivered_again_is_dropped_without_a_write(
    conn: psycopg.Connection[Any], runner: JobRunner, redis_marks: Any, redelivered: bool
) -> None:
    lease = lock_job(conn, "async-fn", {})
    executor = DefersItsCall()
    runner.router.for_task = lambda _task, _job_id=0: executor  # type: ignore[method-assign]
    assert runner.run(lease, "async-fn", "call-1", redelivered=False) is Result.DEFERRED
    held = row(conn, lease.job_id)
    assert held is not None and held[1] == WORKER  # locked until its callback comes
    # The worker's message comes back (or the reconciler re-publishes the lease).
    assert runner.run(lease, "async-fn", "call-2", redelivered=redelivered) is Result.DUPLICATE
    assert executor.calls == 1  # not called again
    assert row(conn, lease.job_id) == held  # and the row untouched: no fail_job
    assert advisory_locks(conn) == 0
    assert 'lqjobs_task_results_total{result="duplicate"} 1' in render(runner.metrics())


def test_a_re_published_lease_whose_call_started_is_failed_not_rerun(
    conn: psycopg.Connection[Any], runner: JobRunner, functions: FunctionServer, redis_marks: Any
) -> None:
    """Every delivery claims the start (SET NX), not only a redelivered one: a second
    message for a started, not deferred lease is a lost call, failed under the lease."""
    lease = lock_job(conn, "noop", {})
    key = f"lqjobs:started:{lease.task_id()}"
    long_ago = before_any_running_call(runner, lease)
    assert runner.marks.claim(lease, long_ago) == (Claim.FIRST, None)  # the lost worker's
    assert 0 < redis_marks.ttl(key) <= 60  # the claim expires with the lease
    assert runner.marks.claim(lease, lease.locked_at) == (Claim.STARTED, long_ago)
    assert runner.run(lease, "noop", "call-2", redelivered=False) is Result.WORKER_LOST
    assert row(conn, lease.job_id) == (1, None, "worker lost during attempt")
    assert len(functions.calls) == 0
    assert advisory_locks(conn) == 0


def test_each_outcome_statement_releases_the_advisory_lock(
    conn: psycopg.Connection[Any], runner: JobRunner, functions: FunctionServer
) -> None:
    for task, payload, expected in (
        ("noop", {}, Result.COMPLETED),
        ("broken", {"status": 503}, Result.FAILED),
        ("broken", {"status": 400}, Result.FAILED_PERMANENTLY),
    ):
        lease = lock_job(conn, task, payload)
        assert runner.run(lease, task, "call-1", redelivered=False) is expected
        assert advisory_locks(conn) == 0, expected


def test_the_preflight_commits_without_a_flush_and_leaves_the_session_durable(
    conn: psycopg.Connection[Any], connect: Any
) -> None:
    jobs_db = JobsDB()
    lease = lock_job(conn, "noop", {})
    params = {
        "id": lease.job_id,
        "worker": lease.worker_id,
        "attempts": lease.attempts,
        "locked_at": lease.locked_at,
    }
    session = connect()
    session.execute("SET synchronous_commit = on")  # the suite's server defaults to off
    # The statement switches synchronous_commit off for its own transaction...
    with session.transaction():
        assert session.execute(jobs_db.fence.preflight_query(), params).fetchone() is not None
        assert session.execute("SHOW synchronous_commit").fetchone() == ("off",)
    # ...and only for it: the fenced writes that follow on the session stay durable.
    assert session.execute("SHOW synchronous_commit").fetchone() == ("on",)
    held = jobs_db.fence.preflight(session, lease)
    assert held is not None and held.advisory
    assert session.execute("SHOW synchronous_commit").fetchone() == ("on",)
    assert jobs_db.fence.fenced_complete(session, lease, release_advisory=True)


def test_the_preflight_refuses_a_transaction_it_would_make_non_durable(
    conn: psycopg.Connection[Any], connect: Any
) -> None:
    lease = lock_job(conn, "noop", {})
    session = connect()
    with session.transaction(), pytest.raises(ValueError, match="autocommit"):
        JobsDB().fence.preflight(session, lease)


def terminate_advisory_holder(db_url: str) -> None:
    """End the session holding a job's advisory lock, as an idle-session reaper, a
    pooler or ``pg_terminate_backend`` would while its call runs."""
    with psycopg.connect(db_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        )
        wait_until(
            lambda: advisory_locks(admin) == 0, 5, "the advisory lock to go with its session"
        )


@pytest.mark.parametrize("guarded", [True, False], ids=["start-guard", "negative-control"])
def test_a_second_delivery_waits_while_the_call_may_run_even_without_its_session(
    db_url: str,
    conn: psycopg.Connection[Any],
    runner: JobRunner,
    functions: FunctionServer,
    guarded: bool,
) -> None:
    """The first call's session (and its advisory lock) is gone mid-call; a second
    delivery of the lease (kombu restoring unacked messages after a broker blip)
    must not take the running call's worker for lost."""
    if not guarded:  # only the advisory lock protects: the second delivery fails the job
        runner.call_bound = timedelta(0)
    lease = lock_job(conn, "slow", {"sleep": 2.0})
    first: list[Result] = []
    running = threading.Thread(
        target=lambda: first.append(runner.run(lease, "slow", "call-1", redelivered=False))
    )
    running.start()
    wait_for_call_in_progress(db_url)
    terminate_advisory_holder(db_url)
    second = runner.run(lease, "slow", "call-2", redelivered=True)
    in_flight = running.is_alive()
    running.join(30)
    assert in_flight, "the second delivery must come while the first call runs"
    if guarded:
        assert second is Result.BUSY
        assert first == [Result.COMPLETED]
        assert row(conn, lease.job_id) is None
    else:  # the oracle sees the bug: the running attempt is failed, the job freed to rerun
        assert second is Result.WORKER_LOST
        assert first == [Result.STALE]
    assert len(functions.calls.calls_for(lease.job_id)) == 1
