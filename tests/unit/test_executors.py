"""Executors without a network: status mapping, headers, URLs and SSRF refusals.

Requests are caught by ``httpx.MockTransport``; what the transport is asked to
fetch is the ground truth for every "nothing was sent" assertion.
"""

from __future__ import annotations

import logging
import random
import re
import string
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from lqjobs.errors import ConfigurationError, ExecutorError
from lqjobs.executors import (
    Deferred,
    DevMapExecutor,
    Done,
    Failed,
    FunctionClient,
    HandlerRegistry,
    InvalidInvocation,
    Invocation,
    JobExecutor,
    KnativeExecutor,
    NativeExecutor,
    OpenFaaSExecutor,
    PermanentJobError,
    UnavailableExecutor,
    build_headers,
    build_router,
    classify_status,
    make_http_client,
)
from lqjobs.executors.deadline import DeadlineExceeded
from lqjobs.ops.example_functions import FunctionServer
from lqjobs.settings import Settings

DB_ID = "5b5a1e4e-0b7e-4f69-9a3e-1f1d8a2b7c11"
USER_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"
CALLBACK = "http://callback.internal:12345/callback?token=v1.k1.abc.def"
HOSTILE_TASKS = [
    "evil.com/x",
    "evil.com/x?",
    "169.254.169.254#",
    "169.254.169.254/latest/meta-data#",
    "a b",
    "UPPER",
    "../admin",
    "user@evil.com",
    "evil.com:80#",
    "a%2fb",
    "fn\r\nX-Injected: 1",
    "fn\n",
    "a" * 64,
    "a" * 126,
    "",
    "-leading",
    "trailing-",
    "1starts-with-digit",
    "ünï",
    "send_email",
]


def invocation(**overrides: Any) -> Invocation:
    values: dict[str, Any] = {
        "job_id": 42,
        "task_identifier": "send-email",
        "database_id": DB_ID,
        "worker_id": "bridge-host-1",
        "attempt": 2,
        "payload": '{"to":  "a@example.com", "n": 1.50, "s": "é"}',
        "call_id": "c0ffee00-1111-2222-3333-444455556666",
        "callback_url": CALLBACK,
    }
    values.update(overrides)
    return Invocation(**values)


class Recorder:
    """A MockTransport handler that records requests and answers with a fixed reply."""

    def __init__(self, status: int = 200, **reply: Any) -> None:
        self.requests: list[httpx.Request] = []
        self.status = status
        self.reply = reply

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, **self.reply)

    def client(self) -> FunctionClient:
        return FunctionClient(httpx.Timeout(5), httpx.MockTransport(self))


def raising(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


# -- classify_status -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retry_on_404", "expected"),
    [
        (200, True, "done"),
        (201, True, "done"),
        (202, True, "done"),
        (204, True, "done"),
        (301, True, "retry"),
        (302, True, "retry"),
        (307, True, "retry"),
        (400, True, "permanent"),
        (401, True, "permanent"),
        (403, True, "permanent"),
        (404, True, "retry"),
        (404, False, "permanent"),
        (405, True, "permanent"),
        (408, True, "retry"),
        (409, True, "permanent"),
        (410, True, "permanent"),
        (413, True, "permanent"),
        (415, True, "permanent"),
        (418, True, "permanent"),
        (422, True, "permanent"),
        (425, True, "retry"),
        (429, True, "retry"),
        (429, False, "retry"),
        (500, True, "retry"),
        (501, True, "retry"),
        (502, True, "retry"),
        (503, True, "retry"),
        (504, True, "retry"),
        (599, True, "retry"),
    ],
)
def test_classify_status(status: int, retry_on_404: bool, expected: str) -> None:
    outcome = classify_status(status, retry_on_404=retry_on_404, task="send-email")
    if expected == "done":
        assert outcome == Done()
    else:
        assert isinstance(outcome, Failed)
        assert outcome.permanent is (expected == "permanent")
        assert outcome.message.startswith(f"HTTP {status} from send-email")


def test_status_message_has_only_a_short_clean_excerpt_of_the_body() -> None:
    body = "line one\r\nX-Evil: 1\x00\x1b[31m" + "x" * 5000
    outcome = classify_status(503, retry_on_404=True, task="send-email", detail=body)
    assert isinstance(outcome, Failed)
    assert outcome.message.startswith("HTTP 503 from send-email: line one X-Evil: 1")
    excerpt = outcome.message.removeprefix("HTTP 503 from send-email: ")
    assert len(excerpt) <= 200
    assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in outcome.message)


def test_redirect_message_says_it_was_not_followed() -> None:
    outcome = classify_status(302, retry_on_404=True, task="fn")
    assert outcome == Failed("HTTP 302 from fn (redirects are not followed)")


# -- headers -------------------------------------------------------------------------


def test_build_headers_has_every_standard_header() -> None:
    headers = build_headers(invocation(current_user_id=USER_ID))
    assert headers == {
        "Content-Type": "application/json",
        "Idempotency-Key": "42",
        "X-Job-Id": "42",
        "X-Job-Attempt": "2",
        "X-Worker-Id": "bridge-host-1",
        "X-Database-Id": DB_ID,
        "X-Callback-Url": CALLBACK,
        "X-Current-User-Id": USER_ID,
    }


def test_optional_headers_are_left_out_when_unknown() -> None:
    headers = build_headers(invocation(callback_url=None))
    assert "X-Callback-Url" not in headers
    assert "X-Current-User-Id" not in headers


def test_database_id_is_sent_in_canonical_uuid_form() -> None:
    headers = build_headers(invocation(database_id=DB_ID.upper().replace("-", "")))
    assert headers["X-Database-Id"] == DB_ID


@pytest.mark.parametrize(
    "overrides",
    [
        {"worker_id": "bridge\r\nX-Evil: 1"},
        {"worker_id": "abc"},
        {"worker_id": "w" * 65},
        {"worker_id": "has space"},
        {"worker_id": "worker/1"},
        {"database_id": "not-a-uuid"},
        {"database_id": DB_ID + "\r\nX-Evil: 1"},
        {"current_user_id": "root"},
        {"job_id": 0},
        {"job_id": True},
        {"job_id": "42"},
        {"attempt": -1},
        {"callback_url": "http://cb/callback\r\nX-Evil: 1"},
        {"callback_url": "file:///etc/passwd"},
        {"callback_url": "http://cb/a b"},
    ],
)
def test_unsafe_header_values_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(InvalidInvocation) as caught:
        build_headers(invocation(**overrides))
    assert isinstance(caught.value, ExecutorError)
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    "overrides", [{"worker_id": "bad\nid"}, {"database_id": "x"}, {"job_id": -5}]
)
def test_invalid_header_values_fail_permanently_without_a_request(
    overrides: dict[str, Any],
) -> None:
    recorder = Recorder()
    executor = OpenFaaSExecutor(recorder.client(), "http://gw:8080", asynchronous=False)
    outcome = executor.invoke(invocation(**overrides))
    assert isinstance(outcome, Failed) and outcome.permanent
    assert recorder.requests == []


# -- OpenFaaS ------------------------------------------------------------------------


def test_openfaas_sync_posts_the_payload_bytes_to_the_function_route() -> None:
    recorder = Recorder(200, json={"ok": True})
    executor = OpenFaaSExecutor(recorder.client(), "http://gateway:8080", asynchronous=False)
    job = invocation()
    assert executor.invoke(job) == Done()
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == "http://gateway:8080/function/send-email"
    assert request.content == job.payload.encode("utf-8")  # byte for byte, not re-encoded
    for name, value in build_headers(job).items():
        assert request.headers[name] == value
    assert "x-call-id" not in request.headers


def test_openfaas_gateway_base_path_and_default_port() -> None:
    recorder = Recorder()
    executor = OpenFaaSExecutor(
        recorder.client(), "http://Gateway:80/openfaas/", asynchronous=False
    )
    executor.invoke(invocation())
    assert str(recorder.requests[0].url) == "http://gateway/openfaas/function/send-email"


def test_openfaas_async_posts_callback_and_call_id_and_is_deferred() -> None:
    recorder = Recorder(202)
    executor = OpenFaaSExecutor(recorder.client(), "http://gateway:8080", asynchronous=True)
    job = invocation()
    assert executor.invoke(job) == Deferred()
    (request,) = recorder.requests
    assert str(request.url) == "http://gateway:8080/async-function/send-email"
    assert request.headers["X-Callback-Url"] == CALLBACK
    assert request.headers["X-Call-Id"] == job.call_id


def test_openfaas_async_error_status_is_classified() -> None:
    recorder = Recorder(429)
    executor = OpenFaaSExecutor(recorder.client(), "http://gateway:8080", asynchronous=True)
    outcome = executor.invoke(invocation())
    assert isinstance(outcome, Failed) and not outcome.permanent
    assert outcome.message.startswith("HTTP 429 from send-email")


def test_openfaas_async_without_callback_url_fails_permanently_without_a_request() -> None:
    recorder = Recorder(202)
    executor = OpenFaaSExecutor(recorder.client(), "http://gateway:8080", asynchronous=True)
    outcome = executor.invoke(invocation(callback_url=None))
    assert isinstance(outcome, Failed) and outcome.permanent
    assert "callback" in outcome.message
    assert recorder.requests == []


def test_openfaas_async_refuses_a_call_id_unsafe_in_a_header() -> None:
    recorder = Recorder(202)
    executor = OpenFaaSExecutor(recorder.client(), "http://gateway:8080", asynchronous=True)
    outcome = executor.invoke(invocation(call_id="id\r\nX-Evil: 1"))
    assert isinstance(outcome, Failed) and outcome.permanent
    assert recorder.requests == []


def test_legacy_x_job_error_on_a_200_is_a_failure_with_the_message() -> None:
    recorder = Recorder(200, headers={"X-Job-Error": "true"}, json={"message": "no\r\nsmtp"})
    executor = OpenFaaSExecutor(recorder.client(), "http://gateway:8080", asynchronous=False)
    outcome = executor.invoke(invocation())
    assert outcome == Failed("send-email reported an error: no smtp")


def test_error_body_is_cut_to_an_excerpt() -> None:
    recorder = Recorder(500, content=b"E" * 100_000)
    executor = OpenFaaSExecutor(recorder.client(), "http://gateway:8080", asynchronous=False)
    outcome = executor.invoke(invocation())
    assert isinstance(outcome, Failed)
    assert len(outcome.message) < 300


@pytest.mark.parametrize(
    "gateway",
    ["ftp://gw", "gw:8080", "http://user:pw@gw", "http://gw/?q=1", "http://gw/#f", "http://gw:x"],
)
def test_openfaas_rejects_a_bad_gateway_url(gateway: str) -> None:
    with pytest.raises(ConfigurationError):
        OpenFaaSExecutor(Recorder().client(), gateway, asynchronous=False)


# -- transport errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "prefix"),
    [
        (httpx.ReadTimeout("read timed out"), "timeout after 30s waiting for send-email"),
        (httpx.ConnectTimeout("connect timed out"), "timeout after 5s connecting to send-email"),
        (httpx.ConnectError("[Errno 111] Connection refused"), "connection failed: send-email"),
        (httpx.RemoteProtocolError("Server disconnected"), "transport error: send-email"),
        (httpx.ReadError("reset"), "transport error: send-email"),
        (DeadlineExceeded("passed"), "timeout after 35s (whole exchange) calling send-email"),
    ],
)
def test_transport_errors_become_retryable_failures(exc: Exception, prefix: str) -> None:
    client = FunctionClient(httpx.Timeout(30, connect=5), httpx.MockTransport(raising(exc)))
    executor = OpenFaaSExecutor(client, "http://gateway:8080", asynchronous=False)
    outcome = executor.invoke(invocation())
    assert isinstance(outcome, Failed) and not outcome.permanent
    assert outcome.message.startswith(prefix)


class Trickle(httpx.SyncByteStream):
    """A body that comes one byte every 50 ms, for ten seconds."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(200):
            if self.closed.wait(0.05):
                return
            yield b" "

    def close(self) -> None:
        self.closed.set()


def test_a_body_trickling_past_the_deadline_fails_over_any_transport() -> None:
    body = Trickle()
    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=body))
    client = FunctionClient(httpx.Timeout(0.2, connect=0.1), transport)
    executor = OpenFaaSExecutor(client, "http://gateway:8080", asynchronous=False)
    started = time.monotonic()
    outcome = executor.invoke(invocation())
    assert outcome == Failed("timeout after 0.3s (whole exchange) calling send-email")
    assert time.monotonic() - started < 0.3 + 0.2
    assert body.closed.is_set()


# -- Knative -----------------------------------------------------------------------------


def test_knative_calls_the_cluster_local_service() -> None:
    recorder = Recorder()
    executor = KnativeExecutor(recorder.client(), namespace="jobs")
    assert executor.invoke(invocation()) == Done()
    request = recorder.requests[0]
    assert str(request.url) == "http://send-email.jobs.svc.cluster.local/"
    assert request.headers["Host"] == "send-email.jobs.svc.cluster.local"
    assert request.content == invocation().payload.encode()


def test_knative_uses_the_service_suffix_with_its_port() -> None:
    recorder = Recorder()
    executor = KnativeExecutor(recorder.client(), service_suffix="Default.Example.com:8080")
    executor.invoke(invocation())
    assert str(recorder.requests[0].url) == "http://send-email.default.example.com:8080/"


def test_knative_through_an_ingress_sends_the_service_host() -> None:
    recorder = Recorder()
    executor = KnativeExecutor(
        recorder.client(), service_suffix="default.example.com", ingress_url="http://10.0.0.7:8081"
    )
    executor.invoke(invocation())
    request = recorder.requests[0]
    assert str(request.url) == "http://10.0.0.7:8081/"
    assert request.headers["Host"] == "send-email.default.example.com"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"namespace": "a.b"},
        {"namespace": "Default"},
        {"service_suffix": "evil.com/x"},
        {"service_suffix": "user@evil.com"},
        {"service_suffix": "example.com:99999"},
        {"ingress_url": "kourier:80"},
    ],
)
def test_knative_rejects_bad_configuration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        KnativeExecutor(Recorder().client(), **kwargs)


# -- SSRF: hostile task names never reach the transport ------------------------------------


def http_executors(client: FunctionClient) -> list[JobExecutor]:
    return [
        OpenFaaSExecutor(client, "http://gateway:8080", asynchronous=False),
        OpenFaaSExecutor(client, "http://gateway:8080", asynchronous=True),
        KnativeExecutor(client),
        KnativeExecutor(client, service_suffix="default.example.com"),
        KnativeExecutor(client, ingress_url="http://kourier:80"),
        DevMapExecutor(client, {"send-email": "http://localhost:3000/send"}),
    ]


@pytest.mark.parametrize("task", HOSTILE_TASKS)
def test_hostile_task_names_fail_permanently_and_send_nothing(task: str) -> None:
    recorder = Recorder()
    for executor in http_executors(recorder.client()):
        outcome = executor.invoke(invocation(task_identifier=task))
        assert isinstance(outcome, Failed), executor.name
        assert outcome.permanent, executor.name
        assert "\n" not in outcome.message and "\r" not in outcome.message
    assert recorder.requests == []


ESCAPES_HOST = ["evil.com/x#", "169.254.169.254#", "user@evil.com", "a:81", "x?y"]
ESCAPES_PATH = ["evil.com/x#", "x?y", "../../admin", "a/../../b", "x#y"]


@pytest.mark.parametrize(
    ("kind", "task"),
    [("knative", task) for task in ESCAPES_HOST] + [("openfaas", task) for task in ESCAPES_PATH],
)
def test_the_url_check_alone_stops_names_that_escape_the_origin(
    kind: str, task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # first defence off, where each executor looks the check up
    monkeypatch.setattr(f"lqjobs.executors.{kind}.function_name", lambda name: name)
    recorder = Recorder()
    executor: JobExecutor
    if kind == "knative":
        executor = KnativeExecutor(recorder.client(), service_suffix="default.example.com")
    else:
        executor = OpenFaaSExecutor(recorder.client(), "http://gateway:8080", asynchronous=False)
    outcome = executor.invoke(invocation(task_identifier=task))
    assert isinstance(outcome, Failed) and outcome.permanent
    assert "refusing" in outcome.message
    assert recorder.requests == []


ALLOWED_HOSTS = {"gateway", "kourier", "localhost"}
ALLOWED_SUFFIXES = (".default.svc.cluster.local", ".default.example.com")


def assert_allowed(request: httpx.Request) -> None:
    host = request.url.host
    assert host in ALLOWED_HOSTS or host.endswith(ALLOWED_SUFFIXES), host
    assert request.url.userinfo == b"" and request.url.query == b""
    for suffix in ALLOWED_SUFFIXES:
        if host.endswith(suffix):
            label = host.removesuffix(suffix)
            assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", label), host
    if host == "kourier":
        assert request.headers["Host"].endswith(".default.svc.cluster.local")
        assert request.headers["Host"].count(".") == 4
    if host == "gateway":
        assert request.url.path.count("/") == 2, request.url.path


INJECTIONS = [
    ".",
    "/",
    "@",
    ":",
    "#",
    "?",
    "%2f",
    "\r\n",
    " ",
    "A",
    "_",
    "..",
    "\\",
    "é",
    "\x00",
    ":80",
    ".evil.com",
    "@127.0.0.2",
    "/latest/meta-data#",
    "\u2028",
    "[::1]",
]


def random_identifier(rng: random.Random) -> str:
    """Mostly near-valid names: a label with a few hostile pieces spliced in."""
    chars = list(
        rng.choice(string.ascii_lowercase + string.digits + "-") for _ in range(rng.randint(0, 66))
    )
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        chars.insert(rng.randint(0, len(chars)), rng.choice(INJECTIONS))
    return "".join(chars)


def test_property_every_fetched_url_has_an_allowed_host(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="lqjobs.executors")  # 10k refusals: keep it fast
    rng = random.Random(4242)
    fetched: list[httpx.Request] = []

    def guard(request: httpx.Request) -> httpx.Response:
        assert_allowed(request)  # checked at the transport, for every single request
        fetched.append(request)
        return httpx.Response(200)

    client = FunctionClient(httpx.Timeout(5), httpx.MockTransport(guard))
    executors = http_executors(client)
    for _ in range(3000):
        task = random_identifier(rng)
        for executor in executors:
            executor.invoke(invocation(task_identifier=task))
    assert len(fetched) > 500  # the generator does produce valid names that are sent


# -- development map ------------------------------------------------------------------------


def test_devmap_posts_to_the_mapped_url_as_given() -> None:
    recorder = Recorder()
    mapping = {"send-email": "http://localhost:3000/send", "resize": "http://127.0.0.1:3001/"}
    executor = DevMapExecutor(recorder.client(), mapping)
    assert executor.invoke(invocation()) == Done()
    assert executor.invoke(invocation(task_identifier="resize")) == Done()
    assert [str(r.url) for r in recorder.requests] == list(mapping.values())
    assert recorder.requests[0].headers["X-Job-Id"] == "42"


def test_devmap_unknown_task_fails_permanently_and_never_calls_the_callback() -> None:
    recorder = Recorder()
    executor = DevMapExecutor(recorder.client(), {"send-email": "http://localhost:3000/send"})
    outcome = executor.invoke(invocation(task_identifier="other-task"))
    assert isinstance(outcome, Failed) and outcome.permanent
    assert outcome.message.startswith("no development URL for task")
    assert recorder.requests == []


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "localhost:3000", "http://u:p@h/", "http://h/?x=1", "gopher://h"]
)
def test_devmap_rejects_urls_that_are_not_plain_http(url: str) -> None:
    with pytest.raises(ConfigurationError):
        DevMapExecutor(Recorder().client(), {"send-email": url})


# -- native handlers ----------------------------------------------------------------------


def test_native_handler_gets_the_parsed_payload_and_the_job() -> None:
    registry = HandlerRegistry()
    seen: list[tuple[Any, Invocation]] = []

    @registry.handler("send-email")
    def send(payload: Any, job: Invocation) -> None:
        seen.append((payload, job))

    job = invocation()
    assert NativeExecutor(registry).invoke(job) == Done()
    assert seen == [({"to": "a@example.com", "n": 1.5, "s": "é"}, job)]


def test_native_permanent_and_retryable_errors() -> None:
    registry = HandlerRegistry()

    @registry.handler("bad-input")
    def bad(payload: Any, job: Invocation) -> None:
        raise PermanentJobError("address\nrejected")

    @registry.handler("flaky")
    def flaky(payload: Any, job: Invocation) -> None:
        raise ConnectionResetError("peer reset " + "x" * 1000)

    executor = NativeExecutor(registry)
    assert executor.invoke(invocation(task_identifier="bad-input")) == Failed(
        "address rejected", permanent=True
    )
    outcome = executor.invoke(invocation(task_identifier="flaky"))
    assert isinstance(outcome, Failed) and not outcome.permanent
    assert outcome.message.startswith("ConnectionResetError: peer reset x")
    assert len(outcome.message) < 250


def test_native_lets_celerys_soft_time_limit_reach_the_task() -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    registry = HandlerRegistry()

    @registry.handler("slow")
    def slow(payload: Any, job: Invocation) -> None:
        raise SoftTimeLimitExceeded()

    with pytest.raises(SoftTimeLimitExceeded):
        NativeExecutor(registry).invoke(invocation(task_identifier="slow"))


def test_native_unknown_task_and_bad_json_fail_permanently() -> None:
    registry = HandlerRegistry()
    registry.register("send-email", lambda payload, job: None)
    executor = NativeExecutor(registry)
    unknown = executor.invoke(invocation(task_identifier="nope"))
    assert isinstance(unknown, Failed) and unknown.permanent
    assert "no handler" in unknown.message
    bad_json = executor.invoke(invocation(payload="[" * 100_000))
    assert bad_json == Failed("payload is not valid JSON", permanent=True)


def test_registry_refuses_a_second_handler_for_a_task() -> None:
    registry = HandlerRegistry()

    @registry.handler("send-email")
    def first(payload: Any, job: Invocation) -> None: ...

    registry.register("send-email", first)  # the same function again is fine
    with pytest.raises(ConfigurationError):

        @registry.handler("send-email")
        def second(payload: Any, job: Invocation) -> None: ...

    assert registry.tasks() == frozenset({"send-email"})


# -- client and router -----------------------------------------------------------------------


def test_http_client_takes_its_timeouts_from_settings() -> None:
    settings = Settings(http_connect_timeout=2.5, http_timeout=12)
    with make_http_client(settings) as client:
        assert client.timeout == httpx.Timeout(12, connect=2.5)
        assert client.deadline == 14.5  # T_http: the whole exchange


def test_http_client_never_reads_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    dead_proxy = "http://127.0.0.1:9"  # discard port: nothing listens
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with FunctionServer() as functions:
        url = httpx.URL(functions.dev_url("send-email"))
        settings = Settings(http_connect_timeout=1, http_timeout=3)
        with (
            make_http_client(settings) as client,
            client.post(url, {"Content-Type": "application/json"}, b"{}") as response,
        ):
            assert response.status_code == 200
        assert len(functions.calls.all()) == 1
        # negative control: a client that honours the environment goes to the dead proxy
        with pytest.raises(httpx.ConnectError):
            httpx.post(url, content=b"{}", trust_env=True, timeout=1)
        assert len(functions.calls.all()) == 1


def test_router_picks_the_executor_per_task_and_reuses_it() -> None:
    settings = Settings(
        internal_gateway_url="http://127.0.0.1:1234",
        task_executors={"resize": "knative", "local": "native"},
    )
    router = build_router(settings, Recorder().client(), HandlerRegistry())
    assert isinstance(router.for_task("send-email"), OpenFaaSExecutor)
    assert router.for_task("send-email").name == "openfaas"
    assert isinstance(router.for_task("resize"), KnativeExecutor)
    assert isinstance(router.for_task("local"), NativeExecutor)
    assert router.for_task("send-email") is router.for_task("other")


def test_router_turns_missing_configuration_into_a_permanent_failure() -> None:
    settings = Settings(task_executors={"dev": "devmap"})  # no INTERNAL_GATEWAY_URL, empty map
    recorder = Recorder()
    router = build_router(settings, recorder.client(), HandlerRegistry())
    executor = router.for_task("send-email")
    assert isinstance(executor, UnavailableExecutor)
    outcome = executor.invoke(invocation())
    assert isinstance(outcome, Failed) and outcome.permanent
    assert "INTERNAL_GATEWAY_URL" in outcome.message
    dev = router.for_task("dev").invoke(invocation(task_identifier="dev"))
    assert isinstance(dev, Failed) and "INTERNAL_GATEWAY_DEVELOPMENT_MAP" in dev.message
    assert recorder.requests == []


def test_router_builds_async_openfaas_and_devmap_from_settings() -> None:
    settings = Settings(
        executor="openfaas-async",
        internal_gateway_url="http://gateway:8080",
        internal_gateway_development_map={"dev": "http://localhost:3000/dev"},
        task_executors={"dev": "devmap"},
        retry_on_404=False,
    )
    recorder = Recorder(404)
    router = build_router(settings, recorder.client(), HandlerRegistry())
    outcome = router.for_task("send-email").invoke(invocation())
    assert isinstance(outcome, Failed) and outcome.permanent  # LQJOBS_RETRY_ON_404=false
    assert str(recorder.requests[0].url) == "http://gateway:8080/async-function/send-email"
    router.for_task("dev").invoke(invocation(task_identifier="dev"))
    assert str(recorder.requests[1].url) == "http://localhost:3000/dev"


# -- logs ----------------------------------------------------------------------------------------


def test_logs_carry_an_action_and_never_the_payload(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="lqjobs.executors")
    recorder = Recorder(500, text="secret CANARY-3 echoed")
    executor = OpenFaaSExecutor(recorder.client(), "http://gateway:8080", asynchronous=False)
    executor.invoke(invocation(payload='{"token": "CANARY-3"}'))
    executor.invoke(invocation(task_identifier="evil.com/x", payload='{"token": "CANARY-3"}'))
    actions = [getattr(record, "action", None) for record in caplog.records]
    assert actions == ["function_failed", "invocation_refused"]
    assert caplog.records[0].job_id == 42  # type: ignore[attr-defined]
    assert caplog.records[0].status == 500  # type: ignore[attr-defined]
    for record in caplog.records:
        assert "CANARY-3" not in record.getMessage()
        assert "CANARY-3" not in repr(vars(record))


def test_a_202_with_a_callback_url_waits_for_the_callback() -> None:
    # The Node job wrapper answers 202 at once and reports through X-Callback-Url later:
    # completing the job on the 202 would settle it before the work ran.
    executor = KnativeExecutor(Recorder(202).client())
    assert executor.invoke(invocation()) == Deferred()
    assert executor.invoke(invocation(callback_url=None)) == Done()  # nobody to call back
    assert KnativeExecutor(Recorder(200).client()).invoke(invocation()) == Done()
