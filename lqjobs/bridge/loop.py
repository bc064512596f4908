"""The bridge: the unchanged LISTEN / poll / lock loop, handing jobs to Celery.

Lock -> publish -> commit: ``get_job`` runs in an open transaction, the messages
are published, and only then does the transaction commit. A crash or a broker
error before the commit rolls the lock back, so the job is untouched; a message
whose lock never committed is dropped by the task's lease check.

Wake-ups: ``NOTIFY "jobs:insert"`` for new jobs, ``lqjobs:wake`` after a task's
``fail_job`` or a settled job of a serial queue, a timer for the earliest future
``run_at`` or expiring lock (no NOTIFY exists for those), and a slow safety poll.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from datetime import timedelta

from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from lqjobs import db
from lqjobs.bridge import metrics as bridge_metrics
from lqjobs.bridge import reconcile
from lqjobs.bridge.publisher import Publisher
from lqjobs.db import Connection
from lqjobs.db.queue import LockedBatch, Queue, UnreadableRow
from lqjobs.db.reads import Reads
from lqjobs.errors import ConfigurationError, DatabaseError
from lqjobs.listening import ServiceLoop, wake_source
from lqjobs.logs import escaped
from lqjobs.metrics import Sample
from lqjobs.models import JobRow
from lqjobs.settings import Settings

log = logging.getLogger(__name__)
# What a broker outage raises; anything else is a bug and stops the bridge loudly.
BROKER_ERRORS = (KombuError, RedisError, OSError)
HOST_PART = re.compile(r"[A-Za-z0-9._-]{1,40}")
# Seconds between in-flight checks while at the cap. The queue then holds the cap
# minus the workers' slots, so nobody waits on a recheck; a longer one tops up more
# jobs per pass (20 ms: 0.73-0.80 ms of bridge CPU per end-to-end job, 50 ms: 0.46-0.51).
SATURATED_RECHECK = 0.05


ABANDONED_MESSAGE = "lease expired on the last attempt with no outcome recorded"
# A bridge's sessions carry this application_name, so `lqjobs jobs` can tell a lock
# whose holder is connected from one whose holder is gone.
APPLICATION_NAME_PREFIX = "lqjobs-bridge:"
# The ids new_worker_id makes: the only holders `lqjobs jobs` judges gone by their sessions.
WORKER_ID_PATTERN = r"^bridge-[A-Za-z0-9._-]{1,40}-[0-9a-f]{12}$"


def sweep_interval(settings: Settings) -> float:
    """Seconds between abandoned-lease sweeps: a few per lease expiry, at most a minute."""
    return min(60.0, max(1.0, settings.job_expiry / 4))


def new_worker_id(hostname: str) -> str:
    """A worker id for this bridge incarnation: never reused, so never released
    while its messages may still be live in Celery."""
    host = hostname[:40]
    if not HOST_PART.fullmatch(host):
        raise ConfigurationError(
            "invalid HOSTNAME: only letters, digits, '.', '_' and '-' may form a worker id"
        )
    return f"bridge-{host}-{secrets.token_hex(6)}"


def application_name(worker_id: str) -> str:
    return (APPLICATION_NAME_PREFIX + worker_id)[:63]  # Postgres keeps 63 bytes


class Bridge:
    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        *,
        batch_size: int = 50,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.batch_size = batch_size
        self.lock_connections = settings.lock_connections
        self.worker_id = worker_id or new_worker_id(settings.hostname)
        self.queue = Queue(settings.jobs_schema)
        self.reads = Reads(settings.jobs_schema)
        self.task_filter = settings.task_filter()
        self.job_expiry = timedelta(seconds=settings.job_expiry)
        self.counters: Counter[str] = Counter()
        self._counters_lock = threading.Lock()  # lock connections count from their threads
        self._reserved = 0  # in-flight room reserved by transactions locking right now
        self._reserved_lock = threading.Lock()
        self.loop = ServiceLoop(
            log,
            [
                (DatabaseError, "database unavailable; retrying"),
                (BROKER_ERRORS, "broker unavailable; retrying"),
            ],
            action="bridge_backoff",
            worker_id=self.worker_id,
        )
        self.listener = wake_source(
            None
            if settings.listens_through_pooler()
            else lambda: db.connect(
                self.settings.listen_conninfo(),
                autocommit=True,
                application_name=application_name(self.worker_id),
            ),
            (db.INSERT_CHANNEL, db.WAKE_CHANNEL),
            self.loop.stopping,
        )
        self._saturated = False
        self._conn: Connection | None = None
        # Bursts: the extra lock connections, each drained from a thread of its own.
        self._extra_conns: list[Connection | None] = [None] * (self.lock_connections - 1)
        self._lockers = (
            ThreadPoolExecutor(len(self._extra_conns), thread_name_prefix="lqjobs-locker")
            if self._extra_conns
            else None
        )
        self._next_sweep = 0.0  # monotonic time of the next abandoned-lease sweep
        # F4: re-publishes this bridge's leases after a Redis restart (lqjobs/bridge/reconcile.py).
        self.reconciler = reconcile.build(
            settings, self.reads, self.worker_id, publisher, self.counters, batch_size
        )

    # -- one pass -------------------------------------------------------------

    def run_once(self) -> int:
        """Lock and hand off jobs until none is ready or the in-flight cap is reached.
        A burst (a first batch that came back full) is drained over every lock
        connection at once."""
        self._saturated = False
        conn = self._work_connection()
        handed, more = self._dispatch_batch(conn)
        if not more:
            return handed
        if self._lockers is None:
            return handed + self._lock_until_done(conn)
        extra = [self._extra_connection(i) for i in range(len(self._extra_conns))]
        running = [self._lockers.submit(self._lock_until_done, other) for other in extra]
        try:
            handed += self._lock_until_done(conn)
        finally:
            wait(running)  # no locker is left inside a transaction, whatever happened
        return handed + sum(future.result() for future in running)  # re-raises theirs

    def _lock_until_done(self, conn: Connection) -> int:
        handed, more = 0, True
        while more and not self.loop.stopping.is_set():
            locked, more = self._dispatch_batch(conn)
            handed += locked
        return handed

    def _dispatch_batch(self, conn: Connection) -> tuple[int, bool]:
        """Jobs locked and handed off in one transaction, and whether there may be
        more to lock now: the batch came back full, below the in-flight cap."""
        with self._reservation() as reserved_elsewhere, conn.transaction():
            batch = self._lock_jobs(conn, self.settings.max_in_flight - reserved_elsewhere)
            for unreadable in batch.unreadable:
                self._reject_unreadable(conn, unreadable)
            sendable = [job for job in batch.jobs if not self._reject_oversized(conn, job)]
            if sendable:
                self.publisher.publish(sendable)
        locked = batch.locked
        self._count(locked=locked, dispatched=len(sendable))
        if locked >= batch.room:  # at the in-flight cap (or over it: the cap was lowered)
            self._saturated = True
            return locked, False
        return locked, locked == min(self.batch_size, batch.room)

    @contextlib.contextmanager
    def _reservation(self) -> Iterator[int]:
        """Reserve a batch of in-flight room while one transaction locks; yields the
        room other lock connections hold reserved now. A statement counts the jobs
        committed before it began, and a reservation ends only after its commit, so
        every batch is seen either in the count or in the reservations: the lock
        connections together never exceed the cap."""
        with self._reserved_lock:
            elsewhere = self._reserved
            self._reserved += self.batch_size
        try:
            yield elsewhere
        finally:
            with self._reserved_lock:
                self._reserved -= self.batch_size

    def _lock_jobs(self, conn: Connection, cap: int) -> LockedBatch:
        # Counts the jobs this bridge holds, then makes up to min(batch size, room left
        # under ``cap``) get_job calls, stopping at the first that finds nothing: one
        # statement, one round trip, inside the caller's transaction.
        return self.queue.get_jobs_under_cap(
            conn, self.worker_id, self.task_filter, self.job_expiry, self.batch_size, cap
        )

    def _count(self, **increments: int) -> None:
        with self._counters_lock:
            self.counters.update(increments)

    def _reject_oversized(self, conn: Connection, job: JobRow) -> bool:
        size = len(job.payload.encode())
        if size <= self.settings.max_payload_bytes:
            return False
        message = f"payload too large: {size} bytes (limit {self.settings.max_payload_bytes})"
        self._park(conn, job.id, message)
        self._count(oversized=1)
        log.warning(
            "payload too large: failed permanently",
            extra={
                "action": "payload_too_large",
                "job_id": job.id,
                "task": escaped(job.task_identifier),
                "database_id": str(job.database_id),
                "worker_id": self.worker_id,
                "bytes": size,
            },
        )
        return True

    def _reject_unreadable(self, conn: Connection, row: UnreadableRow) -> None:
        """A row lqjobs cannot read is parked (failed permanently) and reported; the
        jobs behind it go on."""
        self._park(conn, row.job_id, f"unreadable job row: {row.reason}")
        self._count(unreadable=1)
        fields = {"action": "job_row_unreadable", "job_id": row.job_id, "reason": row.reason}
        log.error("job row unreadable: failed permanently", extra=fields)

    def _park(self, conn: Connection, job_id: int, message: str) -> None:
        """Fail a job this bridge holds for good, inside the locking transaction."""
        self.queue.fail_job_permanently(conn, self.worker_id, job_id, message)

    # -- the loop ---------------------------------------------------------------

    def run_forever(self) -> None:
        log.info("bridge started", extra={"action": "bridge_started", "worker_id": self.worker_id})
        self.loop.run(self._pass, idle=self._idle, on_failure=self._on_failure)
        self._close()
        if self._lockers is not None:
            self._lockers.shutdown()
        self.reconciler.close()
        log.info(
            "bridge stopped",
            extra={"action": "bridge_stopped", "worker_id": self.worker_id, **dict(self.counters)},
        )

    def stop(self) -> None:
        """Stop locking; the hand-off in progress finishes. Safe from any thread or
        a signal handler, any number of times."""
        self.loop.stop()

    @property
    def failures(self) -> int:
        """Consecutive failed passes (database or broker); 0 when healthy."""
        return self.loop.failures

    def _pass(self) -> None:
        self.listener.open()  # LISTEN first: a new listener's pass misses no insert
        self.reconciler.check(self._work_connection())
        self._sweep_abandoned()
        self.run_once()

    def _sweep_abandoned(self) -> None:
        """Every so often, fail (visibly) the jobs whose lease expired on their last
        attempt: no message or worker will settle them, and get_job never re-takes a
        job whose attempts are used up. Any bridge may do it for any holder."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        failed = self.queue.fail_abandoned_leases(
            self._work_connection(), self.job_expiry, ABANDONED_MESSAGE
        )
        self._next_sweep = now + sweep_interval(self.settings)
        if failed:
            self._count(abandoned=len(failed))
            log.warning(
                "leases expired on their last attempt: failed",
                extra={
                    "action": "abandoned_leases_failed",
                    "worker_id": self.worker_id,
                    "count": len(failed),
                    "job_ids": failed[:20],
                },
            )

    def _idle(self) -> None:
        """Sleep until a notification, the next wake-up, or stop()."""
        self.listener.wait(self.reconciler.cap_wait(self._next_wake()), ping_on_timeout=True)

    def _on_failure(self, exc: Exception) -> None:
        # Then the jittered back-off; no get_job (so no attempt burned) until it passes.
        self._count(failures=1)
        self._close()
        self.reconciler.check_soon()  # the broker may have restarted meanwhile

    def _next_wake(self) -> float:
        if self._saturated:
            return SATURATED_RECHECK
        due = self.reads.seconds_until_next_job(
            self._work_connection(), self.task_filter, self.job_expiry
        )
        poll = self.settings.poll_seconds()
        return poll if due is None else min(poll, due + 0.001)

    # -- metrics ----------------------------------------------------------------

    def metrics(self) -> list[Sample]:
        """Counters of this incarnation and queue gauges read from Postgres (on a
        connection of its own: scrapes come from another thread)."""
        with self._counters_lock:
            counts = dict(self.counters)
        with db.connect(
            self.settings.conninfo(), autocommit=True, pool_mode=self.settings.database_pool_mode
        ) as conn:
            in_flight = self.reads.count_locked_by(conn, self.worker_id)
            gauges = self.reads.queue_gauges(conn, self.task_filter, self.job_expiry)
        return bridge_metrics.samples(self.worker_id, counts, in_flight, gauges)

    # -- connections ------------------------------------------------------------

    def _work_connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._lock_connection()
        return self._conn

    def _extra_connection(self, index: int) -> Connection:
        conn = self._extra_conns[index]
        if conn is None or conn.closed:
            conn = self._extra_conns[index] = self._lock_connection()
        return conn

    def _lock_connection(self) -> Connection:
        """A session that announces this incarnation's worker id (pg_stat_activity)."""
        return db.connect(
            self.settings.conninfo(),
            autocommit=True,
            application_name=application_name(self.worker_id),
            pool_mode=self.settings.database_pool_mode,
        )

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self.listener.close()
        for conn in self._extra_conns:
            if conn is not None:
                conn.close()
        self._conn = None
        self._extra_conns = [None] * len(self._extra_conns)
