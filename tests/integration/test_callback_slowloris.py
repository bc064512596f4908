"""The callback service under slow and crowding clients, over real sockets on 127.0.0.1
with a real database (docs/design.md, S8): one deadline over each whole request, a cap
on connections that a slowloris cannot use to shut genuine callbacks out, threads
that do not grow with connections, and a stop whose drain is bounded."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from lqjobs.callback.server import CallbackServer, build_server
from lqjobs.metrics import render
from lqjobs.ops.embedded import wait_until
from lqjobs.settings import Settings
from tests.integration.test_callback import (
    KEYS_TEXT,
    free_port,
    healthy,
    job,
    lock,
    lock_waiters,
    read_all,
    refused,
    token,
)
from tests.processes import Process, environment
from tests.slowloris import SlowClients, server_connections, server_sockets, thread_count
from tests.stack import flush_broker, make_settings

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]
Conn = psycopg.Connection[Any]
DEADLINE = 3.0  # LQJOBS_CALLBACK_REQUEST_TIMEOUT in these tests
CAP = 32  # LQJOBS_CALLBACK_MAX_CONNECTIONS
DRAIN = 4.0  # LQJOBS_CALLBACK_DRAIN_TIMEOUT
SLACK = 1.0  # how late past a bound the server may act (loop, scheduling, 2 cores)


@pytest.fixture
def settings(db_url: str, redis_url: str) -> Settings:
    flush_broker(redis_url)
    return make_settings(
        db_url,
        redis_url,
        callback_keys=KEYS_TEXT,
        callback_deadline=30,
        callback_request_timeout=DEADLINE,
        callback_max_connections=CAP,
        callback_drain_timeout=DRAIN,
    )


@pytest.fixture
def server(settings: Settings) -> Iterator[CallbackServer]:
    running = build_server(settings, host="127.0.0.1", port=0, reaper_interval=0.5).start()
    yield running
    running.stop()


def port_of(server: CallbackServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def callback(server: CallbackServer, conn: Conn, timeout: float) -> tuple[int, Any, float]:
    """A well-formed success callback for a freshly locked job: status, reply, seconds."""
    lease = lock(conn)
    url = f"{server.url}/callback?token={token(lease)}"
    started = time.monotonic()
    reply = httpx.post(url, json={"status": "success"}, timeout=timeout)
    return reply.status_code, reply.json(), time.monotonic() - started


def test_slow_clients_are_cut_at_one_deadline_over_head_and_body(
    server: CallbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # half never end their head; half end it after 2 s and trickle the body: a timeout
    # per phase (or per read) would let those run past the deadline
    clients = SlowClients("127.0.0.1", port_of(server), 20, lifetime=30, head_ticks=(None, 1))
    with clients:
        wait_until(lambda: clients.open_count() == 0, DEADLINE + 10, "every slow client cut")
        lifetimes = [c.lifetime for c in clients.snapshot()]
        body_phase = [c for c in clients.snapshot() if c.in_body]
    assert max(lifetimes) <= DEADLINE + SLACK, lifetimes
    assert min(lifetimes) >= DEADLINE - 0.2, lifetimes  # the deadline cut them, not a cap
    assert len(body_phase) == 10  # the mixed ones did reach their body
    assert_logged_without_canaries(caplog, "callback_connections_cut")


def test_a_malformed_head_is_a_400_and_its_text_is_never_logged(
    server: CallbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    head = b"POST /callback?token=CANARY-1 HTTP/1.1\r\nHost: x\r\nCANARY header\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(head)
        reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert reply.endswith(b'{"error": "bad_request"}')
    assert_logged_without_canaries(caplog, "callback_bad_request")


def assert_logged_without_canaries(caplog: pytest.LogCaptureFixture, action: str) -> None:
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert "CANARY" not in logged
    assert action in [getattr(r, "action", None) for r in caplog.records]


def test_a_callback_succeeds_while_slowloris_fills_the_cap(
    server: CallbackServer, conn: Conn
) -> None:
    # twice the cap, re-opened as soon as they are closed: every slot stays taken
    clients = SlowClients("127.0.0.1", port_of(server), 2 * CAP, lifetime=30, reconnect=True)
    with clients:
        wait_until(lambda: server_connections(port_of(server)) >= CAP, 5, "the cap filled")
        answers = [callback(server, conn, timeout=5) for _ in range(5)]
    for status, reply, seconds in answers:
        assert (status, reply) == (200, {"result": "completed"})
        assert seconds < SLACK, answers


def test_connections_over_the_cap_are_closed_and_threads_stay_flat(
    server: CallbackServer, conn: Conn
) -> None:
    assert callback(server, conn, timeout=5)[0] == 200  # a worker thread exists
    threads = thread_count()
    port = port_of(server)
    most: list[tuple[str, str]] = []
    clients = SlowClients("127.0.0.1", port, 4 * CAP, lifetime=30)
    with clients:
        threads += 1  # the slow clients' own thread
        wait_until(lambda: clients.open_count() <= CAP, SLACK, "the excess closed")

        def trickled() -> bool:
            nonlocal most
            held = server_sockets(port)
            most = held if len(held) > len(most) else most
            assert thread_count() == threads
            return min(c.sent for c in clients.snapshot() if c.closed is None) >= 2

        wait_until(trickled, DEADLINE, "the survivors to trickle")
        assert clients.open_count() == CAP  # the newest: each arrival evicted the oldest
        evicted = f'lqjobs_callback_connections_cut_total{{reason="evicted"}} {3 * CAP}'
        assert evicted in render(server.metrics())
    assert len(most) <= CAP, most
    assert thread_count() == threads - 1


def test_stop_drains_in_bounded_time_with_slow_clients_and_finishes_in_flight(
    settings: Settings, conn: Conn, connect: Callable[[], Conn]
) -> None:
    running = build_server(
        settings.model_copy(update={"callback_request_timeout": 60.0}), host="127.0.0.1", port=0
    ).start()
    try:
        lease = lock(conn)
        blocker = connect()
        blocker.execute("BEGIN")
        blocker.execute("SELECT 1 FROM app_jobs.jobs WHERE id = %s FOR UPDATE", [lease.job_id])
        answers: list[tuple[int, Any]] = []

        def send() -> None:
            reply = httpx.post(
                f"{running.url}/callback?token={token(lease)}", json={"status": "success"}
            )
            answers.append((reply.status_code, reply.json()))

        sender = threading.Thread(target=send)
        with SlowClients("127.0.0.1", port_of(running), CAP // 2, lifetime=60):
            sender.start()
            wait_until(lambda: lock_waiters(conn) == 1, 10, "the callback to wait on the row")
            started = time.monotonic()
            stopper = threading.Thread(target=running.stop)
            stopper.start()
            wait_until(lambda: refused(running.url), 5, "the listening socket to close")
            blocker.execute("COMMIT")  # the request in flight may now finish
            stopper.join(DRAIN + 10)
            stopped = time.monotonic() - started
        sender.join(10)
    finally:
        running.stop()
    assert not stopper.is_alive() and stopped <= DRAIN + SLACK, stopped
    assert answers == [(200, {"result": "completed"})]
    assert job(conn, lease.job_id) is None


def test_sigterm_exits_within_the_drain_bound_under_slowloris(
    db_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = environment(
        db_url,
        redis_url,
        LQJOBS_CALLBACK_KEYS=KEYS_TEXT,
        LQJOBS_CALLBACK_REQUEST_TIMEOUT="60",  # the drain, not the deadline, must end it
        LQJOBS_CALLBACK_MAX_CONNECTIONS=str(CAP),
        LQJOBS_CALLBACK_DRAIN_TIMEOUT=str(DRAIN),
    )
    argv = [sys.executable, "-m", "lqjobs", "callback", "--host", "127.0.0.1", "--port", str(port)]
    process = Process("callback", argv, env, tmp_path)
    try:
        wait_until(lambda: healthy(port), 20, "the callback service to answer /healthz")
        idle = thread_count(process.proc.pid)
        with SlowClients("127.0.0.1", port, 2 * CAP, lifetime=60) as clients:
            wait_until(lambda: clients.open_count() <= CAP, SLACK, "the excess closed")
            assert thread_count(process.proc.pid) == idle
            started = time.monotonic()
            process.signal(signal.SIGTERM)
            code = process.wait(DRAIN + 10)
            stopped = time.monotonic() - started
    finally:
        process.stop()
    # the signal is seen within a second (run_forever's wait), then the drain bound
    assert code == 0 and stopped <= 1 + DRAIN + SLACK, stopped
    assert "callback_stopped" in process.output()
