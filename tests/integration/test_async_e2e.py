"""Asynchronous OpenFaaS functions end to end: bridge -> Redis -> real Celery worker
-> the gateway fake's /async-function (202) -> its queue-worker POSTs the result ->
a proxy that delivers every callback twice -> the callback service -> fenced
complete_job / fail_job. Plus the header-less 503 of an unreachable function and
the deadline reaper for callbacks that never come."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from uuid import UUID

import httpx
import psycopg
import pytest
import redis

from lqjobs.broker_state import DeferredDeadlines
from lqjobs.callback.server import build_server
from lqjobs.db import JobsDB
from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.settings import Settings
from tests.stack import count, flush_broker, make_settings, stack, wait_for_empty_queue

pytestmark = pytest.mark.integration
TENANT = UUID("11111111-2222-3333-4444-555555555555")
KEYS_TEXT = "k1:" + "async-callback-signing-key" * 2
_HOP_BY_HOP = {"host", "connection", "content-length", "transfer-encoding", "accept-encoding"}


class Replayer:
    """Delivers every callback it receives ``copies`` times to the callback service
    and answers with the first reply; ``deliveries`` holds each callback's results."""

    def __init__(self, target: str, copies: int = 2) -> None:
        self.target = target
        self.copies = copies
        self.deliveries: list[list[str]] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=10)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ReplayHandler)
        self._httpd.daemon_threads = True
        self._httpd.replayer = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def forward(self, path: str, headers: dict[str, str], body: bytes) -> httpx.Response:
        replies = [
            self._client.post(f"{self.target}{path}", content=body, headers=headers)
            for _ in range(self.copies)
        ]
        with self._lock:
            self.deliveries.append([reply.json().get("result", "") for reply in replies])
        return replies[0]

    def delivered(self) -> int:
        with self._lock:
            return len(self.deliveries)

    def __enter__(self) -> Replayer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._client.close()


class _ReplayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        replayer = cast(Replayer, self.server.replayer)  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        reply = replayer.forward(self.path, headers, body)
        self.send_response(reply.status_code)
        self.send_header("Content-Length", str(len(reply.content)))
        self.end_headers()
        self.wfile.write(reply.content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def callback_chain(db_url: str, redis_url: str, **overrides: Any) -> Iterator[tuple[Any, ...]]:
    """Function gateway fake, callback service and replaying proxy, plus the settings
    that point the stack at them."""
    flush_broker(redis_url)
    base = make_settings(db_url, redis_url, callback_keys=KEYS_TEXT, **overrides)
    service = build_server(base, host="127.0.0.1", port=0, reaper_interval=0.2).start()
    try:
        with FunctionServer() as functions, Replayer(service.url) as replayer:
            settings = make_settings(
                db_url,
                redis_url,
                callback_keys=KEYS_TEXT,
                executor="openfaas-async",
                internal_gateway_url=functions.url,
                internal_jobs_callback_url=f"{replayer.url}/callback",
                **overrides,
            )
            yield settings, service, functions, replayer
    finally:
        service.stop()


def add_jobs(db_url: str, n: int, payload: dict[str, Any], **kwargs: Any) -> list[int]:
    jobs_db = JobsDB()
    with psycopg.connect(db_url, autocommit=True) as conn, conn.transaction():
        return [
            jobs_db.queue.add_job(conn, TENANT, "async-fn", {**payload, "i": i}, **kwargs).id
            for i in range(n)
        ]


def errors(db_url: str, job_ids: list[int]) -> dict[int, str | None]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, last_error FROM app_jobs.jobs WHERE id = ANY(%s) AND locked_by IS NULL",
            [job_ids],
        ).fetchall()
    return {row[0]: row[1] for row in rows}


def pending_deadlines(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.broker_url.get_secret_value())
    try:
        return DeferredDeadlines(client).pending()
    finally:
        client.close()


def test_500_async_jobs_settle_once_each_despite_duplicated_callbacks(
    db_url: str, redis_url: str
) -> None:
    job_ids = add_jobs(db_url, 500, {})
    chain = callback_chain(db_url, redis_url, callback_deadline=5)
    with chain as (settings, service, functions, replayer), stack(settings):
        wait_for_empty_queue(db_url, timeout=45)
        wait_until(lambda: replayer.delivered() == 500, 10, "every callback to be replayed")
        # A deadline recorded after its callback already settled the job is reaped as a
        # no-op; none is left behind and none fails a job.
        wait_until(lambda: pending_deadlines(settings) == 0, 15, "the deadlines to clear")
    calls = Counter(call.job_id for call in functions.calls.all())
    assert calls == Counter(dict.fromkeys(job_ids, 1))  # one function call per job
    assert {call.route for call in functions.calls.all()} == {"openfaas-async"}
    assert {call.callback_status for call in functions.calls.all()} == {200}
    assert Counter(tuple(results) for results in replayer.deliveries) == {
        ("completed", "already_settled"): 500
    }
    counters = service.service.counters
    assert counters["completed"] == 500 and counters["already_settled"] == 500
    assert counters["deadline_failed"] == 0
    assert not {"stale_lease", "unauthorized", "token_expired", "bad_request"} & set(counters)


def test_unreachable_and_silent_functions_fail_the_right_jobs_before_expiry(
    db_url: str, redis_url: str
) -> None:
    fine = add_jobs(db_url, 20, {})
    unreachable = add_jobs(db_url, 20, {"unreachable": True}, max_attempts=1)
    legacy = add_jobs(db_url, 20, {"legacy": True, "error": "legacy failure"}, max_attempts=1)
    silent = add_jobs(db_url, 20, {"drop_callback": True}, max_attempts=1)
    chain = callback_chain(db_url, redis_url, callback_deadline=3)
    with chain as (settings, service, functions, _), stack(settings):
        started = time.monotonic()
        wait_until(lambda: count(db_url) == 60, 20, "the fine jobs to complete")
        wait_until(
            lambda: count(db_url, "locked_by IS NULL") == 60, 20, "every failure to be recorded"
        )
        # Well before the lock expiry: the 503 callbacks at once, the silent jobs at
        # their 3 s deadline.
        assert time.monotonic() - started < settings.job_expiry / 4
    assert errors(db_url, unreachable) == dict.fromkeys(
        unreachable, "function failed with status 503"
    )
    assert errors(db_url, legacy) == dict.fromkeys(legacy, "legacy failure")
    assert errors(db_url, silent) == dict.fromkeys(silent, "callback not received within 3s")
    assert count(db_url, "locked_by IS NOT NULL") == 0
    assert count(db_url, "attempts <> 1") == 0  # each failure recorded once, never retried
    calls = Counter(call.job_id for call in functions.calls.all())
    assert calls == Counter(dict.fromkeys(fine + legacy + silent, 1))
    counters = service.service.counters
    assert counters["completed"] == 20 and counters["failed"] == 40
    assert counters["deadline_failed"] == 20
