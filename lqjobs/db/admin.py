"""The operator's statements (``lqjobs jobs``): jobs as an operator sees them, with a
state judged on the database's clock, and the admin writes over them.

Every write goes through an upstream function: ``reschedule_jobs`` (retry),
``complete_jobs`` (discard, purge, cancel of a pending job), ``permanently_fail_jobs``
(cancel --park). Those act only on jobs nobody holds; a job somebody holds is written
through :class:`~lqjobs.db.fence.Fence` under the lease the operator saw, as a worker
would. The only statement here that is not an upstream function is :meth:`Admin.lock`,
a ``SELECT ... FOR UPDATE`` that pins the rows an action was decided on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from psycopg import sql

from lqjobs.db.base import WAKE_CHANNEL, Connection, Statements, translated_errors
from lqjobs.db.fence import ADVISORY_KEY, ADVISORY_NAMESPACE
from lqjobs.models import JobView

STATES = ("ready", "delayed", "locked", "stranded", "failed")

_VIEW_COLUMNS = (
    "id, database_id, queue_name, task_identifier, priority, run_at, attempts, "
    "max_attempts, key, last_error, locked_at, locked_by, created_at, updated_at, "
    "state, lease_age_seconds, holder_connected, call_running"
)


@dataclass(frozen=True)
class JobFilter:
    """Which jobs; every field left None matches all."""

    ids: Sequence[int] | None = None
    task: str | None = None
    states: Sequence[str] | None = None
    database_id: UUID | None = None
    created_longer_ago: timedelta | None = None  # created (or, NULL, due) before now - this
    updated_longer_ago: timedelta | None = None  # last changed (a failure parks it) before


@dataclass(frozen=True)
class Judgement:
    """What a locked job's state is judged by (docs/operating.md, "States").

    ``job_expiry``: a lease older than this is stranded (``LQJOBS_JOB_EXPIRY``).
    ``settle_window``: the longest a live delivery may still settle a lease; past it, a
    lease whose holder has no session connected and no call running is stranded.
    ``holder_prefix``: a holder's sessions carry ``application_name = prefix || id``.
    ``holder_pattern``: only holders whose id matches it announce themselves so."""

    job_expiry: timedelta
    settle_window: timedelta
    holder_prefix: str
    holder_pattern: str


class Admin(Statements):
    """The operator's view of one jobs schema, and its admin writes."""

    def jobs(
        self,
        conn: Connection,
        where: JobFilter,
        judged: Judgement,
        *,
        limit: int | None = None,
        payload: bool = False,
    ) -> list[JobView]:
        """The jobs ``where`` selects, by id, each with its state; at most ``limit``."""
        params: dict[str, Any] = {
            "ids": None if where.ids is None else list(where.ids),
            "task": where.task,
            "states": None if where.states is None else list(where.states),
            "database_id": where.database_id,
            "created_age": where.created_longer_ago,
            "updated_age": where.updated_longer_ago,
            "expiry": judged.job_expiry,
            "settle": judged.settle_window,
            "prefix": judged.holder_prefix,
            "pattern": judged.holder_pattern,
            "limit": limit,
        }
        return self._many(conn, JobView, self._jobs_query(payload), params)

    def _jobs_query(self, payload: bool) -> sql.Composed:
        # The sessions and advisory locks are read once (MATERIALIZED), not per row.
        return sql.SQL(
            """
            WITH sessions AS MATERIALIZED (
                SELECT DISTINCT application_name FROM pg_stat_activity
                 WHERE datname = current_database()),
            calls AS MATERIALIZED (
                SELECT objid FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objsubid = 2
                   AND classid = {ns}::oid
                   AND database = (SELECT oid FROM pg_database
                                    WHERE datname = current_database())),
            held AS (
                SELECT j.*,
                       extract(epoch FROM now() - j.locked_at)::float8 AS lease_age_seconds,
                       CASE WHEN j.locked_at IS NOT NULL THEN EXISTS (
                           SELECT 1 FROM sessions s
                            WHERE s.application_name = left(%(prefix)s || j.locked_by, 63))
                       END AS holder_connected,
                       CASE WHEN j.locked_at IS NOT NULL THEN EXISTS (
                           SELECT 1 FROM calls c WHERE c.objid = {key}::oid)
                       END AS call_running
                  FROM {schema}.jobs j
                 WHERE (%(ids)s::bigint[] IS NULL OR j.id = ANY(%(ids)s::bigint[]))
                   AND (%(task)s::text IS NULL OR j.task_identifier = %(task)s::text)
                   AND (%(database_id)s::uuid IS NULL OR j.database_id = %(database_id)s::uuid)
                   AND (%(created_age)s::interval IS NULL
                        OR coalesce(j.created_at, j.run_at) < now() - %(created_age)s::interval)
                   AND (%(updated_age)s::interval IS NULL
                        OR coalesce(j.updated_at, j.run_at) < now() - %(updated_age)s::interval)),
            judged AS (
                SELECT h.*,
                       CASE
                         WHEN h.locked_at IS NULL AND h.attempts >= h.max_attempts THEN 'failed'
                         WHEN h.locked_at IS NULL AND h.run_at > now() THEN 'delayed'
                         WHEN h.locked_at IS NULL THEN 'ready'
                         WHEN h.locked_at < now() - %(expiry)s::interval THEN 'stranded'
                         WHEN h.locked_by ~ %(pattern)s::text
                              AND h.locked_at < now() - %(settle)s::interval
                              AND NOT h.holder_connected AND NOT h.call_running THEN 'stranded'
                         ELSE 'locked'
                       END AS state
                  FROM held h)
            SELECT {columns}{payload} FROM judged
             WHERE %(states)s::text[] IS NULL OR state = ANY(%(states)s::text[])
             ORDER BY id
             LIMIT %(limit)s::bigint
            """
        ).format(
            ns=sql.Literal(ADVISORY_NAMESPACE),
            key=sql.SQL(ADVISORY_KEY.format("j.id")),
            schema=self._schema,
            columns=sql.SQL(_VIEW_COLUMNS),
            payload=sql.SQL(", payload::text AS payload" if payload else ""),
        )

    def lock(self, conn: Connection, job_ids: Sequence[int]) -> None:
        """Lock ``job_ids``' rows until the caller's transaction ends, so that the
        state an action is decided on (read next) is the state it acts on: a bridge's
        ``get_job`` skips them meanwhile, a worker's fenced write waits. Not an
        upstream function: none only locks."""
        query = sql.SQL(
            "SELECT id FROM {schema}.jobs WHERE id = ANY(%s::bigint[]) ORDER BY id FOR UPDATE"
        ).format(schema=self._schema)
        self._void(conn, query, [list(job_ids)])

    def retry(self, conn: Connection, job_ids: Sequence[int]) -> list[int]:
        """``reschedule_jobs``: runnable now (database clock), with every attempt again."""
        args = [sql.SQL("%s::bigint[]"), sql.SQL("now()"), sql.SQL("NULL::int")]
        query = self._call("reschedule_jobs", "id", [*args, sql.SQL("0"), sql.SQL("NULL::int")])
        return self._ids(conn, query, [list(job_ids)])

    def remove(self, conn: Connection, job_ids: Sequence[int]) -> list[int]:
        """``complete_jobs``: delete those nobody holds."""
        query = self._call("complete_jobs", "id", [sql.SQL("%s::bigint[]")])
        return self._ids(conn, query, [list(job_ids)])

    def park(self, conn: Connection, job_ids: Sequence[int], message: str) -> list[int]:
        """``permanently_fail_jobs``: never picked again, kept with ``message``."""
        args = [sql.SQL("%s::bigint[]"), sql.SQL("%s::text")]
        query = self._call("permanently_fail_jobs", "id", args)
        return self._ids(conn, query, [list(job_ids), message])

    def wake(self, conn: Connection) -> None:
        """Tell the bridges that jobs may be runnable now (delivered at commit): the SQL
        notifies only on insert."""
        self._void(conn, sql.SQL("SELECT pg_notify(%s, '')"), [WAKE_CHANNEL])

    def _ids(self, conn: Connection, query: sql.Composed, params: Sequence[Any]) -> list[int]:
        with translated_errors():
            return sorted(int(row[0]) for row in conn.execute(query, params).fetchall())
