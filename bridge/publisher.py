"""Hands locked jobs to Celery: one small message per job, carrying only the lease.

The payload stays in Postgres (the task reads it during its lease check), so it
never sits in Redis or shows in Flower.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

from celery import Celery

from lqjobs.lease import Lease
from lqjobs.models import JobRow
from tasks.run_job import TASK_NAME


class Publisher(Protocol):
    def publish(self, jobs: Sequence[JobRow]) -> None:
        """Send one message per job; raise on any failure (the caller rolls back)."""


class CeleryPublisher:
    def __init__(self, app: Celery, expires_seconds: float) -> None:
        self.app = app
        self.expires_seconds = expires_seconds  # a late delivery must not start a call

    def publish(self, jobs: Sequence[JobRow]) -> None:
        with self.app.producer_or_acquire() as producer, _pipelined(producer, len(jobs)):
            for job in jobs:
                lease = Lease.of(job)
                self.app.send_task(
                    TASK_NAME,
                    args=lease.message_args(job.task_identifier, str(job.database_id)),
                    argsrepr=lease.describe(str(job.database_id)),
                    task_id=lease.task_id(),
                    shadow=job.task_identifier,  # Flower and logs show the job's task
                    expires=self.expires_seconds,
                    producer=producer,
                    retry=False,  # fail fast: the transaction rolls back, the job stays put
                )


def _pipelined(producer: Any, size: int) -> contextlib.AbstractContextManager[Any]:
    """kombu >= 5.7 sends a batch of publishes to Redis as one pipeline (one round
    trip) when the block exits cleanly, and discards it on an exception; older
    kombu publishes one by one."""
    batch = getattr(producer, "batch", None)
    return batch(max_size=2 * size) if batch is not None else contextlib.nullcontext()
