"""A job runner driven directly (no broker) for the fencing tests: a real pool on a
real database and real HTTP functions, with the start marks kept in memory."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg_pool import ConnectionPool

from lqjobs.broker_state import Claim, StartedMarks
from lqjobs.db import Connection, JobsDB
from lqjobs.executors import build_router, make_http_client
from lqjobs.lease import Lease
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.worker import JobRunner
from tests.stack import make_settings

TENANT = UUID("11111111-2222-3333-4444-555555555555")
WORKER = "bridge-test-host-0000"


class MemoryMarks(StartedMarks):
    """StartedMarks without Redis, for driving the runner directly."""

    def __init__(self) -> None:
        super().__init__(None, timedelta(minutes=1))
        self.started: dict[str, datetime] = {}

    def claim(self, lease: Lease, now: datetime) -> tuple[Claim, datetime | None]:
        if lease.task_id() in self.started:
            return Claim.STARTED, self.started[lease.task_id()]
        self.started[lease.task_id()] = now
        return Claim.FIRST, None


def make_runner(
    db_url: str, redis_url: str, functions: FunctionServer, *, check: bool = False
) -> JobRunner:
    """``check``: the pool checks a connection before handing it out, as the worker's does."""
    settings = make_settings(
        db_url, redis_url, executor="knative", knative_ingress_url=functions.url
    )
    pool: ConnectionPool[Connection] = ConnectionPool(
        db_url,
        min_size=1,
        max_size=4,
        kwargs={"autocommit": True},
        check=ConnectionPool.check_connection if check else None,
        open=True,
    )
    client = make_http_client(settings)
    runner = JobRunner(settings, pool, build_router(settings, client), MemoryMarks())
    runner.http_client = client  # closed with the runner
    return runner


def lock_job(conn: psycopg.Connection[Any], task: str, payload: Any) -> Lease:
    jobs_db = JobsDB()
    jobs_db.queue.add_job(conn, TENANT, task, payload)
    job = jobs_db.queue.get_job(conn, WORKER, None)
    assert job is not None
    return Lease.of(job)


def row(conn: psycopg.Connection[Any], job_id: int) -> tuple[Any, ...] | None:
    return conn.execute(
        "SELECT attempts, locked_by, last_error FROM app_jobs.jobs WHERE id = %s", [job_id]
    ).fetchone()
