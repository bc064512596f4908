"""What every statement of lqjobs shares: connections, LISTEN, error translation,
the column lists, and the base class of the role classes (one per role, in this
package: queue, scheduled, fence, reads).

``psycopg.Error`` is translated into :mod:`lqjobs.errors` here and nowhere else.
Methods never commit: the caller owns the transaction (the bridge locks,
publishes, then commits). The all-NULL row that a "nothing found" composite
result shows as becomes ``None`` here and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from pydantic import BaseModel

from lqjobs.errors import DatabaseError, DatabaseUnavailable, InvalidWorkerId, SchemaMissing
from lqjobs.logs import escaped

Connection = psycopg.Connection[Any]
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


PoolMode = Literal["session", "transaction"]


def session_options(pool_mode: PoolMode) -> dict[str, Any]:
    """psycopg options for a connection that reaches Postgres the ``pool_mode`` way.

    Through a transaction pooler, consecutive transactions of one connection may run
    on different server sessions. psycopg prepares a statement on the server after
    five executions and then runs it by name; another server session has no such
    statement ("does not exist"), or has one of that name from another client
    ("already exists", or worse, another query bound to these parameters). With
    ``prepare_threshold=None`` nothing is prepared and every statement is sent whole.
    """
    return {"prepare_threshold": None} if pool_mode == "transaction" else {}


def connect(
    conninfo: str,
    *,
    autocommit: bool = False,
    application_name: str | None = None,
    pool_mode: PoolMode = "session",
) -> Connection:
    """``application_name`` (shown in pg_stat_activity) overrides the conninfo's when
    given; ``pool_mode``: how ``conninfo`` reaches Postgres (:func:`session_options`)."""
    try:
        with translated_errors():
            return psycopg.connect(
                conninfo,
                autocommit=autocommit,
                connect_timeout=10,
                application_name=application_name,
                **session_options(pool_mode),
            )
    except DatabaseUnavailable as exc:
        raise DatabaseUnavailable(
            f"database unavailable: cannot connect to {server_address(conninfo)}: "
            f"{connect_failure(exc.__context__)}",
            exc.sqlstate,
        ) from None


def server_address(conninfo: str) -> str:
    """Where ``conninfo`` leads, as libpq reads it (no user, no password): the hosts and
    ports tried, with PGHOST / PGPORT and libpq's defaults filled in."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "an unreadable connection string"
    host = str(params.get("host") or os.environ.get("PGHOST") or "the local socket")
    port = str(params.get("port") or os.environ.get("PGPORT") or 5432)
    return escaped(f"{host} port {port}", 200)


def connect_failure(exc: BaseException | None) -> str:
    """libpq's reason ("Connection refused", "timeout expired", ...) without the rest."""
    text = str(exc or "").splitlines()[0] if exc else ""
    return escaped(text.rsplit("failed: ", 1)[-1].strip() or type(exc).__name__, 200)


def listen(conn: Connection, *channels: str) -> None:
    with translated_errors():
        for channel in channels:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))


def ping(conn: Connection) -> None:
    with translated_errors():
        conn.execute("SELECT 1")


# Makes the get_job calls that follow, in the same transaction, walk the (priority,
# run_at, id) index. get_job takes the first runnable job (ORDER BY priority, run_at,
# id LIMIT 1), and its cached generic plan estimates a single matching row (the OR
# conditions look very selective), so Postgres would fetch every due job and sort
# them on every call: about 1 ms per call with 2,000 waiting, against 0.07 ms for
# the index walk that stops at the first free job. With sorting disabled, the
# planner takes the walk; the SQL itself is unchanged.
#
# It is a select-list item of the statement that calls get_job, never a session
# SET: a session setting is planned into every later statement of the session (on
# Postgres before 18 a disabled sort adds 10^10 to a plan's cost, far above
# jit_above_cost, so every lock pass paid ~135 ms of LLVM JIT compilation), and
# through a transaction pooler it would leak into other clients' transactions.
# is_local=true: the setting ends with the transaction.
WALK_JOB_INDEX = sql.SQL("set_config('enable_sort', 'off', true)")


class RawJson(str):
    """JSON text to store as is (not re-encoded)."""


def as_json(value: Any) -> str:
    return value if isinstance(value, RawJson) else json.dumps(value)


def tasks_param(task_identifiers: Sequence[str] | None) -> list[str] | None:
    """A task filter as a ``text[]`` parameter; None means any task."""
    return None if task_identifiers is None else list(task_identifiers)


def row_or_none(model: type[RowT], row: dict[str, Any] | None) -> RowT | None:
    if row is None or row.get("id") is None:
        return None
    return model.model_validate(row)


class Statements:
    """The statements of one role over the jobs schema ``schema``: built with the
    schema quoted as an identifier, never formatted in as text."""

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
            return row_or_none(model, cur.fetchone())

    def _many(
        self,
        conn: Connection,
        model: type[RowT],
        query: sql.Composed,
        params: Sequence[Any] | dict[str, Any] | None = None,
    ) -> list[RowT]:
        with translated_errors(), conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return [model.model_validate(row) for row in cur.fetchall()]

    def _void(
        self, conn: Connection, query: sql.SQL | sql.Composed | bytes, params: Sequence[Any]
    ) -> None:
        with translated_errors():
            conn.execute(query, params)

    def _count(self, conn: Connection, query: sql.Composed | bytes, params: dict[str, Any]) -> int:
        with translated_errors():
            row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0
