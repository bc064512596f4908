"""Run the real stack in-process for integration tests: a Celery worker thread
(the real WorkController, threads pool) and bridge threads, over the session's
Postgres and Redis."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, TypeVar
from uuid import UUID

import psycopg
import redis
from celery import Celery
from celery import _state as celery_state
from celery.contrib.testing.worker import start_worker

from lqjobs.bridge import Bridge, CeleryPublisher
from lqjobs.celery import create_app
from lqjobs.db import JobsDB
from lqjobs.lease import TASK_NAME
from lqjobs.ops.embedded import wait_until
from lqjobs.settings import Settings

# The queue lqjobs' messages go to unless LQJOBS_QUEUE says otherwise (none of the tests does).
QUEUE: str = Settings.model_fields["queue"].default


def make_settings(db_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "broker_url": redis_url,
        "jobs_support_any": True,
        "poll_interval": 1.0,
        "http_timeout": 5.0,
        "http_connect_timeout": 1.0,
        "task_soft_time_limit": 8.0,
        "task_time_limit": 10.0,
        "visibility_timeout": 20.0,
        "max_queue_wait": 20.0,
        "job_expiry": 60.0,
        "hostname": "test-host",
    }
    values.update(overrides)
    return Settings(**values)


def flush_broker(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()


@contextlib.contextmanager
def worker(app: Celery, concurrency: int = 8) -> Iterator[Any]:
    """The real worker in a thread, cleaned up whether the test passed or failed: a
    runner left open keeps its HTTP connections, whose sockets warn when the collector
    frees them. Celery's stop of this worker does not wait for the calls still
    running, so the runner is closed once they have ended, not under them. Celery
    also keeps the app as its current and default app; handing those back frees the
    app, and reports a leak it holds, in this test rather than in the next one that
    starts a worker."""
    tasks = None
    try:
        with start_worker(
            app,
            concurrency=concurrency,
            pool="threads",
            perform_ping_check=False,
            shutdown_timeout=30,
            loglevel="WARNING",
        ) as running:
            tasks = running.pool.executor  # the thread pool's calls
            yield running
    finally:
        if tasks is not None:
            tasks.shutdown(wait=True)
        app.tasks[TASK_NAME].runners.close()
        celery_state.set_default_app(None)
        celery_state._set_current_app(None)


LoopT = TypeVar("LoopT")


@contextlib.contextmanager
def in_thread(loop: LoopT, name: str, stop_within: float) -> Iterator[LoopT]:
    """Run ``loop.run_forever()`` in a thread; on exit ``loop.stop()`` must end it in time."""
    thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.stop()
        thread.join(stop_within)
        assert not thread.is_alive(), f"{name} did not stop within {stop_within:g} s"


@contextlib.contextmanager
def bridge(settings: Settings, app: Celery, **kwargs: Any) -> Iterator[Bridge]:
    running = Bridge(settings, CeleryPublisher(app), **kwargs)
    with in_thread(running, "bridge", 10) as started:
        yield started


@contextlib.contextmanager
def stack(settings: Settings, concurrency: int = 8) -> Iterator[Bridge]:
    flush_broker(settings.broker_url.get_secret_value())
    app = create_app(settings)
    with worker(app, concurrency), bridge(settings, app) as running:
        yield running


TENANT = UUID("11111111-2222-3333-4444-555555555555")


def add_jobs(db_url: str, task: str, n: int, payload: Any = None, **kwargs: Any) -> list[int]:
    """Enqueue ``n`` jobs in one transaction; payload ``{"i": index}`` unless given."""
    jobs_db = JobsDB()
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        return [
            jobs_db.queue.add_job(
                conn, TENANT, task, {"i": i} if payload is None else payload, **kwargs
            ).id
            for i in range(n)
        ]


def count(db_url: str, where: str = "true") -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM app_jobs.jobs WHERE {where}").fetchone()
    return int(row[0]) if row else 0


def wait_for_empty_queue(db_url: str, timeout: float) -> None:
    wait_until(lambda: count(db_url) == 0, timeout, "every job to be completed")
