"""The typed DB boundary: the only module in lqjobs that holds SQL.

One method per ``app_jobs`` function, named after it, returning pydantic rows.
The all-NULL row that a "nothing found" composite result shows as becomes
``None`` here and nowhere else. ``psycopg.Error`` is translated into
:mod:`lqjobs.errors` here and nowhere else. Methods never commit: the caller
owns the transaction (the bridge locks, publishes, then commits).
"""

from __future__ import annotations

import contextlib
import enum
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from pydantic import BaseModel

from lqjobs.errors import (
    DatabaseError,
    DatabaseUnavailable,
    InvalidWorkerId,
    SchemaMissing,
)
from lqjobs.lease import Lease
from lqjobs.models import (
    ALREADY_SCHEDULED,
    AlreadyScheduled,
    JobRow,
    ScheduledJobRow,
    ScheduledJobStatus,
    TaskStatus,
)

Connection = psycopg.Connection[Any]
ADVISORY_NAMESPACE = 0x6C716A  # first key of pg_try_advisory_lock(ns, job_id)
# Job ids are bigint; the two-key advisory lock takes ints. Ids 2^31-1 apart share
# a key: a harmless, rare extra wait, never a missed exclusion.
ADVISORY_KEY = "({} %% 2147483647)::int"
# lqjobs' own channel: "a job may be runnable now" after a fail_job (back-off) or
# after settling a job of a serial queue (its next job). NOTIFY is only sent on
# insert by the SQL, and nothing else would wake a bridge before its safety poll.
WAKE_CHANNEL = "lqjobs:wake"
INSERT_CHANNEL = "jobs:insert"
SCHEDULED_INSERT_CHANNEL = "scheduled_jobs:insert"
RowT = TypeVar("RowT", bound=BaseModel)

# payload travels as JSON text: never re-encoded on its way to a function.
JOB_COLUMNS = (
    "id, database_id, queue_name, task_identifier, payload::text AS payload, priority, run_at, "
    "attempts, max_attempts, key, last_error, locked_at, locked_by, created_at, updated_at"
)
SCHEDULED_JOB_COLUMNS = (
    "id, database_id, queue_name, task_identifier, payload::text AS payload, priority, "
    "max_attempts, key, locked_at, locked_by, schedule_info::text AS schedule_info, "
    "last_scheduled, last_scheduled_id"
)
_MISSING_SCHEMA_STATES = {"3F000", "42883", "42P01"}  # no schema / function / table


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """Turn psycopg errors into lqjobs errors. Only the primary message is kept:
    DETAIL lines can quote row values, and rows hold payloads."""
    try:
        yield
    except psycopg.Error as exc:
        state = exc.sqlstate
        message = (exc.diag.message_primary if exc.diag else None) or type(exc).__name__
        if message == "INVALID_WORKER_ID":
            raise InvalidWorkerId() from None
        if state in _MISSING_SCHEMA_STATES:
            raise SchemaMissing(f"{SchemaMissing.__doc__} ({message})", state) from None
        if _unavailable(exc):
            raise DatabaseUnavailable(f"database unavailable: {message}") from None
        raise DatabaseError(message, state) from None


def _unavailable(exc: psycopg.Error) -> bool:
    """Connection lost or refused, or the server shutting down / terminating us
    (class 08, 57P01-57P03): worth waiting for, unlike a failing statement."""
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith("08") or state in {"57P01", "57P02", "57P03"}


def connect(
    conninfo: str, *, autocommit: bool = False, application_name: str | None = None
) -> Connection:
    """``application_name`` (shown in pg_stat_activity) overrides the conninfo's when given."""
    with translated_errors():
        return psycopg.connect(
            conninfo,
            autocommit=autocommit,
            connect_timeout=10,
            application_name=application_name,
        )


def listen(conn: Connection, channel: str) -> None:
    with translated_errors():
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))


def walk_job_index(conn: Connection) -> None:
    """Make this session's ``get_job`` walk the (priority, run_at, id) index.

    ``get_job`` takes the first runnable job: ``ORDER BY priority, run_at, id
    LIMIT 1``. Its cached generic plan estimates a single matching row (the OR
    conditions look very selective), so the planner fetches every due job and
    sorts them, on every call: each ``get_job`` costs time in proportion to the
    jobs waiting, which measured about 1 ms per call with 2,000 waiting. Walking
    the index in order stops at the first free job instead (about 0.07 ms). With
    sorting disabled for the session the planner takes that path; the SQL itself is
    unchanged. Meant for a connection that runs get_job; any other query that can
    only be answered by sorting still sorts."""
    with translated_errors():
        conn.execute("SET enable_sort = off")


def _row(model: type[RowT], row: dict[str, Any] | None) -> RowT | None:
    if row is None or row.get("id") is None:
        return None
    return model.model_validate(row)


def _json(value: Any) -> str:
    return value if isinstance(value, RawJson) else json.dumps(value)


NO_CAP = 2**31 - 1  # get_jobs_under_cap's cap for a caller without one (an int4)


@dataclass(frozen=True)
class LockedBatch:
    jobs: list[JobRow]
    room: int  # free in-flight slots before the batch: the cap minus the jobs held


@dataclass(frozen=True)
class QueueGauges:
    ready: int
    oldest_ready_age_seconds: float
    unroutable: int
    failed_permanently: int


class RawJson(str):
    """JSON text to store as is (not re-encoded)."""


class LeaseState(enum.Enum):
    """Where a job stands for one lease, as an asynchronous callback finds it."""

    HELD = "held"  # still locked under the lease: its outcome may be written
    SETTLED = "settled"  # gone, or unlocked at the lease's attempt: recorded already
    STALE = "stale"  # re-leased or released since: a newer attempt owns the job
    EXPIRED = "expired"  # the lease's callback token ran out (database clock)


class JobsDB:
    """Typed wrappers over the ``app_jobs`` functions of one schema."""

    def __init__(self, schema: str = "app_jobs") -> None:
        self.schema = schema
        self._schema = sql.Identifier(schema)
        self._rendered: dict[str, bytes] = {}

    def _statement(self, conn: Connection, name: str, build: Callable[[], sql.Composed]) -> bytes:
        """A per-job statement, composed and rendered once: psycopg would otherwise
        re-render a ``Composed`` on every execute (a tenth of a job's database CPU)."""
        query = self._rendered.get(name)
        if query is None:
            query = self._rendered[name] = build().as_bytes(conn)
        return query

    def _call(self, function: str, columns: str, args: Sequence[sql.Composable]) -> sql.Composed:
        return sql.SQL("SELECT {columns} FROM {schema}.{function}({args})").format(
            columns=sql.SQL(columns),
            schema=self._schema,
            function=sql.Identifier(function),
            args=sql.SQL(", ").join(args),
        )

    def _one(
        self, conn: Connection, model: type[RowT], query: sql.Composed, params: Sequence[Any]
    ) -> RowT | None:
        with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return _row(model, cur.fetchone())

    def _many(
        self,
        conn: Connection,
        model: type[RowT],
        query: sql.Composed,
        params: Sequence[Any] | dict[str, Any],
    ) -> list[RowT]:
        with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return [model.model_validate(row) for row in cur.fetchall()]

    def _void(
        self, conn: Connection, query: sql.SQL | sql.Composed | bytes, params: Sequence[Any]
    ) -> None:
        with translated_errors():
            conn.execute(query, params)

    # -- jobs -------------------------------------------------------------------

    def get_job(
        self,
        conn: Connection,
        worker_id: str,
        task_identifiers: Sequence[str] | None,
        job_expiry: timedelta | None = None,
    ) -> JobRow | None:
        """Lock the next runnable job for ``worker_id``; None when nothing is ready."""
        args = [sql.Placeholder(), sql.SQL("%s::text[]")]
        params: list[Any] = [
            worker_id,
            None if task_identifiers is None else list(task_identifiers),
        ]
        if job_expiry is not None:
            args.append(sql.SQL("%s::interval"))
            params.append(job_expiry)
        return self._one(conn, JobRow, self._call("get_job", JOB_COLUMNS, args), params)

    def get_jobs(
        self,
        conn: Connection,
        worker_id: str,
        task_identifiers: Sequence[str] | None,
        job_expiry: timedelta,
        limit: int,
    ) -> list[JobRow]:
        """Up to ``limit`` jobs for ``worker_id``, in ONE statement: exactly the
        ``get_job`` calls a loop of single calls would make, one after the other.

        A recursive query calls ``get_job`` once per step and stops at the first
        step that found nothing (or at ``limit``). Each step is a separate,
        sequential call of the volatile function, so it sees the locks the
        previous steps took: the jobs come back distinct, in the order the calls
        picked them, stamped with the transaction's ``now()`` like N calls in one
        transaction would be. It saves N-1 round trips and statement overheads."""
        if limit < 1:
            return []
        return self.get_jobs_under_cap(
            conn, worker_id, task_identifiers, job_expiry, limit, NO_CAP
        ).jobs

    def get_jobs_under_cap(
        self,
        conn: Connection,
        worker_id: str,
        task_identifiers: Sequence[str] | None,
        job_expiry: timedelta,
        limit: int,
        cap: int,
    ) -> LockedBatch:
        """:meth:`get_jobs` for a worker that may hold at most ``cap`` jobs: the same
        statement first counts the jobs ``worker_id`` holds, then makes at most
        ``min(limit, cap - held)`` calls (a round trip fewer than counting apart)."""
        query = self._statement(conn, "get_jobs_under_cap", self._get_jobs_under_cap_query)
        params = {
            "worker": worker_id,
            "tasks": None if task_identifiers is None else list(task_identifiers),
            "expiry": job_expiry,
            "limit": limit,
            "cap": cap,
        }
        with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            rows = cur.fetchall()
        room = int(rows[0]["room_before"])  # one row at least: room LEFT JOIN no job
        jobs = [JobRow.model_validate(row) for row in rows if row["id"] is not None]
        return LockedBatch(jobs, room)

    def _get_jobs_under_cap_query(self) -> sql.Composed:
        return sql.SQL(
            "WITH RECURSIVE room AS ("
            "SELECT %(cap)s::int - count(*)::int AS free FROM {schema}.jobs "
            "WHERE locked_by = %(worker)s), "
            "step(n, job) AS ("
            "SELECT 1, {call} FROM room WHERE free > 0 AND %(limit)s > 0 "
            "UNION ALL "
            "SELECT n + 1, {call} FROM step, room "
            "WHERE n < least(%(limit)s, free) AND (job).id IS NOT NULL) "
            "SELECT room.free AS room_before, {columns} FROM room LEFT JOIN "
            "(SELECT n, (job).* FROM step WHERE (job).id IS NOT NULL) j ON true "
            "ORDER BY j.n"
        ).format(
            schema=self._schema,
            call=sql.SQL(
                "{schema}.get_job(%(worker)s, %(tasks)s::text[], %(expiry)s::interval)"
            ).format(schema=self._schema),
            columns=sql.SQL(JOB_COLUMNS),
        )

    def complete_job(self, conn: Connection, worker_id: str, job_id: int) -> JobRow | None:
        """Delete the job (by id only: this SQL does not check locked_by)."""
        query = self._call("complete_job", JOB_COLUMNS, [sql.Placeholder(), sql.SQL("%s::bigint")])
        return self._one(conn, JobRow, query, [worker_id, job_id])

    def complete_jobs(self, conn: Connection, job_ids: Sequence[int]) -> list[JobRow]:
        query = self._call("complete_jobs", JOB_COLUMNS, [sql.SQL("%s::bigint[]")])
        return self._many(conn, JobRow, query, [list(job_ids)])

    def fail_job(
        self, conn: Connection, worker_id: str, job_id: int, error_message: str
    ) -> JobRow | None:
        """Record a failure; the SQL backs the job off. The function is STRICT, so a
        NULL message would silently do nothing: an empty one becomes 'unknown error'."""
        args = [sql.Placeholder(), sql.SQL("%s::bigint"), sql.SQL("%s::text")]
        query = self._call("fail_job", JOB_COLUMNS, args)
        return self._one(conn, JobRow, query, [worker_id, job_id, error_message or "unknown error"])

    def add_job(
        self,
        conn: Connection,
        database_id: UUID | str,
        identifier: str,
        payload: Any = None,
        *,
        job_key: str | None = None,
        queue_name: str | None = None,
        run_at: datetime | None = None,
        max_attempts: int | None = None,
        priority: int | None = None,
    ) -> JobRow:
        named = {
            "job_key": job_key,
            "queue_name": queue_name,
            "run_at": run_at,
            "max_attempts": max_attempts,
            "priority": priority,
        }
        args: list[sql.Composable] = [sql.SQL("%s::uuid"), sql.Placeholder(), sql.SQL("%s::json")]
        params: list[Any] = [
            str(database_id),
            identifier,
            _json({} if payload is None else payload),
        ]
        for name, value in named.items():  # omitted arguments keep the SQL defaults
            if value is not None:
                args.append(sql.SQL("{} => %s").format(sql.Identifier(name)))
                params.append(value)
        row = self._one(conn, JobRow, self._call("add_job", JOB_COLUMNS, args), params)
        if row is None:
            raise DatabaseError("add_job returned no row")
        return row

    def release_jobs(self, conn: Connection, worker_id: str) -> None:
        """Unlock every job of ``worker_id``. Never call it for an id whose
        messages may still be live in Celery: they would run twice."""
        self._void(conn, self._call("release_jobs", "1", [sql.Placeholder()]), [worker_id])

    def reschedule_jobs(
        self,
        conn: Connection,
        job_ids: Sequence[int],
        *,
        run_at: datetime | None = None,
        priority: int | None = None,
        attempts: int | None = None,
        max_attempts: int | None = None,
    ) -> list[JobRow]:
        args = [
            sql.SQL("%s::bigint[]"),
            sql.SQL("%s::timestamptz"),
            sql.SQL("%s::int"),
            sql.SQL("%s::int"),
            sql.SQL("%s::int"),
        ]
        params = [list(job_ids), run_at, priority, attempts, max_attempts]
        return self._many(conn, JobRow, self._call("reschedule_jobs", JOB_COLUMNS, args), params)

    def permanently_fail_jobs(
        self, conn: Connection, job_ids: Sequence[int], error_message: str | None = None
    ) -> list[JobRow]:
        args = [sql.SQL("%s::bigint[]"), sql.SQL("%s::text")]
        query = self._call("permanently_fail_jobs", JOB_COLUMNS, args)
        return self._many(conn, JobRow, query, [list(job_ids), error_message])

    # -- scheduled jobs -----------------------------------------------------------

    def get_scheduled_job(
        self, conn: Connection, worker_id: str, task_identifiers: Sequence[str] | None
    ) -> ScheduledJobRow | None:
        args = [sql.Placeholder(), sql.SQL("%s::text[]")]
        params = [worker_id, None if task_identifiers is None else list(task_identifiers)]
        query = self._call("get_scheduled_job", SCHEDULED_JOB_COLUMNS, args)
        return self._one(conn, ScheduledJobRow, query, params)

    def add_scheduled_job(
        self,
        conn: Connection,
        database_id: UUID | str,
        identifier: str,
        payload: Any = None,
        schedule_info: Any = None,
        *,
        job_key: str | None = None,
        queue_name: str | None = None,
        max_attempts: int | None = None,
        priority: int | None = None,
    ) -> ScheduledJobRow:
        named = {
            "job_key": job_key,
            "queue_name": queue_name,
            "max_attempts": max_attempts,
            "priority": priority,
        }
        args: list[sql.Composable] = [
            sql.SQL("%s::uuid"),
            sql.Placeholder(),
            sql.SQL("%s::json"),
            sql.SQL("%s::json"),
        ]
        params: list[Any] = [
            str(database_id),
            identifier,
            _json({} if payload is None else payload),
            _json({} if schedule_info is None else schedule_info),
        ]
        for name, value in named.items():
            if value is not None:
                args.append(sql.SQL("{} => %s").format(sql.Identifier(name)))
                params.append(value)
        query = self._call("add_scheduled_job", SCHEDULED_JOB_COLUMNS, args)
        row = self._one(conn, ScheduledJobRow, query, params)
        if row is None:
            raise DatabaseError("add_scheduled_job returned no row")
        return row

    def run_scheduled_job(
        self, conn: Connection, scheduled_job_id: int, job_expiry: timedelta | None = None
    ) -> JobRow | AlreadyScheduled | None:
        """Insert the scheduled job's next job. ALREADY_SCHEDULED is a normal outcome;
        None means the scheduled job is gone (stop its timer)."""
        args = [sql.SQL("%s::bigint")]
        params: list[Any] = [scheduled_job_id]
        if job_expiry is not None:
            args.append(sql.SQL("%s::interval"))
            params.append(job_expiry)
        query = self._call("run_scheduled_job", JOB_COLUMNS, args)
        try:
            with conn.transaction():  # a savepoint when the caller has a transaction open
                return self._one(conn, JobRow, query, params)
        except DatabaseError as exc:
            if str(exc) == "ALREADY_SCHEDULED":
                return ALREADY_SCHEDULED
            raise

    def release_scheduled_jobs(
        self, conn: Connection, worker_id: str, ids: Sequence[int] | None = None
    ) -> None:
        args = [sql.Placeholder(), sql.SQL("%s::bigint[]")]
        params = [worker_id, None if ids is None else list(ids)]
        self._void(conn, self._call("release_scheduled_jobs", "1", args), params)

    def scheduled_jobs_locked_by(self, conn: Connection, worker_id: str) -> list[ScheduledJobRow]:
        """The scheduled jobs ``worker_id`` holds, as they are now (read-only)."""
        query = sql.SQL(
            "SELECT {columns} FROM {schema}.scheduled_jobs WHERE locked_by = %s ORDER BY id"
        ).format(columns=sql.SQL(SCHEDULED_JOB_COLUMNS), schema=self._schema)
        return self._many(conn, ScheduledJobRow, query, [worker_id])

    def scheduled_job_overview(
        self, conn: Connection, holder_prefix: str
    ) -> list[ScheduledJobStatus]:
        """Every scheduled job (no payload) with what ``lqjobs schedules`` judges it by:
        whether its last job failed permanently and still exists, and whether a session
        whose application_name is ``holder_prefix || locked_by`` is connected."""
        query = sql.SQL(
            """
            SELECT s.id, s.task_identifier, s.schedule_info::text AS schedule_info,
                   s.locked_by, s.locked_at, s.last_scheduled, s.last_scheduled_id,
                   coalesce(j.locked_at IS NULL AND j.attempts >= j.max_attempts, false)
                       AS last_job_failed_permanently,
                   CASE WHEN s.locked_by IS NOT NULL THEN EXISTS (
                       SELECT 1 FROM pg_stat_activity a
                        WHERE a.datname = current_database()
                          AND a.application_name = left(%(prefix)s || s.locked_by, 63)
                   ) END AS holder_connected,
                   extract(epoch FROM now() - s.locked_at)::float8 AS held_seconds
              FROM {schema}.scheduled_jobs s
              LEFT JOIN {schema}.jobs j ON j.id = s.last_scheduled_id
             ORDER BY s.id
            """
        ).format(schema=self._schema)
        with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, {"prefix": holder_prefix})
            return [ScheduledJobStatus.model_validate(row) for row in cur.fetchall()]

    # -- fenced writes: the lease is re-checked in the same statement ----------------

    def _lease_cte(self) -> sql.Composed:
        # Filtering on the whole lease with FOR UPDATE: a concurrent re-lease makes
        # Postgres re-check the row after the wait, and the write is skipped.
        return sql.SQL(
            "WITH lease AS (SELECT id, queue_name FROM {schema}.jobs WHERE id = %(id)s "
            "AND locked_by = %(worker)s AND attempts = %(attempts)s "
            "AND locked_at = %(locked_at)s FOR UPDATE)"
        ).format(schema=self._schema)

    @staticmethod
    def _lease_params(lease: Lease) -> dict[str, Any]:
        return {
            "id": lease.job_id,
            "worker": lease.worker_id,
            "attempts": lease.attempts,
            "locked_at": lease.locked_at,
        }

    def preflight(self, conn: Connection, lease: Lease) -> tuple[JobRow | None, bool]:
        """The job row if it is still held under ``lease``, and whether this session
        took the job's advisory lock (no two overlapping calls for one job).

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
            cur.execute(query, self._lease_params(lease))
            row = cur.fetchone()
        if row is None:
            return None, False
        locked = bool(row.pop("advisory"))
        job = JobRow.model_validate(row)
        return (job, locked) if lease.held_by(job) else (None, False)

    def preflight_query(self) -> sql.Composed:
        return sql.SQL(
            "SELECT {columns}, CASE WHEN locked_by = %(worker)s AND attempts = %(attempts)s "
            "AND locked_at = %(locked_at)s THEN pg_try_advisory_lock({ns}, {key}) END "
            "AS advisory FROM {schema}.jobs WHERE id = %(id)s "
            "AND set_config('synchronous_commit', 'off', true) IS NOT NULL FOR SHARE"
        ).format(
            columns=sql.SQL(JOB_COLUMNS),
            schema=self._schema,
            ns=sql.Literal(ADVISORY_NAMESPACE),
            key=sql.SQL(ADVISORY_KEY.format("id")),
        )

    def release_advisory(self, conn: Connection, job_id: int) -> None:
        query = self._statement(conn, "release_advisory", self._release_advisory_query)
        self._void(conn, query, [job_id])

    @staticmethod
    def _release_advisory_query() -> sql.Composed:
        return sql.SQL("SELECT pg_advisory_unlock({ns}, {key})").format(
            ns=sql.Literal(ADVISORY_NAMESPACE), key=sql.SQL(ADVISORY_KEY.format("%s::bigint"))
        )

    def _with_release(self, query: sql.Composed, release_advisory: bool) -> sql.Composed:
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
        return self._count(conn, query, self._lease_params(lease)) > 0

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
        params = self._lease_params(lease) | {"message": error_message or "unknown error"}
        return self._count(conn, query, params) > 0

    def fenced_fail_permanently(self, conn: Connection, lease: Lease, error_message: str) -> bool:
        """fail_job then permanently_fail_jobs, in one transaction, under ``lease``."""
        with translated_errors(), conn.transaction():
            if not self.fenced_fail(conn, lease, error_message):
                return False
            self.permanently_fail_jobs(conn, [lease.job_id], error_message or "unknown error")
            return True

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

    def _count(self, conn: Connection, query: sql.Composed | bytes, params: dict[str, Any]) -> int:
        with translated_errors():
            row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0

    # -- bridge helpers (read-only) ------------------------------------------------

    def count_locked_by(self, conn: Connection, worker_id: str) -> int:
        """Jobs locked and not yet settled by ``worker_id`` (the bridge's in-flight)."""
        query = sql.SQL("SELECT count(*) FROM {schema}.jobs WHERE locked_by = %(worker)s").format(
            schema=self._schema
        )
        return self._count(conn, query, {"worker": worker_id})

    def jobs_locked_by(
        self, conn: Connection, worker_id: str, locked_within: timedelta
    ) -> list[JobRow]:
        """The leases ``worker_id`` holds now, as get_job handed them out (same
        attempts and locked_at, so the same lease), locked less than ``locked_within``
        ago by the database's clock; oldest first. For re-publishing (reconciler)."""
        query = sql.SQL(
            "SELECT {columns} FROM {schema}.jobs WHERE locked_by = %s "
            "AND locked_at > now() - %s::interval ORDER BY locked_at, id"
        ).format(columns=sql.SQL(JOB_COLUMNS), schema=self._schema)
        return self._many(conn, JobRow, query, [worker_id, locked_within])

    def seconds_until_next_job(
        self, conn: Connection, task_identifiers: Sequence[str] | None, job_expiry: timedelta
    ) -> float | None:
        """When the next job becomes runnable without any NOTIFY: a future run_at
        (delays, back-offs) or an expiring lock. None when there is none."""
        query = sql.SQL(
            """
            SELECT extract(epoch FROM least(
                (SELECT min(run_at) FROM {schema}.jobs
                  WHERE locked_at IS NULL AND attempts < max_attempts AND run_at > now()
                    AND (%(tasks)s::text[] IS NULL OR task_identifier = ANY(%(tasks)s))),
                (SELECT min(locked_at) + %(expiry)s::interval FROM {schema}.jobs
                  WHERE locked_at IS NOT NULL AND attempts < max_attempts
                    AND (%(tasks)s::text[] IS NULL OR task_identifier = ANY(%(tasks)s)))
            ) - now())::float8
            """
        ).format(schema=self._schema)
        params = {
            "tasks": None if task_identifiers is None else list(task_identifiers),
            "expiry": job_expiry,
        }
        with translated_errors():
            row = conn.execute(query, params).fetchone()
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    def queue_gauges(self, conn: Connection, task_identifiers: Sequence[str] | None) -> QueueGauges:
        """Ready jobs this deployment serves and their oldest age; ready jobs of tasks
        nobody here serves (they wait forever); jobs parked as failed."""
        query = sql.SQL(
            """
            SELECT count(*) FILTER (WHERE served AND ready),
                   coalesce(extract(epoch FROM now() - min(run_at)
                            FILTER (WHERE served AND ready)), 0)::float8,
                   count(*) FILTER (WHERE NOT served AND ready),
                   count(*) FILTER (WHERE locked_at IS NULL AND attempts >= max_attempts)
              FROM (SELECT run_at, locked_at, attempts, max_attempts,
                           (%(tasks)s::text[] IS NULL OR task_identifier = ANY(%(tasks)s))
                               AS served,
                           (locked_at IS NULL AND attempts < max_attempts AND run_at <= now())
                               AS ready
                      FROM {schema}.jobs) j
            """
        ).format(schema=self._schema)
        tasks = None if task_identifiers is None else list(task_identifiers)
        with translated_errors():
            row = conn.execute(query, {"tasks": tasks}).fetchone()
        assert row is not None
        return QueueGauges(int(row[0]), float(row[1]), int(row[2]), int(row[3]))

    def existing_job_ids(self, conn: Connection, job_ids: Sequence[int]) -> set[int]:
        """Which of ``job_ids`` are still in the queue (not yet completed)."""
        query = sql.SQL("SELECT id FROM {schema}.jobs WHERE id = ANY(%s)").format(
            schema=self._schema
        )
        with translated_errors():
            return {row[0] for row in conn.execute(query, [list(job_ids)]).fetchall()}

    def ping(self, conn: Connection) -> None:
        self._void(conn, sql.SQL("SELECT 1"), [])

    # -- read-only helpers (lqjobs additions; no writes) ----------------------------

    def task_status(self, conn: Connection) -> list[TaskStatus]:
        """Per task identifier: ready, delayed, locked, failed-permanently, oldest ready age."""
        query = sql.SQL(
            """
            SELECT task_identifier,
                   count(*) FILTER (WHERE locked_at IS NULL AND attempts < max_attempts
                                    AND run_at <= now()) AS ready,
                   count(*) FILTER (WHERE locked_at IS NULL AND attempts < max_attempts
                                    AND run_at > now()) AS delayed,
                   count(*) FILTER (WHERE locked_at IS NOT NULL) AS locked,
                   count(*) FILTER (WHERE locked_at IS NULL
                                    AND attempts >= max_attempts) AS failed_permanently,
                   extract(epoch FROM now() - min(run_at) FILTER (
                       WHERE locked_at IS NULL AND attempts < max_attempts AND run_at <= now()
                   ))::float8 AS oldest_ready_age_seconds
              FROM {schema}.jobs
             GROUP BY task_identifier
             ORDER BY task_identifier
            """
        ).format(schema=self._schema)
        with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query)
            return [TaskStatus.model_validate(row) for row in cur.fetchall()]

    def schema_installed(self, conn: Connection) -> bool:
        """True when the schema and the functions lqjobs calls are present."""
        query = "SELECT count(DISTINCT p.proname) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s AND p.proname = ANY(%s)"  # noqa: E501
        needed = ["get_job", "complete_job", "fail_job", "add_job", "release_jobs"]
        with translated_errors():
            row = conn.execute(query, [self.schema, needed]).fetchone()
        return row is not None and row[0] == len(needed)


# -- schema installation (used by lqjobs.migrate) -----------------------------------

MIGRATION_LOCK_KEY = 0x6C716A6F62  # 'lqjob': one migration at a time per database


def schema_marker(conn: Connection, schema: str) -> str | None:
    """The schema's comment (lqjobs stamps its SQL fingerprint there), or None when
    the schema does not exist. '' means it exists without a comment."""
    query = "SELECT coalesce(obj_description(oid, 'pg_namespace'), '') FROM pg_namespace WHERE nspname = %s"  # noqa: E501
    with translated_errors():
        row = conn.execute(query, [schema]).fetchone()
    return None if row is None else str(row[0])


def apply_schema(conn: Connection, scripts: Sequence[str], schema: str, marker: str) -> None:
    """Run the install scripts and stamp the marker, in the caller's transaction."""
    with translated_errors():
        for script in scripts:
            conn.execute(script.encode())  # our own files: no parameters, many statements
        conn.execute(
            sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                sql.Identifier(schema), sql.Literal(marker)
            )
        )


def lock_for_migration(conn: Connection) -> None:
    with translated_errors():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_KEY])
