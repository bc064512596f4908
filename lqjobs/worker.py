"""The job runner: what the Celery task (:mod:`lqjobs.celery`) does with one delivery.

Order of events for one delivery:
1. preflight: the row must still be held under the message's lease (else the
   delivery is stale: acknowledged and dropped, the row untouched), and this
   worker must win the job's advisory lock (else another delivery of the same
   lease is running: try again later, never overlap);
2. every delivery claims the start of its lease's call in Redis (``SET NX``, with
   the start time on the database's clock). A delivery whose lease was started
   already waits while that call may still be running (the advisory lock goes
   with its session, so it alone cannot tell), then becomes a fenced
   ``fail_job`` ("worker lost"), not a second call; when that call was deferred
   to an asynchronous callback it is dropped without a write;
3. a delivery that comes too late to start its call inside the lease (past the
   start window, on the database's clock) gives the lease back unrun, its
   attempt returned;
4. invoke the executor, then record the outcome with a fenced ``complete_job`` /
   ``fail_job``. Celery retries are never used for job failures: the SQL
   back-off is the only retry policy.

Any database error before the call means "deliver again later"; after the call,
only the bookkeeping is retried, on any database error, until the lease expires.
A session that failed is closed, never handed out again.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from psycopg_pool import ConnectionPool, PoolTimeout

from lqjobs.broker_state import Claim, DeferredDeadlines, StartedMarks, is_redis
from lqjobs.callback import tokens
from lqjobs.db import Connection, session_options
from lqjobs.db.fence import Fence, Held
from lqjobs.errors import DatabaseError
from lqjobs.executors import (
    Deferred,
    Done,
    ExecutorRouter,
    Failed,
    FunctionClient,
    Invocation,
    Outcome,
    build_router,
    make_http_client,
)
from lqjobs.lease import Lease
from lqjobs.logs import escaped
from lqjobs.metrics import MetricsServer, Sample, counter_samples, serve
from lqjobs.models import JobRow
from lqjobs.settings import Settings

log = logging.getLogger(__name__)
RECORDING_MARGIN = 5.0  # seconds a "writing the outcome" mark outlives the next retry
# A call that never ran is retried after 1, 2, 4, ... seconds, at most this many, or
# after the platform's Retry-After, at most RETRY_AFTER_CAP (docs/design.md, F25).
PLATFORM_BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 300.0


class Result(enum.Enum):
    COMPLETED = "completed"
    FAILED = "failed"
    FAILED_PERMANENTLY = "failed_permanently"
    DEFERRED = "deferred"
    STALE = "stale"  # the lease is gone: dropped, untouched
    BUSY = "busy"  # another delivery of this lease holds the job: try later
    UNAVAILABLE = "unavailable"  # a database error before the call: try later
    GIVEN_BACK = "given_back"  # delivered too late to start the call: lease returned unrun
    WORKER_LOST = "worker_lost"  # delivered again after its call had started: failed, not re-run
    DUPLICATE = "duplicate"  # delivered again while its call awaits a callback: dropped, untouched
    NEVER_RAN = "never_ran"  # the call never reached the function: retried, its attempt returned
    UNRECORDED = "unrecorded"  # the database stayed away until the lease expired


class JobRunner:
    """Everything one worker process needs to run jobs; built once per process."""

    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool[Connection],
        router: ExecutorRouter,
        marks: StartedMarks,
        deadlines: DeferredDeadlines | None = None,
    ) -> None:
        self.settings = settings
        # Through a transaction pooler no session is ours across statements: no
        # advisory locks (lqjobs/db/fence.py), the start claim alone keeps calls apart.
        self.fence = Fence(
            settings.jobs_schema, session_locks=settings.database_pool_mode == "session"
        )
        self.pool = pool
        self.router = router
        self.marks = marks
        self.deadlines = deadlines
        self.job_expiry = timedelta(seconds=settings.job_expiry)
        self.start_window = timedelta(seconds=settings.start_window_seconds())
        self.call_bound = timedelta(seconds=settings.call_bound_seconds())
        self.results: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self.metrics_server: MetricsServer | None = None
        self.http_client: FunctionClient | None = None  # owned here when build_runner made it
        self.callback_keys = (
            tokens.CallbackKeys.parse(settings.callback_keys.get_secret_value())
            if settings.callback_keys
            else None
        )

    def run(self, lease: Lease, task: str, call_id: str, redelivered: bool) -> Result:
        result = self._run_pooled(lease, task, call_id, redelivered)
        with self._counter_lock:
            self.results[result.value] += 1
        return result

    def metrics(self) -> list[Sample]:
        with self._counter_lock:
            counts = dict(self.results)
        return counter_samples(
            "task_results_total",
            "Deliveries by outcome (stale = dropped without touching the row).",
            counts,
        )

    def _run_pooled(self, lease: Lease, task: str, call_id: str, redelivered: bool) -> Result:
        try:
            with self.pool.connection() as conn:
                try:
                    return self._run(conn, lease, task, call_id, redelivered)
                except DatabaseError:
                    conn.close()  # reaped, read-only or broken: never handed out again
                    raise
        except (DatabaseError, PoolTimeout) as exc:
            # Only reachable before the call (afterwards _record retries it until the
            # lease expires): nothing ran, so the delivery comes back later instead of
            # being acked and lost.
            log.warning(
                "database error before the call; retrying the delivery",
                extra=_fields(lease, task, "db_unavailable") | _error_fields(exc),
            )
            return Result.UNAVAILABLE

    def _run(
        self, conn: Connection, lease: Lease, task: str, call_id: str, redelivered: bool
    ) -> Result:
        held = self.fence.preflight(conn, lease)
        if held is None:
            log.info("stale delivery dropped", extra=_fields(lease, task, "stale_dropped"))
            return Result.STALE
        if not held.advisory:
            return Result.BUSY
        released = False
        try:
            result, released = self._run_locked(conn, held, lease, call_id, redelivered)
            return result
        finally:
            if not released:
                self._unlock(conn, lease)

    def _run_locked(
        self, conn: Connection, held: Held, lease: Lease, call_id: str, redelivered: bool
    ) -> tuple[Result, bool]:
        """The delivery's result, and whether the advisory lock was released already
        (by the statement that recorded the outcome)."""
        claim, started_at = self.marks.claim(lease, held.db_now)
        if claim is Claim.DEFERRED:
            # The call was made and handed to an asynchronous callback (or its deadline
            # reaper): this delivery is a duplicate. Acknowledged, the row untouched.
            log.info(
                "duplicate delivery of a deferred call dropped",
                extra=_fields(lease, held.job.task_identifier, "deferred_duplicate"),
            )
            return Result.DUPLICATE, False
        if claim is Claim.RECORDING:  # its worker is alive, writing the outcome
            log.info(
                "delivered again while its outcome is being written; retrying later",
                extra=_fields(lease, held.job.task_identifier, "outcome_being_written"),
            )
            return Result.BUSY, False
        if claim is Claim.STARTED:
            return self._started_before(conn, held, lease, started_at, redelivered)
        if held.lease_age >= self.start_window:
            return self._give_back(conn, held, lease), False
        outcome = self._invoke(held.job, lease, call_id)
        return self._record(conn, lease, outcome)

    def _started_before(
        self,
        conn: Connection,
        held: Held,
        lease: Lease,
        started_at: datetime | None,
        redelivered: bool,
    ) -> tuple[Result, bool]:
        """A second delivery of a lease whose call was started: while that call may
        still run (its advisory lock may have gone with a reaped session), come back
        later; after that, its worker was lost: a fenced failure, never a second call."""
        task = held.job.task_identifier
        if started_at is not None and held.db_now < started_at + self.call_bound:
            log.info(
                "delivered again while its call may still run; retrying later",
                extra=_fields(lease, task, "call_may_be_running"),
            )
            return Result.BUSY, False
        log.warning(
            "delivered again after its call had started: worker lost",
            extra=_fields(lease, task, "worker_lost") | {"redelivered": redelivered},
        )
        recorded, released = self._record(conn, lease, Failed("worker lost during attempt"))
        return (Result.WORKER_LOST if recorded is not Result.UNRECORDED else recorded), released

    def _give_back(self, conn: Connection, held: Held, lease: Lease) -> Result:
        """Too late to start a call that must end inside the lease: hand it back."""
        age = held.lease_age.total_seconds()
        window = self.start_window.total_seconds()
        message = (
            f"not started: delivered {age:.0f}s after the lock, past the {window:g}s "
            "start window; lease given back"
        )
        if not self.fence.fenced_give_back(conn, lease, message):
            return Result.STALE
        log.warning(
            "delivered too late to start its call: lease given back",
            extra=_fields(lease, held.job.task_identifier, "lease_given_back")
            | {"lease_age_seconds": round(age, 1)},
        )
        return Result.GIVEN_BACK

    def _invoke(self, job: JobRow, lease: Lease, call_id: str) -> Outcome:
        invocation = Invocation(
            job_id=job.id,
            task_identifier=job.task_identifier,
            database_id=str(job.database_id),
            worker_id=lease.worker_id,
            attempt=lease.attempts,
            payload=job.payload,
            call_id=call_id,
            callback_url=self._callback_url(lease),
        )
        try:
            return self.router.for_task(job.task_identifier, job.id).invoke(invocation)
        except SoftTimeLimitExceeded:
            return Failed(
                f"timeout after {self.settings.task_soft_time_limit:g}s (soft time limit)"
            )

    def _callback_url(self, lease: Lease) -> str | None:
        base = self.settings.internal_jobs_callback_url
        if base is None:
            return None
        if self.callback_keys is None:
            return base
        return tokens.callback_url(base, tokens.sign(self.callback_keys, lease, self.job_expiry))

    def _record(self, conn: Connection, lease: Lease, outcome: Outcome) -> tuple[Result, bool]:
        """Write the outcome on the session that holds the advisory lock, releasing the
        lock in the same statement when it can; the result, and whether it did."""
        try:
            return self._write(conn, lease, outcome, release=self.fence.session_locks)
        except DatabaseError as exc:
            # Reaped, read-only after a failover, a serialization failure...: close the
            # session (its advisory lock goes with it) and retry on fresh ones.
            conn.close()
            log.warning(
                "outcome not written; retrying the bookkeeping",
                extra=_fields(lease, "", "record_retry") | _error_fields(exc),
            )
            return self._record_with_retries(lease, outcome), True

    def _record_with_retries(self, lease: Lease, outcome: Outcome) -> Result:
        """The call is done; only its bookkeeping is retried, until the lease expires."""
        deadline = time.monotonic() + self.settings.job_expiry
        delay = 0.2
        while time.monotonic() + delay < deadline:
            self.marks.recording(lease, ttl=delay + RECORDING_MARGIN)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                with self.pool.connection(timeout=5) as conn:
                    try:
                        return self._write(conn, lease, outcome, release=False)[0]
                    except DatabaseError:
                        conn.close()
                        raise
            except (DatabaseError, PoolTimeout):
                continue
        log.error(
            "outcome not recorded: database errors until lease expiry",
            extra=_fields(lease, "", "unrecorded"),
        )
        return Result.UNRECORDED

    def _write(
        self, conn: Connection, lease: Lease, outcome: Outcome, release: bool
    ) -> tuple[Result, bool]:
        """``release``: this session holds the job's advisory lock; a completion or a
        retryable failure releases it in the statement that records the outcome (one
        round trip fewer). The row is locked by then, so a delivery that takes the
        advisory lock next waits in its FOR SHARE preflight and finds the outcome."""
        released = False
        if isinstance(outcome, Done):
            settled = self.fence.fenced_complete(conn, lease, release_advisory=release)
            released = release
            result = Result.COMPLETED
        elif isinstance(outcome, Deferred):
            if self.deadlines is not None:  # the callback service fails it if no callback comes
                self.deadlines.record(lease, self.settings.callback_deadline_seconds())
            return Result.DEFERRED, False
        elif outcome.permanent:
            settled = self.fence.fenced_fail_permanently(conn, lease, outcome.message)
            result = Result.FAILED_PERMANENTLY
        elif outcome.never_ran and (delay := self._platform_delay(lease, outcome)) is not None:
            message = f"never ran, retrying in {delay:g}s: {outcome.message}"
            settled = self.fence.fenced_give_back(conn, lease, message, delay=delay)
            result = Result.NEVER_RAN
            if settled:
                log.warning(
                    "the call never reached the function; retrying without spending an attempt",
                    extra=_fields(lease, "", "never_ran_retry") | {"retry_in_seconds": delay},
                )
        else:
            settled = self.fence.fenced_fail(conn, lease, outcome.message, release_advisory=release)
            released = release
            result = Result.FAILED
        if not settled:
            log.info(
                "outcome dropped: lease changed during the call",
                extra=_fields(lease, "", "stale_outcome"),
            )
            return Result.STALE, released
        return result, released

    def _platform_delay(self, lease: Lease, outcome: Failed) -> float | None:
        """Seconds until a call that never ran is tried again with its attempt returned,
        or None once the job has never run ``LQJOBS_NEVER_RAN_RETRIES`` times in a row
        (or without Redis to count them): then it costs an attempt, as any failure."""
        count = self.marks.count_never_ran(lease.job_id)
        if count is None or count > self.settings.never_ran_retries:
            return None
        if outcome.retry_after is not None:
            return min(outcome.retry_after, RETRY_AFTER_CAP)
        return min(2.0 ** (count - 1), PLATFORM_BACKOFF_CAP)

    def close(self) -> None:
        self.pool.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.http_client is not None:
            self.http_client.close()
        if self.marks.client is not None:
            self.marks.client.close()

    def _unlock(self, conn: Connection, lease: Lease) -> None:
        with contextlib.suppress(DatabaseError):  # a broken session dropped the lock already
            self.fence.release_advisory(conn, lease.job_id)


def _fields(lease: Lease, task: str, action: str) -> dict[str, Any]:
    return {
        "action": action,
        "job_id": lease.job_id,
        "task": escaped(task),
        "worker_id": lease.worker_id,
        "attempt": lease.attempts,
    }


def _error_fields(exc: Exception) -> dict[str, Any]:
    return {"error": type(exc).__name__, "sqlstate": getattr(exc, "sqlstate", None)}


def build_runner(settings: Settings) -> JobRunner:
    pool: ConnectionPool[Connection] = ConnectionPool(
        settings.conninfo(),
        min_size=1,
        max_size=settings.db_pool_size,
        kwargs={"autocommit": True, **session_options(settings.database_pool_mode)},
        # A session the server closed while it sat in the pool (an idle-session
        # timeout, a pooler, a failover) is replaced before a job gets it.
        check=ConnectionPool.check_connection,
        open=True,
        name="lqjobs-worker",
    )
    client = make_http_client(settings)
    broker = settings.broker_url.get_secret_value()
    marks_client = redis.Redis.from_url(broker) if is_redis(broker) else None
    marks = StartedMarks(marks_client, timedelta(seconds=settings.job_expiry))
    deadlines = (
        DeferredDeadlines(marks_client, marks.deferred_key) if marks_client is not None else None
    )
    runner = JobRunner(settings, pool, build_router(settings, client), marks, deadlines)
    runner.http_client = client
    try:  # one endpoint per process: a second prefork child on the same port goes without
        runner.metrics_server = serve(settings.metrics_port, runner.metrics)
    except OSError:
        log.warning(
            "metrics port in use; this worker process serves no metrics",
            extra={"action": "metrics_port_in_use"},
        )
    return runner
