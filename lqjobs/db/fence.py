"""Every lease-checked statement: the worker's preflight and the fenced writes.

A lease (:class:`lqjobs.lease.Lease`) names one attempt. Each statement here
re-checks, in the same statement as its write, that the row is still held under
that lease; a write for an attempt that is over changes nothing. The per-job
advisory lock keeps two deliveries of one lease from calling the function at once.

That lock is a session's, and a transaction pooler hands each transaction to any
server session: a lock taken in the preflight would stay on a session another
client uses next, and its unlock would run elsewhere. A fence built with
``session_locks=False`` (for ``LQJOBS_DATABASE_POOL_MODE=transaction``) takes none;
the start claim in Redis then keeps a lease's calls apart alone.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from lqjobs.db.base import JOB_COLUMNS, WAKE_CHANNEL, Connection, Statements, translated_errors
from lqjobs.db.queue import Queue
from lqjobs.errors import DatabaseError
from lqjobs.lease import Lease
from lqjobs.models import JobRow

ADVISORY_NAMESPACE = 0x6C716A  # first key of pg_try_advisory_lock(ns, job_id)
# Job ids are bigint; the two-key advisory lock takes ints. Ids 2^31-1 apart share
# a key: a harmless, rare extra wait, never a missed exclusion.
ADVISORY_KEY = "({} %% 2147483647)::int"


class LeaseState(enum.Enum):
    """Where a job stands for one lease, as an asynchronous callback finds it."""

    HELD = "held"  # still locked under the lease: its outcome may be written
    SETTLED = "settled"  # gone, or unlocked at the lease's attempt: recorded already
    STALE = "stale"  # re-leased or released since: a newer attempt owns the job
    EXPIRED = "expired"  # the lease's callback token ran out (database clock)


@dataclass(frozen=True)
class Held:
    """What the preflight found for a lease the row still holds."""

    job: JobRow
    # May go on: this session took the job's advisory lock (or the fence takes none).
    advisory: bool
    db_now: datetime  # the database's clock at the check: every age is judged on it

    @property
    def lease_age(self) -> timedelta:
        return self.db_now - (self.job.locked_at or self.db_now)


def lease_params(lease: Lease) -> dict[str, Any]:
    return {
        "id": lease.job_id,
        "worker": lease.worker_id,
        "attempts": lease.attempts,
        "locked_at": lease.locked_at,
    }


class Fence(Statements):
    """The lease-checked statements of one jobs schema."""

    def __init__(self, schema: str = "app_jobs", *, session_locks: bool = True) -> None:
        super().__init__(schema)
        self._queue = Queue(schema)
        self.session_locks = session_locks

    def preflight(self, conn: Connection, lease: Lease) -> Held | None:
        """None when the row no longer holds ``lease`` (a stale delivery); else the
        row, whether this session took the job's advisory lock (no two overlapping
        calls for one job), and the database's clock, so that no age is ever judged
        on a worker's clock.

        Selected by id alone ``FOR SHARE``, so it waits for a bridge transaction
        that has published but not yet committed, then reads the committed row.

        The row lock gives the statement a transaction id, and so a commit that
        would wait for a WAL flush (an fsync, on every job's critical path). A
        transaction that only locked a row has nothing worth keeping after a
        crash, so this one statement commits without waiting: it sets
        ``synchronous_commit`` off for its own transaction only (``is_local``),
        which needs ``conn`` in autocommit with no transaction open."""
        if not conn.autocommit or conn.info.transaction_status != TransactionStatus.IDLE:
            raise ValueError("preflight needs an autocommit connection outside a transaction")
        with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
            query = self._statement(conn, "preflight", self.preflight_query)
            cur.execute(query, lease_params(lease))
            row = cur.fetchone()
        if row is None:
            return None
        advisory = bool(row.pop("advisory"))
        db_now = row.pop("db_now")
        job = JobRow.model_validate(row)
        return Held(job, advisory, db_now) if lease.held_by(job) else None

    def preflight_query(self) -> sql.Composed:
        lock: sql.Composable = sql.SQL("true")
        if self.session_locks:
            lock = sql.SQL("pg_try_advisory_lock({ns}, {key})").format(
                ns=sql.Literal(ADVISORY_NAMESPACE), key=sql.SQL(ADVISORY_KEY.format("id"))
            )
        return sql.SQL(
            "SELECT {columns}, CASE WHEN locked_by = %(worker)s AND attempts = %(attempts)s "
            "AND locked_at = %(locked_at)s THEN {lock} END "
            "AS advisory, now() AS db_now FROM {schema}.jobs WHERE id = %(id)s "
            "AND set_config('synchronous_commit', 'off', true) IS NOT NULL FOR SHARE"
        ).format(columns=sql.SQL(JOB_COLUMNS), schema=self._schema, lock=lock)

    def release_advisory(self, conn: Connection, job_id: int) -> None:
        if not self.session_locks:
            return
        query = self._statement(conn, "release_advisory", self._release_advisory_query)
        self._void(conn, query, [job_id])

    @staticmethod
    def _release_advisory_query() -> sql.Composed:
        return sql.SQL("SELECT pg_advisory_unlock({ns}, {key})").format(
            ns=sql.Literal(ADVISORY_NAMESPACE), key=sql.SQL(ADVISORY_KEY.format("%s::bigint"))
        )

    def fenced_complete(
        self, conn: Connection, lease: Lease, *, release_advisory: bool = False
    ) -> bool:
        """complete_job, only while the row is held under ``lease``. Settling a job
        of a serial queue wakes the bridges: the queue's next job is ready now.
        ``release_advisory``: also release this session's advisory lock on the job."""

        def build() -> sql.Composed:
            query = self._lease_cte() + sql.SQL(
                ", done AS (SELECT lease.queue_name FROM lease, "
                "LATERAL {schema}.complete_job(%(worker)s, lease.id) c) "
                "SELECT count(*) FROM done "
                "WHERE queue_name IS NULL OR pg_notify({channel}, '') IS NOT NULL"
            ).format(schema=self._schema, channel=sql.Literal(WAKE_CHANNEL))
            return self._with_release(query, release_advisory)

        query = self._statement(conn, f"fenced_complete:{release_advisory}", build)
        return self._count(conn, query, lease_params(lease)) > 0

    def fenced_fail(
        self, conn: Connection, lease: Lease, error_message: str, *, release_advisory: bool = False
    ) -> bool:
        """fail_job, only while the row is held under ``lease``; the SQL backs it off.
        Wakes the bridges so that the retry (and a serial queue's next job) runs on time.
        ``release_advisory``: also release this session's advisory lock on the job."""

        def build() -> sql.Composed:
            query = self._lease_cte() + sql.SQL(
                " SELECT count(*) FROM lease, LATERAL {schema}.fail_job(%(worker)s, lease.id, "
                "%(message)s) f WHERE pg_notify({channel}, '') IS NOT NULL"
            ).format(schema=self._schema, channel=sql.Literal(WAKE_CHANNEL))
            return self._with_release(query, release_advisory)

        query = self._statement(conn, f"fenced_fail:{release_advisory}", build)
        params = lease_params(lease) | {"message": error_message or "unknown error"}
        return self._count(conn, query, params) > 0

    def fenced_fail_permanently(self, conn: Connection, lease: Lease, error_message: str) -> bool:
        """fail_job then permanently_fail_jobs, in one transaction, under ``lease``."""
        with translated_errors(), conn.transaction():
            if not self.fenced_fail(conn, lease, error_message):
                return False
            message = error_message or "unknown error"
            self._queue.permanently_fail_jobs(conn, [lease.job_id], message)
            return True

    def fenced_give_back(
        self, conn: Connection, lease: Lease, error_message: str, *, delay: float = 0.0
    ) -> bool:
        """Hand back a lease whose call never ran: ``fail_job`` (it unlocks, and
        ``last_error`` says why) then ``reschedule_jobs`` with the attempt returned and
        ``run_at`` ``delay`` seconds from now (database clock), in one transaction under
        ``lease``; False if it is not held."""
        with translated_errors(), conn.transaction():
            if not self.fenced_fail(conn, lease, error_message):
                return False
            query = self._statement(conn, "give_back", self._give_back_query)
            self._void(conn, query, [[lease.job_id], delay, max(lease.attempts - 1, 0)])
            return True

    def _give_back_query(self) -> sql.Composed:
        args = [
            sql.SQL("%s::bigint[]"),
            sql.SQL("now() + make_interval(secs => %s::float8)"),
            sql.SQL("NULL::int"),
        ]
        return self._call("reschedule_jobs", "1", [*args, sql.SQL("%s::int"), sql.SQL("NULL::int")])

    def lock_lease_state(self, conn: Connection, lease: Lease, expires_at: datetime) -> LeaseState:
        """Where the job stands for ``lease`` (see :class:`LeaseState`), its row locked
        FOR UPDATE until the caller's transaction ends: a concurrent duplicate waits,
        then sees the outcome. ``expires_at`` is compared with the database's now()."""
        query = sql.SQL(
            "WITH job AS (SELECT locked_by, attempts, locked_at FROM {schema}.jobs "
            "WHERE id = %(id)s FOR UPDATE) "
            "SELECT %(expires)s::timestamptz > now(), job.locked_by, job.attempts, job.locked_at "
            "FROM (SELECT) AS one LEFT JOIN job ON true"
        ).format(schema=self._schema)
        with translated_errors():
            row = conn.execute(query, {"id": lease.job_id, "expires": expires_at}).fetchone()
        if row is None:  # the LEFT JOIN always yields one row
            raise DatabaseError("lease state query returned no row")
        fresh, locked_by, attempts, locked_at = row
        if not fresh:
            return LeaseState.EXPIRED
        if attempts is None:  # no such row: completed (or removed) already
            return LeaseState.SETTLED
        if locked_by is None:  # unlocked at this very attempt: failed by this lease already
            return LeaseState.SETTLED if attempts == lease.attempts else LeaseState.STALE
        held = lease == Lease(lease.job_id, locked_by, attempts, locked_at)
        return LeaseState.HELD if held else LeaseState.STALE

    def _lease_cte(self) -> sql.Composed:
        # Filtering on the whole lease with FOR UPDATE: a concurrent re-lease makes
        # Postgres re-check the row after the wait, and the write is skipped.
        return sql.SQL(
            "WITH lease AS (SELECT id, queue_name FROM {schema}.jobs WHERE id = %(id)s "
            "AND locked_by = %(worker)s AND attempts = %(attempts)s "
            "AND locked_at = %(locked_at)s FOR UPDATE)"
        ).format(schema=self._schema)

    @staticmethod
    def _with_release(query: sql.Composed, release_advisory: bool) -> sql.Composed:
        """``query`` (one row, one count) and, when asked, the job's advisory lock
        released in the same statement, after the count (so after the write)."""
        if not release_advisory:
            return query
        # The unlock is projected from the counted row: evaluated once that row exists.
        return sql.SQL(
            "SELECT s.settled, pg_advisory_unlock({ns}, {key}) FROM ({query}) AS s(settled)"
        ).format(
            query=query,
            ns=sql.Literal(ADVISORY_NAMESPACE),
            key=sql.SQL(ADVISORY_KEY.format("%(id)s::bigint")),
        )
