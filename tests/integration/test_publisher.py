"""The bridge's publisher builds Celery protocol-2 task messages itself (no
``send_task`` per job): they must be the messages ``send_task`` would send, and
a real worker must run them and report them, under the job's task name, in the
events Flower reads."""

from __future__ import annotations

import base64
import json
import threading
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
import redis
from celery import Celery

from lqjobs.bridge import Bridge, CeleryPublisher
from lqjobs.bridge.publisher import _direct_queue
from lqjobs.celery import create_app
from lqjobs.lease import Lease
from lqjobs.models import JobRow
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests.stack import QUEUE, add_jobs, count, flush_broker, make_settings, worker
from tests.stack import TENANT as STACK_TENANT

pytestmark = pytest.mark.integration
TENANT = UUID("0b0b0b0b-1111-2222-3333-444444444444")


def job_row(job_id: int, task: str = "send-email") -> JobRow:
    now = datetime.now(UTC)
    return JobRow.model_validate(
        {
            "id": job_id,
            "database_id": TENANT,
            "queue_name": None,
            "task_identifier": task,
            "payload": "{}",
            "priority": 0,
            "run_at": now,
            "attempts": 1,
            "max_attempts": 25,
            "key": None,
            "last_error": None,
            "locked_at": now,
            "locked_by": "bridge-test-host-0000",
            "created_at": now,
            "updated_at": now,
        }
    )


def raw_messages(redis_url: str, queue: str = QUEUE) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    try:
        messages = [json.loads(m) for m in reversed(client.lrange(queue, 0, -1))]
    finally:
        client.close()
    for message in messages:
        message["body"] = json.loads(base64.b64decode(message["body"]))
    return messages


def test_a_direct_message_is_the_message_send_task_sends(redis_url: str) -> None:
    flush_broker(redis_url)
    app = create_app(make_settings("postgresql://nobody@127.0.0.1/none", redis_url))
    publisher = CeleryPublisher(app)
    job = job_row(7)
    publisher.publish([job])
    publisher._publish_with_send_task([job])
    direct, reference = raw_messages(redis_url)
    for message in (direct, reference):
        # No expiry: a worker must never judge a lease's age on its own clock.
        assert message["headers"]["expires"] is None
        assert "expiration" not in message["properties"]
        message["properties"].pop("delivery_tag")  # unique per message
    reference["properties"].pop("argsrepr")  # a stray copy send_task leaves there
    assert direct == reference
    assert direct["headers"]["id"] == Lease.of(job).task_id()
    assert direct["headers"]["shadow"] == "send-email"


def test_the_shown_name_is_escaped_and_the_argument_is_the_job_s_own(redis_url: str) -> None:
    """Celery logs the ``shadow`` header and Flower shows it: a newline or an ANSI
    escape in a task name is escaped there (docs/design.md, S3); the task argument
    keeps the name as the row has it."""
    flush_broker(redis_url)
    app = create_app(make_settings("postgresql://nobody@127.0.0.1/none", redis_url))
    publisher = CeleryPublisher(app)
    hostile = "fine\n[2026-01-01 00:00:00,000: ERROR/MainProcess] forged\x1b[31m"
    publisher.publish([job_row(9, hostile)])
    publisher._publish_with_send_task([job_row(10, hostile)])
    for message in raw_messages(redis_url):
        shown = "fine\\n[2026-01-01 00:00:00,000: ERROR/MainProcess] forged\\x1b[31m"
        assert message["headers"]["shadow"] == shown
        assert message["body"][0][4] == hostile


def test_routes_are_honoured(redis_url: str) -> None:
    settings = make_settings("postgresql://nobody@127.0.0.1/none", redis_url)
    flush_broker(redis_url)
    routed = create_app(settings)
    routed.conf.task_routes = {"lqjobs.run_job": {"queue": "jobs"}}
    job = job_row(8)
    CeleryPublisher(routed).publish([job])
    messages = raw_messages(redis_url, "jobs")
    assert [m["headers"]["id"] for m in messages] == [Lease.of(job).task_id()]
    unusual = create_app(settings)  # not a plain direct queue: send_task does it
    unusual.conf.task_routes = {"lqjobs.run_job": {"exchange": "jobs", "routing_key": "run"}}
    assert _direct_queue(unusual) is None


def test_a_real_worker_runs_direct_messages_and_reports_them(db_url: str, redis_url: str) -> None:
    """What Flower shows comes from these worker events: the job's task name (the
    ``shadow`` header), the task id and the arguments' description."""
    flush_broker(redis_url)
    with FunctionServer() as functions:
        settings = make_settings(
            db_url, redis_url, executor="knative", knative_ingress_url=functions.url
        )
        app = create_app(settings)
        events: list[dict[str, Any]] = []
        stop = threading.Event()
        listening = threading.Event()

        def listen(monitor: Celery) -> None:
            with monitor.connection() as conn:
                receiver = monitor.events.Receiver(conn, handlers={"*": events.append})
                listening.set()
                for _ in receiver.itercapture(limit=None, timeout=0.2, wakeup=False):
                    if stop.is_set():
                        return

        listener = threading.Thread(target=_swallow_timeouts(listen), args=(app,), daemon=True)
        listener.start()
        listening.wait(5)
        ids = add_jobs(db_url, "resize-avatar", 3, {"i": 1})
        with worker(app, concurrency=2):
            bridge = Bridge(settings, CeleryPublisher(app))
            try:
                assert bridge.run_once() == 3
            finally:
                bridge.stop()
                bridge._close()
            wait_until(lambda: count(db_url) == 0, 20, "the jobs to complete")
            wait_until(
                lambda: sum(e["type"] == "task-succeeded" for e in events) >= 3,
                10,
                "the task-succeeded events",
            )
        stop.set()
        listener.join(5)
    assert sorted(call.job_id for call in functions.calls.all()) == ids
    received = {e["uuid"]: e for e in events if e["type"] == "task-received"}
    assert len(received) == 3
    for event in received.values():
        assert event["name"] == "resize-avatar"
        job_id = int(event["uuid"].split("-")[1])
        assert job_id in ids
        assert event["args"] == f"job_id={job_id} attempt=1 database_id={STACK_TENANT}"
        assert event["expires"] is None


def _swallow_timeouts(listen: Any) -> Any:
    def run(app: Celery) -> None:

        while True:
            try:
                listen(app)
                return
            except TimeoutError:
                continue

    return run
