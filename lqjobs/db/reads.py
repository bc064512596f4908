"""Read-only statements lqjobs adds beside the upstream functions: the bridge's
in-flight count, wake timer and gauges, the reconciler's leases, and what
``lqjobs status`` / ``schedules`` / ``doctor`` show. Nothing here writes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from psycopg import sql
from psycopg.rows import dict_row

from lqjobs.db.base import JOB_COLUMNS, Connection, Statements, tasks_param, translated_errors
from lqjobs.models import JobRow, ScheduledJobStatus, TaskStatus


@dataclass(frozen=True)
class QueueGauges:
    ready: int
    oldest_ready_age_seconds: float
    unroutable: int
    failed_permanently: int
    locked_last_attempt: int  # locked on their last attempt: a failure parks them
    abandoned: int  # of those, locked longer than the lease expiry: no one will settle them


class Reads(Statements):
    """Read-only views of one jobs schema."""

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
        """When ``get_job`` can next take a job that no NOTIFY announces: a future
        run_at (delays, back-offs) or an expiring lock, and never before the lock on
        the job's serial queue expires (a held queue blocks its other jobs, so a
        job whose own lock expired waits for it too). None when there is none."""
        query = sql.SQL(
            """
            SELECT extract(epoch FROM min(greatest(
                       CASE WHEN j.locked_at IS NULL THEN j.run_at
                            ELSE j.locked_at + %(expiry)s::interval END,
                       q.locked_at + %(expiry)s::interval)) - now())::float8
              FROM {schema}.jobs j
              LEFT JOIN {schema}.job_queues q
                ON q.queue_name = j.queue_name AND q.locked_at IS NOT NULL
             WHERE j.attempts < j.max_attempts
               AND (j.locked_at IS NOT NULL OR j.run_at > now() OR q.locked_at IS NOT NULL)
               AND (%(tasks)s::text[] IS NULL OR j.task_identifier = ANY(%(tasks)s))
            """
        ).format(schema=self._schema)
        params = {"tasks": tasks_param(task_identifiers), "expiry": job_expiry}
        with translated_errors():
            row = conn.execute(query, params).fetchone()
        return None if row is None or row[0] is None else max(0.0, float(row[0]))

    def queue_gauges(
        self, conn: Connection, task_identifiers: Sequence[str] | None, job_expiry: timedelta
    ) -> QueueGauges:
        """Ready jobs this deployment serves and their oldest age; ready jobs of tasks
        nobody here serves (they wait forever); jobs parked as failed; jobs locked on
        their last attempt, and those of them whose lease expired (get_job never
        takes them again: a bridge's sweep fails them)."""
        query = sql.SQL(
            """
            SELECT count(*) FILTER (WHERE served AND ready),
                   coalesce(extract(epoch FROM now() - min(run_at)
                            FILTER (WHERE served AND ready)), 0)::float8,
                   count(*) FILTER (WHERE NOT served AND ready),
                   count(*) FILTER (WHERE locked_at IS NULL AND attempts >= max_attempts),
                   count(*) FILTER (WHERE locked_at IS NOT NULL AND attempts >= max_attempts),
                   count(*) FILTER (WHERE locked_at IS NOT NULL AND attempts >= max_attempts
                                    AND locked_at < now() - %(expiry)s::interval)
              FROM (SELECT run_at, locked_at, attempts, max_attempts,
                           (%(tasks)s::text[] IS NULL OR task_identifier = ANY(%(tasks)s))
                               AS served,
                           (locked_at IS NULL AND attempts < max_attempts AND run_at <= now())
                               AS ready
                      FROM {schema}.jobs) j
            """
        ).format(schema=self._schema)
        params = {"tasks": tasks_param(task_identifiers), "expiry": job_expiry}
        with translated_errors():
            row = conn.execute(query, params).fetchone()
        assert row is not None
        return QueueGauges(int(row[0]), float(row[1]), *(int(value) for value in row[2:6]))

    def existing_job_ids(self, conn: Connection, job_ids: Sequence[int]) -> set[int]:
        """Which of ``job_ids`` are still in the queue (not yet completed)."""
        query = sql.SQL("SELECT id FROM {schema}.jobs WHERE id = ANY(%s)").format(
            schema=self._schema
        )
        with translated_errors():
            return {row[0] for row in conn.execute(query, [list(job_ids)]).fetchall()}

    def task_status(self, conn: Connection) -> list[TaskStatus]:
        """Per task identifier: ready, delayed, locked (and of those, on their last
        attempt), failed-permanently, oldest ready age."""
        query = sql.SQL(
            """
            SELECT task_identifier,
                   count(*) FILTER (WHERE locked_at IS NULL AND attempts < max_attempts
                                    AND run_at <= now()) AS ready,
                   count(*) FILTER (WHERE locked_at IS NULL AND attempts < max_attempts
                                    AND run_at > now()) AS delayed,
                   count(*) FILTER (WHERE locked_at IS NOT NULL) AS locked,
                   count(*) FILTER (WHERE locked_at IS NOT NULL
                                    AND attempts >= max_attempts) AS locked_last_attempt,
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
        return self._many(conn, TaskStatus, query)

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

    def schema_installed(self, conn: Connection) -> bool:
        """True when the schema and the functions lqjobs calls are present."""
        query = "SELECT count(DISTINCT p.proname) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %s AND p.proname = ANY(%s)"  # noqa: E501
        needed = ["get_job", "complete_job", "fail_job", "add_job", "release_jobs"]
        with translated_errors():
            row = conn.execute(query, [self.schema, needed]).fetchone()
        return row is not None and row[0] == len(needed)
