"""Executors over real HTTP against the fake platforms in ``lqjobs.example_functions``.

A callback receiver stands in for the lqjobs callback server; a canary listener
on 127.0.0.2 stands in for an attacker's host and must never be reached.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from lqjobs.executors import (
    Deferred,
    DevMapExecutor,
    Done,
    Failed,
    FunctionClient,
    Invocation,
    JobExecutor,
    KnativeExecutor,
    OpenFaaSExecutor,
    make_http_client,
)
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.settings import Settings

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]

DB_ID = "5b5a1e4e-0b7e-4f69-9a3e-1f1d8a2b7c11"
TOKEN_QUERY = "token=v1.k1.abc.def"


# -- helpers --------------------------------------------------------------------------


class CallbackReceiver:
    """Records every POST it gets, like the lqjobs callback server would see it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver._changed:
                    receiver.requests.append((self.path, headers, body))
                    receiver._changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/callback?{TOKEN_QUERY}"

    def wait_for(self, n: int, timeout: float = 5.0) -> list[tuple[str, dict[str, str], bytes]]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.requests) >= n, timeout), self.requests
            return list(self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class Canary:
    """A listener on 127.0.0.2: any connection it has accepted is an escaped request."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.2", 0))
        self._socket.listen(64)
        self._socket.setblocking(False)
        self.port = self._socket.getsockname()[1]
        self._hits = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.2:{self.port}/steal"

    def hits(self) -> int:
        """Connections made so far (the kernel completes them before accept)."""
        while True:
            try:
                connection, _ = self._socket.accept()
            except BlockingIOError:
                return self._hits
            connection.close()
            self._hits += 1

    def close(self) -> None:
        self._socket.close()


def job(**overrides: Any) -> Invocation:
    values: dict[str, Any] = {
        "job_id": 42,
        "task_identifier": "send-email",
        "database_id": DB_ID,
        "worker_id": "bridge-host-1",
        "attempt": 1,
        "payload": '{"to": "a@example.com",  "n": 1.50}',
        "call_id": "c0ffee00-1111-2222-3333-444455556666",
    }
    values.update(overrides)
    return Invocation(**values)


@pytest.fixture(scope="module")
def client() -> Iterator[FunctionClient]:
    with make_http_client(Settings(http_connect_timeout=1.0, http_timeout=3.0)) as http:
        yield http


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    server = CallbackReceiver()
    yield server
    server.close()


@pytest.fixture
def canary() -> Iterator[Canary]:
    listener = Canary()
    yield listener
    listener.close()


# -- OpenFaaS, synchronous -------------------------------------------------------------


def test_openfaas_sync_sends_the_payload_and_standard_headers(
    functions: FunctionServer, client: FunctionClient, receiver: CallbackReceiver
) -> None:
    executor = OpenFaaSExecutor(client, functions.url, asynchronous=False)
    invocation = job(attempt=3, callback_url=receiver.url)
    assert executor.invoke(invocation) == Done()
    (call,) = functions.calls.wait_for_calls(1)
    assert (call.route, call.task, call.job_id, call.attempt) == ("openfaas", "send-email", 42, 3)
    assert call.body == invocation.payload.encode()
    assert call.headers["x-worker-id"] == "bridge-host-1"
    assert call.headers["x-database-id"] == DB_ID
    assert call.headers["idempotency-key"] == "42"
    assert call.headers["x-callback-url"] == receiver.url
    assert call.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("payload", "permanent", "message"),
    [
        ({"status": 500}, False, 'HTTP 500 from send-email: {"message": "status 500"}'),
        ({"status": 503}, False, 'HTTP 503 from send-email: {"message": "status 503"}'),
        ({"status": 429}, False, 'HTTP 429 from send-email: {"message": "status 429"}'),
        ({"status": 404}, False, 'HTTP 404 from send-email: {"message": "status 404"}'),
        ({"status": 422}, True, 'HTTP 422 from send-email: {"message": "status 422"}'),
        ({"status": 401}, True, 'HTTP 401 from send-email: {"message": "status 401"}'),
        ({"error": "smtp down"}, False, 'HTTP 500 from send-email: {"message": "smtp down"}'),
        ({"error": "smtp down", "legacy": True}, False, "send-email reported an error: smtp down"),
    ],
)
def test_sync_failures_are_mapped(
    functions: FunctionServer,
    client: FunctionClient,
    payload: dict[str, Any],
    permanent: bool,
    message: str,
) -> None:
    executor = OpenFaaSExecutor(client, functions.url, asynchronous=False)
    outcome = executor.invoke(job(payload=json.dumps(payload)))
    never_ran = payload.get("status") in (429, 503)  # a gateway's or a rate limiter's answer
    assert outcome == Failed(message, permanent=permanent, never_ran=never_ran)


def test_fail_times_fails_the_first_calls_of_a_job_then_succeeds(
    functions: FunctionServer, client: FunctionClient
) -> None:
    executor = OpenFaaSExecutor(client, functions.url, asynchronous=False)
    flaky = job(job_id=7, payload='{"fail_times": 2}')
    outcomes = [executor.invoke(flaky) for _ in range(3)]
    assert [type(outcome) for outcome in outcomes] == [Failed, Failed, Done]
    assert executor.invoke(job(job_id=8, payload='{"fail_times": 2}')) != Done()  # per job id
    assert [call.status for call in functions.calls.calls_for(7)] == [500, 500, 200]


# -- OpenFaaS, asynchronous ---------------------------------------------------------------


def test_openfaas_async_defers_and_the_callback_arrives_like_the_queue_worker_sends_it(
    functions: FunctionServer, client: FunctionClient, receiver: CallbackReceiver
) -> None:
    executor = OpenFaaSExecutor(client, functions.url, asynchronous=True)
    invocation = job(payload='{"sleep": 0.3}', callback_url=receiver.url)
    assert executor.invoke(invocation) == Deferred()
    assert functions.calls.calls_for(42) == []  # answered before the function finished
    ((path, headers, body),) = receiver.wait_for(1)
    assert path == f"/callback?{TOKEN_QUERY}"
    assert headers["x-function-status"] == "200"
    assert headers["x-call-id"] == invocation.call_id
    assert headers["x-function-name"] == "send-email"
    assert float(headers["x-duration-seconds"]) >= 0.3
    assert headers["x-job-id"] == "42"  # echoed by the function, copied by the queue-worker
    assert headers["x-worker-id"] == "bridge-host-1"
    assert json.loads(body)["complete"] is True
    (call,) = functions.calls.wait_for_calls(1)
    assert (call.route, call.callback_status) == ("openfaas-async", 200)


def test_openfaas_async_failure_is_reported_in_the_callback(
    functions: FunctionServer, client: FunctionClient, receiver: CallbackReceiver
) -> None:
    executor = OpenFaaSExecutor(client, functions.url, asynchronous=True)
    executor.invoke(job(payload='{"error": "boom"}', callback_url=receiver.url))
    ((_, headers, body),) = receiver.wait_for(1)
    assert headers["x-function-status"] == "500"
    assert json.loads(body) == {"message": "boom"}


def test_unreachable_async_function_gives_a_503_callback_without_function_headers(
    functions: FunctionServer, client: FunctionClient, receiver: CallbackReceiver
) -> None:
    executor = OpenFaaSExecutor(client, functions.url, asynchronous=True)
    invocation = job(payload='{"unreachable": true}', callback_url=receiver.url)
    assert executor.invoke(invocation) == Deferred()
    ((path, headers, body),) = receiver.wait_for(1)
    assert path == f"/callback?{TOKEN_QUERY}"  # only the URL can tell which job this was
    assert headers["x-function-status"] == "503"
    assert headers["x-call-id"] == invocation.call_id
    assert not {"x-job-id", "x-worker-id", "x-database-id"} & set(headers)
    assert body == b""
    assert functions.calls.all() == []  # the function itself was never called


def test_dropped_callback_never_arrives(
    functions: FunctionServer, client: FunctionClient, receiver: CallbackReceiver
) -> None:
    executor = OpenFaaSExecutor(client, functions.url, asynchronous=True)
    assert executor.invoke(job(payload='{"drop_callback": true}', callback_url=receiver.url)) == (
        Deferred()
    )
    (call,) = functions.calls.wait_for_calls(1)  # recorded after the callback would be sent
    assert call.status == 200 and call.callback_status is None
    assert receiver.requests == []


# -- Knative and the development map ----------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "host"),
    [
        (None, "send-email.default.svc.cluster.local"),
        ("default.example.com", "send-email.default.example.com"),
    ],
)
def test_knative_through_the_ingress_routes_on_the_host_header(
    functions: FunctionServer, client: FunctionClient, suffix: str | None, host: str
) -> None:
    executor = KnativeExecutor(client, service_suffix=suffix, ingress_url=functions.url)
    assert executor.invoke(job()) == Done()
    (call,) = functions.calls.wait_for_calls(1)
    assert (call.route, call.task, call.headers["host"]) == ("knative", "send-email", host)


def test_devmap_calls_the_mapped_url(functions: FunctionServer, client: FunctionClient) -> None:
    executor = DevMapExecutor(client, {"send-email": functions.dev_url("send-email")})
    assert executor.invoke(job()) == Done()
    (call,) = functions.calls.wait_for_calls(1)
    assert (call.route, call.task, call.job_id) == ("plain", "send-email", 42)


def test_devmap_unknown_task_never_falls_back_to_the_callback_url(
    functions: FunctionServer, client: FunctionClient, receiver: CallbackReceiver
) -> None:
    executor = DevMapExecutor(client, {"send-email": functions.dev_url("send-email")})
    outcome = executor.invoke(job(task_identifier="resize-image", callback_url=receiver.url))
    assert outcome == Failed("no development URL for task 'resize-image'", permanent=True)
    assert receiver.requests == []  # the Node runtime would have POSTed the job here
    assert functions.calls.all() == []


# -- redirects, timeouts, transport errors ------------------------------------------------------


def test_redirects_are_not_followed(
    functions: FunctionServer, client: FunctionClient, canary: Canary
) -> None:
    executor = OpenFaaSExecutor(client, functions.url, asynchronous=False)
    outcome = executor.invoke(job(payload=json.dumps({"redirect": canary.url})))
    assert outcome == Failed("HTTP 302 from send-email (redirects are not followed)")
    assert canary.hits() == 0
    # negative control: a client that follows redirects does reach the canary
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{functions.url}/function/send-email",
            json={"redirect": canary.url},
            follow_redirects=True,
            timeout=0.2,
        )
    assert canary.hits() == 1


def test_a_hanging_function_becomes_a_timeout(functions: FunctionServer) -> None:
    settings = Settings(http_connect_timeout=1.0, http_timeout=0.3)
    with make_http_client(settings) as short:
        executor = OpenFaaSExecutor(short, functions.url, asynchronous=False)
        started = time.monotonic()
        outcome = executor.invoke(job(payload='{"hang": true}'))
        elapsed = time.monotonic() - started
    assert outcome == Failed("timeout after 0.3s waiting for send-email")
    assert 0.3 <= elapsed < 2.0
    (call,) = functions.calls.wait_for_calls(1)
    assert call.status == 0  # the function was reached and never answered


@pytest.mark.parametrize("trickled", [{}, {"trickle_headers": True}], ids=["body", "headers"])
def test_a_trickling_function_is_cut_off_at_the_whole_exchange_deadline(
    functions: FunctionServer, trickled: dict[str, bool]
) -> None:
    # a byte every 0.3 s never trips the 1 s read timeout: only the deadline ends the call
    settings = Settings(http_connect_timeout=0.5, http_timeout=1.0)
    deadline = 1.5
    with make_http_client(settings) as short:
        executor = OpenFaaSExecutor(short, functions.url, asynchronous=False)
        started = time.monotonic()
        outcome = executor.invoke(job(payload=json.dumps({"trickle": 0.3, **trickled})))
        elapsed = time.monotonic() - started
        # recorded once the function saw its connection closed, the client still open
        (call,) = functions.calls.wait_for_calls(1, timeout=2)
        assert executor.invoke(job()) == Done()  # the pool's next connection is sound
    assert outcome == Failed("timeout after 1.5s (whole exchange) calling send-email")
    assert deadline <= elapsed < deadline + 0.5
    assert call.status == 499  # the caller hung up before the reply was complete
    assert call.ended - started < deadline + 0.5


def test_a_closed_port_is_a_retryable_connection_failure(client: FunctionClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    executor = OpenFaaSExecutor(client, f"http://127.0.0.1:{port}", asynchronous=False)
    outcome = executor.invoke(job())
    assert isinstance(outcome, Failed) and not outcome.permanent
    assert outcome.message.startswith("connection failed: send-email")


def test_a_dropped_connection_is_a_retryable_transport_error(
    functions: FunctionServer, client: FunctionClient
) -> None:
    executor = OpenFaaSExecutor(client, functions.url, asynchronous=False)
    outcome = executor.invoke(job(payload='{"unreachable": true}'))
    assert isinstance(outcome, Failed) and not outcome.permanent
    assert outcome.message.startswith("transport error: send-email: RemoteProtocolError")


# -- SSRF: hostile task names reach no one --------------------------------------------------------


def hostile_tasks(canary: Canary) -> list[str]:
    target = f"127.0.0.2:{canary.port}"
    return [
        f"{target}/x#",
        f"{target}#",
        f"{target}/steal?",
        f"user@{target}",
        f"evil.com@{target}/x#",
        "evil.com/x",
        "169.254.169.254/latest/meta-data#",
        "../admin",
        "a b",
        "UPPER",
        "fn\r\nHost: 127.0.0.2",
        "x" * 126,
    ]


def test_hostile_task_names_reach_neither_the_canary_nor_any_function(
    functions: FunctionServer, client: FunctionClient, receiver: CallbackReceiver, canary: Canary
) -> None:
    executors: list[JobExecutor] = [
        OpenFaaSExecutor(client, functions.url, asynchronous=False),
        OpenFaaSExecutor(client, functions.url, asynchronous=True),
        KnativeExecutor(client),
        KnativeExecutor(client, service_suffix="default.example.com"),
        KnativeExecutor(client, ingress_url=functions.url),
        DevMapExecutor(client, {"send-email": functions.dev_url("send-email")}),
    ]
    for task in hostile_tasks(canary):
        for executor in executors:
            outcome = executor.invoke(job(task_identifier=task, callback_url=receiver.url))
            assert isinstance(outcome, Failed) and outcome.permanent, (executor.name, task)
    assert canary.hits() == 0
    assert functions.calls.all() == []
    assert receiver.requests == []


def test_negative_control_naive_url_formatting_reaches_the_canary(canary: Canary) -> None:
    task = hostile_tasks(canary)[0]
    naive = f"http://{task}.default.example.com/"  # the Node runtime's URL building
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(naive, content=b"{}", timeout=0.2)
    assert canary.hits() == 1


# -- the fake server's own helpers --------------------------------------------------------------


def test_call_log_is_mirrored_to_a_json_lines_file(tmp_path: Path, client: FunctionClient) -> None:
    log_path = tmp_path / "calls.jsonl"
    with FunctionServer(log_path=log_path) as functions:
        executor = OpenFaaSExecutor(client, functions.url, asynchronous=False)
        executor.invoke(job(job_id=1))
        executor.invoke(job(job_id=2, payload='{"status": 500}'))
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(line["job_id"], line["status"]) for line in lines] == [(1, 200), (2, 500)]
    assert lines[0]["body"] == job().payload
    assert lines[0]["ended"] >= lines[0]["started"]


def test_wait_for_calls_gives_up_at_its_deadline(functions: FunctionServer) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        functions.calls.wait_for_calls(1, timeout=0.1)
    assert time.monotonic() - started < 1.0


def test_per_task_defaults_apply_under_the_payload(client: FunctionClient) -> None:
    with FunctionServer(tasks={"always-down": {"status": 503}}) as functions:
        executor = OpenFaaSExecutor(client, functions.url, asynchronous=False)
        down = executor.invoke(job(task_identifier="always-down"))
        assert isinstance(down, Failed) and down.message.startswith("HTTP 503")
        override = job(task_identifier="always-down", payload='{"status": 200}')
        assert executor.invoke(override) == Done()
