"""Helpers for the app_jobs SQL conformance tests (tests/integration/test_sql_*.py).

Everything is exposed as fixtures: test modules never import this file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.worker import JobRunner
from tests.runners import make_runner

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
TENANT = UUID("5b720132-17d5-424d-9bcb-ee7b17c13d43")

# add_job / add_scheduled_job parameters and the SQL type each is passed as.
_JOB_ARG_TYPES = {
    "payload": "json",
    "job_key": "text",
    "queue_name": "text",
    "run_at": "timestamptz",
    "max_attempts": "integer",
    "priority": "integer",
    "schedule_info": "json",
}
_UNSET: Any = object()


def _jsonable(value: Any) -> Any:
    return value if value is None or isinstance(value, str) else json.dumps(value)


class Q:
    """Small query helper over one autocommit connection."""

    def __init__(self, conn: psycopg.Connection[Any], tenant: UUID = TENANT) -> None:
        self.conn = conn
        self.tenant = tenant

    # -- plain queries ------------------------------------------------------------

    def rows(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall()

    def one(self, query: str, params: Any = None) -> dict[str, Any]:
        rows = self.rows(query, params)
        assert len(rows) == 1, f"expected one row, got {len(rows)}"
        return rows[0]

    def value(self, query: str, params: Any = None) -> Any:
        row = self.conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return row[0]

    def execute(self, query: str, params: Any = None) -> None:
        self.conn.execute(query, params)  # type: ignore[arg-type]

    # -- app_jobs calls -------------------------------------------------------------

    def _named_call(self, function: str, fixed: dict[str, tuple[str, Any]], named: dict[str, Any]):
        args = [f"{name} => %({name})s::{typ}" for name, (typ, _) in fixed.items()]
        params = {name: value for name, (_, value) in fixed.items()}
        for name, value in named.items():
            args.append(f"{name} => %({name})s::{_JOB_ARG_TYPES[name]}")
            params[name] = _jsonable(value) if _JOB_ARG_TYPES[name] == "json" else value
        return self.one(f"SELECT * FROM app_jobs.{function}({', '.join(args)})", params)

    def add_job(self, identifier: str = "task_a", *, db_id: Any = _UNSET, **named: Any):
        """add_job with only the given named arguments (the rest keep SQL defaults)."""
        tenant = self.tenant if db_id is _UNSET else db_id
        fixed = {"db_id": ("uuid", tenant), "identifier": ("text", identifier)}
        return self._named_call("add_job", fixed, named)

    def add_scheduled_job(self, identifier: str = "task_a", *, db_id: Any = _UNSET, **named: Any):
        tenant = self.tenant if db_id is _UNSET else db_id
        fixed = {"db_id": ("uuid", tenant), "identifier": ("text", identifier)}
        return self._named_call("add_scheduled_job", fixed, named)

    def get_job(
        self, worker: str | None, tasks: list[str] | None = None, expiry: str | None = None
    ) -> dict[str, Any] | None:
        """get_job; None when it returned the all-NULL row."""
        if expiry is None:
            row = self.one("SELECT * FROM app_jobs.get_job(%s, %s::text[])", [worker, tasks])
        else:
            row = self.one(
                "SELECT * FROM app_jobs.get_job(%s, %s::text[], %s::interval)",
                [worker, tasks, expiry],
            )
        return None if row["id"] is None else row

    def get_scheduled_job(self, worker: str | None, tasks: list[str] | None = None):
        row = self.one("SELECT * FROM app_jobs.get_scheduled_job(%s, %s::text[])", [worker, tasks])
        return None if row["id"] is None else row

    def job(self, job_id: int) -> dict[str, Any] | None:
        rows = self.rows("SELECT * FROM app_jobs.jobs WHERE id = %s", [job_id])
        return rows[0] if rows else None

    def scheduled(self, scheduled_id: int) -> dict[str, Any] | None:
        rows = self.rows("SELECT * FROM app_jobs.scheduled_jobs WHERE id = %s", [scheduled_id])
        return rows[0] if rows else None

    def queue(self, name: str) -> dict[str, Any] | None:
        rows = self.rows("SELECT * FROM app_jobs.job_queues WHERE queue_name = %s", [name])
        return rows[0] if rows else None

    def queues(self) -> dict[str, int]:
        rows = self.rows("SELECT queue_name, job_count FROM app_jobs.job_queues")
        return {row["queue_name"]: row["job_count"] for row in rows}

    def age_lock(self, job_id: int, age: str) -> None:
        """Pretend the job (and its queue row) was locked ``age`` ago."""
        self.execute(
            "UPDATE app_jobs.jobs SET locked_at = now() - %s::interval WHERE id = %s",
            [age, job_id],
        )
        self.execute(
            """UPDATE app_jobs.job_queues q SET locked_at = now() - %s::interval
                 FROM app_jobs.jobs j
                WHERE j.id = %s AND q.queue_name = j.queue_name AND q.locked_by IS NOT NULL""",
            [age, job_id],
        )


@pytest.fixture(scope="session")
def sql_files() -> list[Path]:
    files = sorted(SQL_DIR.glob("*.sql"))
    assert files, f"no SQL files in {SQL_DIR}"
    return files


@pytest.fixture(scope="session")
def psql_apply(psql_bin: str, sql_files: list[Path]) -> Callable[[str], str]:
    """Apply every sql/ file in name order with ``psql -v ON_ERROR_STOP=1 -f``."""

    def apply(url: str) -> str:
        output = []
        for path in sql_files:
            done = subprocess.run(
                [psql_bin, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0, f"{path.name} failed:\n{done.stderr}"
            assert "ERROR" not in done.stderr, done.stderr
            output.append(done.stderr)
        return "".join(output)

    return apply


@pytest.fixture(scope="session")
def pg_dump_bin(psql_bin: str) -> str | None:
    """pg_dump from the same installation as psql, when there is one."""
    sibling = Path(psql_bin).with_name("pg_dump")
    if sibling.is_absolute() and sibling.exists():
        return str(sibling)
    return shutil.which("pg_dump")


@pytest.fixture
def q(conn: psycopg.Connection[Any]) -> Q:
    return Q(conn)


@pytest.fixture
def tenant() -> UUID:
    return TENANT


@pytest.fixture
def connect(db_url: str) -> Iterator[Callable[[], psycopg.Connection[Any]]]:
    """Open extra autocommit connections to ``db_url``; all closed at teardown."""
    opened: list[psycopg.Connection[Any]] = []

    def open_connection() -> psycopg.Connection[Any]:
        connection = psycopg.connect(db_url, autocommit=True)
        opened.append(connection)
        return connection

    yield open_connection
    for connection in opened:
        connection.close()


@pytest.fixture
def make_q() -> Callable[[psycopg.Connection[Any]], Q]:
    return Q


wait_for = wait_until  # poll a condition until a deadline; TimeoutError names ``what``


@pytest.fixture
def wait() -> Callable[[Callable[[], bool], float, str], None]:
    """``wait(check, timeout, what)``: poll ``check`` until true or fail at the deadline."""
    return wait_for


def _catalogue_queries() -> dict[str, str]:
    ns = "(SELECT oid FROM pg_namespace WHERE nspname = 'app_jobs')"
    return {
        "schema": """SELECT nspname, nspacl::text, obj_description(oid, 'pg_namespace') AS comment
                       FROM pg_namespace WHERE nspname = 'app_jobs'""",
        "relations": f"""SELECT oid::bigint, relname, relkind, relacl::text,
                                obj_description(oid, 'pg_class') AS comment
                           FROM pg_class WHERE relnamespace = {ns} ORDER BY relname""",
        "columns": f"""SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
                              a.attnotnull, pg_get_expr(d.adbin, d.adrelid) AS default_expr
                         FROM pg_attribute a
                         JOIN pg_class c ON c.oid = a.attrelid
                         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                        WHERE c.relnamespace = {ns} AND a.attnum > 0 AND NOT a.attisdropped
                        ORDER BY 1, 2""",
        "constraints": f"""SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
                             FROM pg_constraint WHERE connamespace = {ns} ORDER BY 1, 2""",
        "indexes": """SELECT indexname, indexdef FROM pg_indexes
                       WHERE schemaname = 'app_jobs' ORDER BY 1""",
        "triggers": f"""SELECT t.tgname, pg_get_triggerdef(t.oid), t.tgenabled
                          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                         WHERE c.relnamespace = {ns} AND NOT t.tgisinternal ORDER BY 1""",
        "functions": f"""SELECT p.oid::bigint, p.oid::regprocedure::text, pg_get_functiondef(p.oid),
                                p.proacl::text, obj_description(p.oid, 'pg_proc') AS comment
                           FROM pg_proc p WHERE p.pronamespace = {ns} ORDER BY 2""",
        "default_acl": f"""SELECT defaclobjtype, defaclacl::text FROM pg_default_acl
                            WHERE defaclnamespace = {ns} ORDER BY 1""",
        "sequences": """SELECT sequencename, last_value FROM pg_sequences
                         WHERE schemaname = 'app_jobs' ORDER BY 1""",
    }


def catalogue_snapshot(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Everything app_jobs consists of, including object OIDs (a dropped and
    recreated table or function would show up) and its rows."""
    snapshot = {
        name: conn.execute(query).fetchall() for name, query in _catalogue_queries().items()
    }
    for table in ("jobs", "scheduled_jobs", "job_queues"):
        order = "queue_name" if table == "job_queues" else "id"
        query = sql.SQL("SELECT to_jsonb(t)::text FROM app_jobs.{} t ORDER BY {}").format(
            sql.Identifier(table), sql.Identifier(order)
        )
        snapshot[f"rows:{table}"] = conn.execute(query).fetchall()
    return snapshot


@pytest.fixture
def catalogue() -> Callable[[psycopg.Connection[Any]], dict[str, list[tuple[Any, ...]]]]:
    return catalogue_snapshot


class Gate:
    """Start N threads at once and collect their exceptions."""

    def __init__(self) -> None:
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def run(self, target: Callable[[int], None], count: int, timeout: float) -> None:
        barrier = threading.Barrier(count)

        def body(index: int) -> None:
            try:
                barrier.wait(timeout)
                target(index)
            except BaseException as exc:
                with self._lock:
                    self.errors.append(exc)

        threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in threads), (
            f"threads still running after {timeout}s"
        )
        if self.errors:
            raise self.errors[0]


@pytest.fixture
def gate() -> Gate:
    return Gate()


@pytest.fixture
def functions() -> Iterator[FunctionServer]:
    """Stand-in functions on 127.0.0.1 that log every call."""
    with FunctionServer() as server:
        yield server


@pytest.fixture
def runner(db_url: str, redis_url: str, functions: FunctionServer) -> Iterator[JobRunner]:
    """A job runner driven directly (no broker) as the schema owner."""
    running = make_runner(db_url, redis_url, functions)
    yield running
    running.close()
