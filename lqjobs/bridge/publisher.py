"""Hands locked jobs to Celery: one small message per job, carrying only the lease.

The payload stays in Postgres (the task reads it during its lease check), so it
never sits in Redis or shows in Flower.

The bridge publishes a lot of identical-looking messages, so it builds each one
itself instead of going through ``app.send_task`` (which resolves routes, task
options, time zones and ``saferepr`` and fires signals for every message). The
result is the same Celery protocol-2 task message ``send_task`` would send: the
same headers (``task``, ``id``, ``shadow``, ``argsrepr``, ...),
body and properties, published through the app's pooled kombu producer, all
messages of a batch in one pipelined round trip. Only the per-message
``before_task_publish`` / ``after_task_publish`` signals are not sent; a route
that is not a plain direct queue falls back to ``send_task``.

Messages carry no ``expires`` and no broker TTL: Celery would judge expiry on the
worker's clock against the bridge's and discard the message unrun, leaving its job
locked. The task's preflight judges a late delivery on the database's clock instead.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any, Protocol

from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu.entity import Queue

from lqjobs.lease import TASK_NAME, Lease
from lqjobs.logs import escaped
from lqjobs.models import JobRow

# The fourth element of a protocol-2 body: no workflow around the task.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_CONTENT_TYPE = "application/json"
_CONTENT_ENCODING = "utf-8"


class Publisher(Protocol):
    def publish(self, jobs: Sequence[JobRow]) -> None:
        """Send one message per job; raise on any failure (the caller rolls back)."""


class CeleryPublisher:
    def __init__(self, app: Celery) -> None:
        self.app = app
        self._queue = _direct_queue(app)
        self._origin = anon_nodename()
        task = app.tasks[TASK_NAME]  # the limits lqjobs' task carries, as send_task sends them
        self._time_limits = [task.time_limit, task.soft_time_limit]
        self._encode = json.JSONEncoder(ensure_ascii=True, separators=(", ", ": ")).encode

    def publish(self, jobs: Sequence[JobRow]) -> None:
        if self._queue is None:
            self._publish_with_send_task(jobs)
            return
        queue = self._queue
        reply_to = self.app.thread_oid
        with self.app.producer_or_acquire() as producer, _pipelined(producer, len(jobs)):
            producer.maybe_declare(queue)  # cached per connection: once, not per message
            for job in jobs:
                lease = Lease.of(job)
                task_id = lease.task_id()
                database_id = str(job.database_id)
                args = lease.message_args(job.task_identifier, database_id)
                producer.publish(
                    self._encode([args, {}, _EMBED]),
                    exchange="",  # Celery's "anon exchange": straight onto the queue
                    routing_key=queue.name,
                    content_type=_CONTENT_TYPE,
                    content_encoding=_CONTENT_ENCODING,
                    headers=self._headers(job, task_id, lease.describe(database_id)),
                    delivery_mode=queue.exchange.delivery_mode or 2,
                    correlation_id=task_id,
                    reply_to=reply_to,
                    retry=False,  # fail fast: the transaction rolls back, the job stays put
                )

    def _headers(self, job: JobRow, task_id: str, argsrepr: str) -> dict[str, Any]:
        """The protocol-2 headers, as ``app.amqp.as_task_v2`` writes them."""
        return {
            "lang": "py",
            "task": TASK_NAME,
            "id": task_id,
            "shadow": shown_name(job.task_identifier),
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": self._time_limits,
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": argsrepr,
            "kwargsrepr": "{}",
            "origin": self._origin,
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        }

    def _publish_with_send_task(self, jobs: Sequence[JobRow]) -> None:
        with self.app.producer_or_acquire() as producer, _pipelined(producer, len(jobs)):
            for job in jobs:
                lease = Lease.of(job)
                self.app.send_task(
                    TASK_NAME,
                    args=lease.message_args(job.task_identifier, str(job.database_id)),
                    argsrepr=lease.describe(str(job.database_id)),
                    task_id=lease.task_id(),
                    shadow=shown_name(job.task_identifier),
                    producer=producer,
                    retry=False,
                )


def shown_name(task_identifier: str) -> str:
    """The job's task name as Flower and Celery's log lines show it (the ``shadow``
    header). Any role that may call ``add_job`` chooses it, and Celery logs it raw,
    so control characters are escaped: a newline in a name cannot forge a log line
    (docs/design.md, S3). The worker reads the name from the row, unchanged."""
    return escaped(task_identifier)


def _direct_queue(app: Celery) -> Queue | None:
    """The queue the task is routed to, when it is a plain direct queue (the usual
    case, and the only one ``send_task`` publishes straight onto the queue)."""
    route = app.amqp.router.route({}, TASK_NAME, args=(), kwargs={})
    queue = route.get("queue")
    if not isinstance(queue, Queue) or route.get("exchange") or route.get("routing_key"):
        return None
    if (queue.exchange.type or "direct") != "direct":
        return None
    return queue


def _pipelined(producer: Any, size: int) -> contextlib.AbstractContextManager[Any]:
    """kombu >= 5.7 sends a batch of publishes to Redis as one pipeline (one round
    trip) when the block exits cleanly, and discards it on an exception; older
    kombu publishes one by one."""
    batch = getattr(producer, "batch", None)
    return batch(max_size=2 * size) if batch is not None else contextlib.nullcontext()
