"""The callback service over real HTTP on 127.0.0.1, against a real database and
Redis: settling, duplicates, late and forged callbacks, the deadline reaper, the
HTTP surface, graceful stop and the ``lqjobs callback`` command."""

from __future__ import annotations

import base64
import json
import logging
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
import redis

from lqjobs.broker_state import DeferredDeadlines
from lqjobs.callback import tokens
from lqjobs.callback.parsing import MAX_BODY_BYTES, MAX_ERROR_CHARS
from lqjobs.callback.server import CallbackServer, build_server
from lqjobs.db import JobsDB
from lqjobs.lease import Lease
from lqjobs.metrics import render
from lqjobs.ops.cli import EXIT_CONFIG
from lqjobs.ops.embedded import wait_until
from lqjobs.settings import Settings
from tests.processes import Process, environment
from tests.stack import flush_broker, make_settings

pytestmark = pytest.mark.integration
TENANT = UUID("11111111-2222-3333-4444-555555555555")
WORKER = "bridge-test-host-0001"
KEYS_TEXT = "k1:" + "callback-signing-key-" * 2
KEYS = tokens.CallbackKeys.parse(KEYS_TEXT)
EXPIRY = timedelta(seconds=60)
Conn = psycopg.Connection[Any]


@pytest.fixture
def settings(db_url: str, redis_url: str) -> Settings:
    flush_broker(redis_url)  # the deadline set lives in the broker's Redis
    return make_settings(db_url, redis_url, callback_keys=KEYS_TEXT, callback_deadline=3)


@pytest.fixture
def server(settings: Settings) -> Iterator[CallbackServer]:
    running = build_server(settings, host="127.0.0.1", port=0, reaper_interval=0.1).start()
    yield running
    running.stop()


def lock(conn: Conn, worker: str = WORKER, **job: Any) -> Lease:
    jobs_db = JobsDB()
    jobs_db.queue.add_job(conn, TENANT, "async-task", {}, **job)
    row = jobs_db.queue.get_job(conn, worker, None)
    assert row is not None
    return Lease.of(row)


def post(
    server: CallbackServer,
    token: str | None,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    base = f"{server.url}/callback"
    url = base if token is None else tokens.callback_url(base, token)
    content = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
    reply = httpx.post(url, content=content, headers=headers or {}, timeout=10)
    return reply.status_code, reply.json()


def token(lease: Lease, expiry: timedelta = EXPIRY) -> str:
    return tokens.sign(KEYS, lease, expiry)


def neutral(lease: Lease) -> dict[str, str]:
    return {"x-job-id": str(lease.job_id), "x-worker-id": lease.worker_id}


def snapshot(conn: Conn) -> list[tuple[Any, ...]]:
    """Every row with its physical version: any write, even a no-op UPDATE, shows."""
    jobs = "SELECT ctid::text, xmin::text, to_jsonb(j)::text FROM app_jobs.jobs j ORDER BY id"
    queues = "SELECT ctid::text, xmin::text, to_jsonb(q)::text FROM app_jobs.job_queues q"
    return conn.execute(jobs).fetchall() + sorted(conn.execute(queues).fetchall())


def job(conn: Conn, job_id: int) -> dict[str, Any] | None:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT *, extract(epoch FROM run_at - now())::float8 AS run_in "
            "FROM app_jobs.jobs WHERE id = %s",
            [job_id],
        )
        return cur.fetchone()


# -- settling ---------------------------------------------------------------------------


def test_a_success_callback_completes_the_job(server: CallbackServer, conn: Conn) -> None:
    lease = lock(conn)
    other = lock(conn)
    assert post(server, token(lease), {"status": "success"}, neutral(lease)) == (
        200,
        {"result": "completed"},
    )
    assert job(conn, lease.job_id) is None
    assert job(conn, other.job_id) is not None  # the neighbour is untouched


def test_an_error_callback_fails_the_job_with_backoff_and_clean_text(
    server: CallbackServer, conn: Conn
) -> None:
    lease = lock(conn)
    message = "boom\r\nX-Injected: 1\x1b[2J" + "x" * 10_000
    status, reply = post(server, token(lease), {"status": "error", "error": message})
    assert (status, reply) == (200, {"result": "failed"})
    row = job(conn, lease.job_id)
    assert row is not None
    assert row["locked_by"] is None and row["attempts"] == 1
    assert 1.5 < row["run_in"] <= 2.72  # fail_job's back-off: exp(1) s after the failure
    assert row["last_error"].startswith("boom  X-Injected: 1 [2Jxxx")
    assert len(row["last_error"]) == MAX_ERROR_CHARS
    assert not any(ord(char) < 32 for char in row["last_error"])


def test_a_legacy_error_and_a_header_less_503_fail_the_token_s_job(
    server: CallbackServer, conn: Conn
) -> None:
    legacy, unreachable = lock(conn), lock(conn)
    headers = {**neutral(legacy), "X-Job-Error": "true"}
    assert post(server, token(legacy), {"message": "legacy boom"}, headers)[0] == 200
    relayed = {"X-Function-Status": "503", "X-Call-Id": "c-1", "X-Function-Name": "async-task"}
    assert post(server, token(unreachable), b"", relayed) == (200, {"result": "failed"})
    assert job(conn, legacy.job_id)["last_error"] == "legacy boom"  # type: ignore[index]
    row = job(conn, unreachable.job_id)
    assert row is not None and row["locked_by"] is None
    assert row["last_error"] == "function failed with status 503"


def test_a_relayed_4xx_fails_the_job_permanently_and_a_404_retries(
    server: CallbackServer, conn: Conn
) -> None:
    # the same classification as a synchronous call's (docs/design.md, F13)
    rejected, missing = lock(conn, max_attempts=5), lock(conn, max_attempts=5)
    for lease, status in [(rejected, "400"), (missing, "404")]:
        headers = {"X-Function-Status": status, "X-Call-Id": "c", "X-Function-Name": "async-task"}
        assert post(server, token(lease), b"no", headers) == (200, {"result": "failed"})
    parked, retried = job(conn, rejected.job_id), job(conn, missing.job_id)
    assert parked is not None and retried is not None
    assert (parked["attempts"], parked["locked_by"]) == (5, None)
    assert parked["last_error"] == "function failed with status 400: no"
    assert (retried["attempts"], retried["locked_by"]) == (1, None)
    assert retried["last_error"] == "function failed with status 404: no"


def test_a_relayed_reply_is_judged_by_its_status_not_by_its_body(
    server: CallbackServer, conn: Conn
) -> None:
    """The queue-worker relays the function's reply: a 500 whose body claims success
    fails the job, and a 200 whose body says error completes it, as the same replies
    to a synchronous call would."""
    claims_success, claims_error = lock(conn, max_attempts=5), lock(conn, max_attempts=5)
    relay = {"X-Call-Id": "c", "X-Function-Name": "async-task"}
    failing = {**relay, "X-Function-Status": "500"}
    assert post(server, token(claims_success), {"status": "success"}, failing) == (
        200,
        {"result": "failed"},
    )
    succeeding = {**relay, "X-Function-Status": "200"}
    assert post(server, token(claims_error), {"status": "error"}, succeeding) == (
        200,
        {"result": "completed"},
    )
    failed = job(conn, claims_success.job_id)
    assert failed is not None and failed["locked_by"] is None
    assert failed["last_error"] == "function failed with status 500"
    assert job(conn, claims_error.job_id) is None


# -- duplicates and late callbacks --------------------------------------------------------


def test_a_duplicate_is_already_settled_and_writes_nothing(
    server: CallbackServer, conn: Conn
) -> None:
    done, failed = lock(conn), lock(conn)
    assert post(server, token(done), {"status": "success"})[0] == 200
    assert post(server, token(failed), {"status": "error", "error": "e"})[0] == 200
    before = snapshot(conn)
    for lease, outcome in [(done, "success"), (failed, "error"), (failed, "success")]:
        status, reply = post(server, token(lease), {"status": outcome}, neutral(lease))
        assert (status, reply) == (200, {"result": "already_settled"})
    # A success after a failure would, unfenced, delete the job waiting for its retry.
    assert snapshot(conn) == before
    assert server.service.counters["already_settled"] == 3
    assert 'lqjobs_callbacks_total{result="already_settled"} 3' in render(server.service.metrics())


def test_concurrent_duplicates_settle_once(server: CallbackServer, conn: Conn) -> None:
    lease = lock(conn)
    results: list[str] = []

    def send() -> None:
        results.append(post(server, token(lease), {"status": "success"})[1]["result"])

    threads = [threading.Thread(target=send) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(results) == ["already_settled"] * 11 + ["completed"]


def test_a_late_callback_for_a_re_leased_job_is_409_and_writes_nothing(
    server: CallbackServer, conn: Conn
) -> None:
    old = lock(conn)
    jobs_db = JobsDB()
    # The old lease's lock expires and another bridge re-picks the job.
    row = jobs_db.queue.get_job(conn, "bridge-other-0002", None, timedelta(microseconds=1))
    assert row is not None and row.id == old.job_id and row.attempts == 2
    before = snapshot(conn)
    for outcome in ("success", "error"):
        status, reply = post(server, token(old), {"status": outcome}, neutral(old))
        assert (status, reply) == (409, {"error": "stale_lease"})
    assert snapshot(conn) == before
    # Negative control: the unfenced complete_job the Node runtime issues for the
    # same late callback deletes the job that the new attempt is running.
    jobs_db.queue.complete_job(conn, old.worker_id, old.job_id)
    assert job(conn, old.job_id) is None


def test_a_late_callback_after_fail_and_retry_is_409(server: CallbackServer, conn: Conn) -> None:
    first = lock(conn)
    assert post(server, token(first), {"status": "error", "error": "e"})[0] == 200
    conn.execute("UPDATE app_jobs.jobs SET run_at = now() WHERE id = %s", [first.job_id])
    second = Lease.of(JobsDB().queue.get_job(conn, WORKER, None))  # type: ignore[arg-type]
    assert (second.job_id, second.attempts) == (first.job_id, 2)
    before = snapshot(conn)
    assert post(server, token(first), {"status": "success"})[0] == 409
    assert snapshot(conn) == before
    assert post(server, token(second), {"status": "success"})[1] == {"result": "completed"}


def test_an_intermediate_openfaas_retry_is_ignored(server: CallbackServer, conn: Conn) -> None:
    lease = lock(conn)
    before = snapshot(conn)
    headers = {"X-Function-Status": "429", "X-Retry": "2", "X-Retry-Max": "5"}
    assert post(server, token(lease), b"busy", headers) == (200, {"result": "ignored_retry"})
    assert snapshot(conn) == before


# -- forged callbacks ------------------------------------------------------------------------


class CountingPool:
    """Counts checkouts of the service's pool: 0 means no database access at all."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.checkouts = 0

    def connection(self, *args: Any, **kwargs: Any) -> Any:
        self.checkouts += 1
        return self.pool.connection(*args, **kwargs)

    def close(self) -> None:
        self.pool.close()


def flip_bit(text: str) -> str:
    """The token with one bit of its signature flipped."""
    head, _, mac = text.rpartition(".")
    raw = bytearray(base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4)))
    raw[0] ^= 0x01
    return f"{head}.{base64.urlsafe_b64encode(bytes(raw)).rstrip(b'=').decode()}"


def test_forged_callbacks_are_refused_before_any_database_access(
    server: CallbackServer, conn: Conn
) -> None:
    a, b = lock(conn), lock(conn)
    pool = CountingPool(server.service.pool)
    server.service.pool = pool  # type: ignore[assignment]
    before = snapshot(conn)
    cases: list[tuple[str | None, Any, dict[str, str], int]] = [
        (None, {"status": "success"}, neutral(b), 401),
        ("not-a-token", {"status": "success"}, neutral(b), 401),
        (token(a), {"status": "success"}, neutral(b), 401),  # A's token, B's headers
        (token(a), {"status": "success"}, {"x-worker-id": "bridge-other-0002"}, 401),
        (flip_bit(token(b)), {"status": "success"}, neutral(b), 401),
        (token(b).replace("v1.k1.", "v1.k9."), {"status": "success"}, {}, 401),
        (token(b), b"{not json", neutral(b), 400),
        (token(b), b"[1, 2, 3]", neutral(b), 400),
        (token(b), {"status": "maybe"}, neutral(b), 400),
        (token(b), {}, {"x-job-id": "12abc"}, 400),
    ]
    for given, body, headers, expected in cases:
        assert post(server, given, body, headers)[0] == expected, (given, body, headers)
    assert raw_post(server, token(b), b"", content_length=MAX_BODY_BYTES + 1).startswith(
        b"HTTP/1.1 413"
    )
    assert pool.checkouts == 0
    assert snapshot(conn) == before
    counters = server.service.counters
    assert (counters["unauthorized"], counters["bad_request"], counters["too_large"]) == (6, 4, 1)


def test_an_expired_token_is_refused_by_the_database_clock(
    server: CallbackServer, conn: Conn
) -> None:
    lease = lock(conn)
    before = snapshot(conn)
    expired = token(lease, timedelta(seconds=-1))
    assert post(server, expired, {"status": "success"}) == (401, {"error": "token_expired"})
    assert snapshot(conn) == before
    assert post(server, token(lease), {"status": "success"})[0] == 200  # the lease was fine


def raw_post(server: CallbackServer, token: str, body: bytes, content_length: int) -> bytes:
    """A POST whose Content-Length announces ``content_length`` bytes, of which only
    ``body`` is sent; returns whatever the server answers before closing."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        head = (
            f"POST /callback?token={token} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_logs_never_hold_tokens_query_strings_or_bodies(
    server: CallbackServer, conn: Conn, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    lease = lock(conn)
    genuine = token(lease)
    post(server, "CANARY-token", {"status": "success"})
    post(server, genuine, b'{"CANARY-body": ', neutral(lease))
    post(server, genuine, {"status": "error", "error": "CANARY-error"}, neutral(lease))
    ours = [record for record in caplog.records if record.name.startswith("lqjobs")]
    logged = "\n".join(f"{record.getMessage()} {vars(record)}" for record in ours)
    assert "CANARY" not in logged and genuine not in logged and "token=" not in logged
    actions = [(getattr(r, "action", None), getattr(r, "job_id", None)) for r in ours]
    assert ("callback_failed", lease.job_id) in actions
    assert ("callback_unauthorized", None) in actions


# -- the HTTP surface -------------------------------------------------------------------------


def test_healthz_and_nothing_else(server: CallbackServer) -> None:
    health = httpx.get(f"{server.url}/healthz", timeout=10)
    assert (health.status_code, health.json()) == (200, {"result": "ok"})
    for method, path in [
        ("GET", "/callback"),
        ("POST", "/"),
        ("POST", "/callback/x"),
        ("PUT", "/callback"),
        ("DELETE", "/callback"),
        ("PATCH", "/healthz"),
        ("BREW", "/callback"),
    ]:
        reply = httpx.request(method, f"{server.url}{path}", timeout=10)
        assert reply.status_code == 404, (method, path)


def test_healthz_is_503_without_a_database(pg_url: str, redis_url: str) -> None:
    gone = psycopg.conninfo.make_conninfo(pg_url, dbname="lqjobs_no_such_database")
    broken = make_settings(gone, redis_url, callback_keys=KEYS_TEXT)
    running = build_server(broken, host="127.0.0.1", port=0).start()
    try:
        reply = httpx.get(f"{running.url}/healthz", timeout=10)
        assert reply.status_code == 503
    finally:
        running.stop()


def test_stop_drains_a_request_in_flight(
    server: CallbackServer, conn: Conn, connect: Callable[[], Conn]
) -> None:
    lease = lock(conn)
    blocker = connect()
    blocker.execute("BEGIN")
    blocker.execute("SELECT 1 FROM app_jobs.jobs WHERE id = %s FOR UPDATE", [lease.job_id])
    answers: list[tuple[int, dict[str, Any]]] = []
    sender = threading.Thread(
        target=lambda: answers.append(post(server, token(lease), {"status": "success"}))
    )
    sender.start()
    wait_until(lambda: lock_waiters(conn) == 1, 10, "the callback to wait on the row lock")
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    wait_until(lambda: refused(server.url), 10, "the listening socket to close")
    assert stopper.is_alive() and not answers  # stopped accepting, still draining
    blocker.execute("COMMIT")
    stopper.join(10)
    sender.join(10)
    assert not stopper.is_alive()
    assert answers == [(200, {"result": "completed"})]
    assert job(conn, lease.job_id) is None


def lock_waiters(conn: Conn) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
    ).fetchone()
    return int(row[0]) if row else 0


def refused(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except (ConnectionRefusedError, ConnectionResetError):  # reset: closed mid-handshake
        return True
    return False


# -- the deadline reaper ------------------------------------------------------------------------


def test_the_reaper_fails_an_overdue_deferred_job(
    server: CallbackServer, conn: Conn, redis_url: str
) -> None:
    overdue, answered = lock(conn), lock(conn)
    deadlines = DeferredDeadlines(redis.Redis.from_url(redis_url))
    deadlines.record(answered, 30)
    assert post(server, token(answered), {"status": "success"})[0] == 200
    assert deadlines.pending() == 0  # the callback removed its own deadline
    deadlines.record(overdue, 0.2)

    def overdue_failed() -> bool:
        row = job(conn, overdue.job_id)
        return row is not None and row["locked_by"] is None

    wait_until(overdue_failed, 10, "the reaper to fail the overdue job")
    row = job(conn, overdue.job_id)
    assert row is not None and row["last_error"] == "callback not received within 3s"
    assert row["attempts"] == 1 and row["run_in"] > 1  # backed off, will run again
    assert deadlines.pending() == 0
    deadlines.client.close()


def test_a_deadline_for_a_settled_job_is_a_no_op(
    server: CallbackServer, conn: Conn, redis_url: str
) -> None:
    lease = lock(conn)
    assert post(server, token(lease), {"status": "error", "error": "e"})[0] == 200
    before = snapshot(conn)
    deadlines = DeferredDeadlines(redis.Redis.from_url(redis_url))
    deadlines.record(lease, 0)  # recorded after the callback already settled the job
    wait_until(lambda: server.service.counters["deadline_moot"] == 1, 10, "the reaper")
    assert snapshot(conn) == before
    assert server.service.counters["deadline_failed"] == 0
    deadlines.client.close()


# -- the command --------------------------------------------------------------------------------


def test_the_command_refuses_to_start_without_keys(db_url: str, redis_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lqjobs", "callback"],
        env=environment(db_url, redis_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.count("\n") == 1 and "LQJOBS_CALLBACK_KEYS" in done.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_command_serves_until_sigterm(db_url: str, redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = environment(db_url, redis_url, LQJOBS_CALLBACK_KEYS=KEYS_TEXT)
    argv = [sys.executable, "-m", "lqjobs", "callback", "--host", "127.0.0.1", "--port", str(port)]
    process = Process("callback", argv, env, tmp_path)
    try:
        wait_until(lambda: healthy(port), 20, "the callback service to answer /healthz")
        process.signal(signal.SIGTERM)
        assert process.wait(10) == 0
    finally:
        process.stop()
    output = process.output()
    assert "callback_started" in output and "callback_stopped" in output
    assert KEYS_TEXT.split(":", 1)[1] not in output


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
