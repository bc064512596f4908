"""A job added to an idle queue reaches its function quickly on every server of the
matrix, the stock one with JIT included, and no statement the bridge or the worker
runs is JIT-compiled there (each such compile cost a lock pass ~135 ms).

Bounds here catch a regression of an order of magnitude; the figures themselves
live in ``python -m bench``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import psycopg
import pytest
from psycopg import sql

from lqjobs.db import JobsDB
from lqjobs.ops.example_functions import FunctionServer
from tests.databases import PostgresServer
from tests.stack import TENANT, make_settings, stack, wait_for_empty_queue

pytestmark = pytest.mark.integration

JOBS = 15
P50_BOUND = 0.05  # seconds; the JIT defect measured ~0.15, a healthy server ~0.01


def add_one(db_url: str) -> tuple[int, float]:
    """Add one job; its id and the moment its commit returned."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        job = JobsDB().queue.add_job(conn, TENANT, "noop", {})
        return job.id, time.monotonic()


@pytest.fixture
def plans_logged(db_url: str, postgres_server: PostgresServer) -> Callable[[], list[str]]:
    """Every plan of every statement (nested ones included) that sessions of this
    database run, written to the server's log by auto_explain (superuser settings:
    the suite's own server); returns a reader of the log lines written since."""
    if postgres_server.log_path is None:
        pytest.skip("the server's log is not ours to read (an external server)")
    database = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(db_url, autocommit=True) as conn:
        for setting, value in (
            ("session_preload_libraries", "auto_explain"),
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_nested_statements", "on"),
        ):
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(str(database)), sql.Identifier(setting), sql.Literal(value)
                )
            )
    log_path = postgres_server.log_path
    start = log_path.stat().st_size

    def read() -> list[str]:
        with log_path.open("rb") as log:
            log.seek(start)
            return log.read().decode("utf-8", "replace").splitlines()

    return read


def test_a_job_on_an_idle_queue_is_called_quickly_and_nothing_is_jit_compiled(
    db_url: str, redis_url: str, functions: FunctionServer, plans_logged: Callable[[], list[str]]
) -> None:
    settings = make_settings(
        db_url, redis_url, executor="knative", knative_ingress_url=functions.url
    )
    latencies = []
    with stack(settings, concurrency=2):
        for _ in range(3):  # warm-up: connections open, plans cached
            job_id, _committed = add_one(db_url)
            functions.calls.wait_for_calls(1, timeout=10, job_id=job_id)
        for _ in range(JOBS):
            wait_for_empty_queue(db_url, timeout=10)  # idle: the bridge waits in LISTEN
            job_id, committed = add_one(db_url)
            call = functions.calls.wait_for_calls(1, timeout=10, job_id=job_id)[0]
            latencies.append(call.started - committed)
        wait_for_empty_queue(db_url, timeout=10)
    p50 = statistics.median(latencies)
    assert p50 < P50_BOUND, f"p50 {p50 * 1000:.1f} ms; all: {sorted(latencies)}"
    logged = plans_logged()
    assert any("plan:" in line for line in logged), "no plan logged: the check proves nothing"
    jit = [line for line in logged if "JIT:" in line]
    assert not jit, f"{len(jit)} JIT-compiled plans"
