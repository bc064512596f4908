"""The upstream scheduled-job functions: one method per ``app_jobs`` function."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any
from uuid import UUID

from psycopg import sql

from lqjobs.db.base import (
    JOB_COLUMNS,
    SCHEDULED_JOB_COLUMNS,
    Connection,
    Statements,
    as_json,
    tasks_param,
)
from lqjobs.errors import DatabaseError
from lqjobs.models import ALREADY_SCHEDULED, AlreadyScheduled, JobRow, ScheduledJobRow


class Scheduled(Statements):
    """Typed wrappers over the scheduled-job functions of one jobs schema."""

    def get_scheduled_job(
        self, conn: Connection, worker_id: str, task_identifiers: Sequence[str] | None
    ) -> ScheduledJobRow | None:
        args = [sql.Placeholder(), sql.SQL("%s::text[]")]
        params = [worker_id, tasks_param(task_identifiers)]
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
            as_json({} if payload is None else payload),
            as_json({} if schedule_info is None else schedule_info),
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
