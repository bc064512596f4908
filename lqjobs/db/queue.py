"""The upstream job functions: one method per ``app_jobs`` function, named after it.

``get_jobs`` / ``get_jobs_under_cap`` are ``get_job`` called N times in one
statement. Nothing here checks a lease: the fenced writes live in
:mod:`lqjobs.db.fence`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg.rows import dict_row
from pydantic import ValidationError

from lqjobs.db.base import (
    JOB_COLUMNS,
    WALK_JOB_INDEX,
    Connection,
    Statements,
    as_json,
    tasks_param,
    translated_errors,
)
from lqjobs.errors import DatabaseError
from lqjobs.logs import clean_text
from lqjobs.models import JobRow

NO_CAP = 2**31 - 1  # get_jobs_under_cap's cap for a caller without one (an int4)


@dataclass(frozen=True)
class UnreadableRow:
    """A locked row that does not fit :class:`JobRow` (a schema lqjobs does not know)."""

    job_id: int
    reason: str  # field and problem, never the value


@dataclass(frozen=True)
class LockedBatch:
    jobs: list[JobRow]
    room: int  # free in-flight slots before the batch: the cap minus the jobs held
    unreadable: list[UnreadableRow] = field(default_factory=list)

    @property
    def locked(self) -> int:
        return len(self.jobs) + len(self.unreadable)


def read_job(row: dict[str, Any]) -> JobRow | UnreadableRow:
    """The row as a :class:`JobRow`, or why it is not one."""
    try:
        return JobRow.model_validate(row)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        return UnreadableRow(int(row["id"]), clean_text(f"{where}: {first['msg']}", 200))


class Queue(Statements):
    """Typed wrappers over the job functions of one jobs schema."""

    def get_job(
        self,
        conn: Connection,
        worker_id: str,
        task_identifiers: Sequence[str] | None,
        job_expiry: timedelta | None = None,
    ) -> JobRow | None:
        """Lock the next runnable job for ``worker_id``; None when nothing is ready."""
        args = [sql.Placeholder(), sql.SQL("%s::text[]")]
        params: list[Any] = [worker_id, tasks_param(task_identifiers)]
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
        ``min(limit, cap - held)`` calls (a round trip fewer than counting apart).
        A lease older than ``job_expiry`` is not held any more (get_job may take its
        job again): leases whose messages were lost must not fill the cap forever.
        The count's row also turns on :data:`WALK_JOB_INDEX` before the first call."""
        query = self._statement(conn, "get_jobs_under_cap", self._get_jobs_under_cap_query)
        params = {
            "worker": worker_id,
            "tasks": tasks_param(task_identifiers),
            "expiry": job_expiry,
            "limit": limit,
            "cap": cap,
        }
        with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            rows = cur.fetchall()
        room = int(rows[0]["room_before"])  # one row at least: room LEFT JOIN no job
        read = [read_job(row) for row in rows if row["id"] is not None]
        jobs = [job for job in read if isinstance(job, JobRow)]
        unreadable = [job for job in read if isinstance(job, UnreadableRow)]
        return LockedBatch(jobs, room, unreadable)

    def _get_jobs_under_cap_query(self) -> sql.Composed:
        return sql.SQL(
            "WITH RECURSIVE room AS ("
            "SELECT %(cap)s::int - count(*)::int AS free, {walk} AS walk FROM {schema}.jobs "
            "WHERE locked_by = %(worker)s AND locked_at >= now() - %(expiry)s::interval), "
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
            walk=WALK_JOB_INDEX,
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

    def fail_job_permanently(
        self, conn: Connection, worker_id: str, job_id: int, error_message: str
    ) -> None:
        """``fail_job`` then ``permanently_fail_jobs`` of a job ``worker_id`` holds, in the
        caller's transaction, reading nothing back: the bridge parks rows it could not
        read with it."""
        message = error_message or "unknown error"
        fail = [sql.Placeholder(), sql.SQL("%s::bigint"), sql.SQL("%s::text")]
        self._void(conn, self._call("fail_job", "1", fail), [worker_id, job_id, message])
        park = [sql.SQL("%s::bigint[]"), sql.SQL("%s::text")]
        self._void(conn, self._call("permanently_fail_jobs", "1", park), [[job_id], message])

    def fail_abandoned_leases(
        self, conn: Connection, job_expiry: timedelta, error_message: str, limit: int = 100
    ) -> list[int]:
        """``fail_job`` on behalf of their holders for jobs locked longer than
        ``job_expiry`` (database clock) whose attempts are used up: ``get_job`` never
        takes those again, so without this they would stay locked forever. Their
        ``last_error`` says why; the ids come back."""
        query = sql.SQL(
            "WITH abandoned AS (SELECT id, locked_by FROM {schema}.jobs "
            "WHERE locked_by IS NOT NULL AND attempts >= max_attempts "
            "AND locked_at < now() - %(expiry)s::interval "
            "ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
            "SELECT a.id FROM abandoned a, "
            "LATERAL {schema}.fail_job(a.locked_by, a.id, %(message)s) f"
        ).format(schema=self._schema)
        params = {"expiry": job_expiry, "limit": limit, "message": error_message}
        with translated_errors():
            return [row[0] for row in conn.execute(query, params).fetchall()]

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
            as_json({} if payload is None else payload),
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
