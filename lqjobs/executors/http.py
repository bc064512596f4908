"""The HTTP exchange every HTTP executor shares: one pooled client, one POST, one reply.

:class:`_HttpExecutor` validates, builds the request (its subclasses say where to),
POSTs once and maps the reply to an outcome. ``httpx.HTTPError`` is caught here and
nowhere else: a network failure is a :class:`Failed`, never an exception. The whole
exchange, connect to the last byte read, has one deadline (:mod:`.deadline`).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import ClassVar

import httpx

from lqjobs.executors.base import (
    EXCERPT_CHARS,
    Deferred,
    Done,
    Failed,
    InvalidInvocation,
    Invocation,
    Outcome,
    classify_status,
    log_outcome,
    log_refused,
)
from lqjobs.executors.deadline import (
    DeadlineExceeded,
    DeadlineTransport,
    check_deadline,
    exchange_deadline,
)
from lqjobs.logs import one_line
from lqjobs.settings import Settings

MAX_RESPONSE_BYTES = 64 * 1024  # read at most this much of a reply; the rest is dropped


@dataclass(frozen=True)
class _Request:
    url: httpx.URL  # checked: exactly what is sent
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class _Reply:
    status: int
    job_error: bool  # the Node wrapper's "200 + X-Job-Error: true" failure
    body: bytes  # at most MAX_RESPONSE_BYTES
    retry_after: float | None = None  # seconds, from a Retry-After header


class FunctionClient:
    """The one HTTP connection pool every HTTP executor shares: an httpx transport,
    called directly. ``httpx.Client`` around it (cookie jar, auth, redirects, URL
    merging) cost a third of each call's CPU and does nothing for one POST to a
    function. A transport never follows a redirect and never reads proxy settings
    from the environment.

    ``deadline``: seconds for a whole exchange, the connect timeout plus the read
    timeout (T_http in docs/design.md, section 6), however the reply trickles in."""

    DEFAULT_HEADERS: ClassVar[Mapping[str, str]] = {
        "User-Agent": "lqjobs",
        "Accept-Encoding": "identity",
    }

    def __init__(self, timeout: httpx.Timeout, transport: httpx.BaseTransport) -> None:
        self.timeout = timeout
        self.deadline = _whole_exchange(timeout)
        self._transport = transport
        self._extensions = {"timeout": timeout.as_dict()}

    @contextlib.contextmanager
    def post(
        self, url: httpx.URL, headers: Mapping[str, str], body: bytes
    ) -> Iterator[httpx.Response]:
        """POST ``body``; the response's body is read from the stream, at most as much
        as the caller asks for, and the connection goes back to the pool on exit.
        Everything until then shares the deadline: past it, :class:`DeadlineExceeded`."""
        request = httpx.Request(
            "POST",
            url,
            headers={**self.DEFAULT_HEADERS, **headers},
            content=body,
            extensions=self._extensions,
        )
        with exchange_deadline(self.deadline):
            response = self._transport.handle_request(request)
            try:
                yield response
            finally:
                response.close()

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> FunctionClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _whole_exchange(timeout: httpx.Timeout) -> float | None:
    if timeout.connect is None or timeout.read is None:
        return None
    return timeout.connect + timeout.read


def make_http_client(settings: Settings) -> FunctionClient:
    """The one pooled client every HTTP executor shares."""
    # identity encoding (FunctionClient.DEFAULT_HEADERS): a compressed reply could
    # expand far past MAX_RESPONSE_BYTES per chunk.
    transport = DeadlineTransport(
        httpx.Limits(max_connections=64, max_keepalive_connections=16, keepalive_expiry=30)
    )
    timeout = httpx.Timeout(settings.http_timeout, connect=settings.http_connect_timeout)
    return FunctionClient(timeout, transport)


# -- one POST and its reply ---------------------------------------------------------


def _post(client: FunctionClient, request: _Request, task: str) -> _Reply | Failed:
    try:
        with client.post(request.url, request.headers, request.body) as response:
            job_error = response.headers.get("x-job-error", "").strip().lower() == "true"
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            return _Reply(response.status_code, job_error, _read_prefix(response), retry_after)
    except DeadlineExceeded:
        return Failed(f"timeout after {client.deadline:g}s (whole exchange) calling {task}")
    except (httpx.ConnectTimeout, httpx.PoolTimeout) as exc:  # nothing was sent
        return Failed(_timeout_message(client.timeout, exc, task), never_ran=True)
    except httpx.TimeoutException as exc:
        return Failed(_timeout_message(client.timeout, exc, task))
    except httpx.ConnectError as exc:  # refused, unresolvable: nothing was sent
        return Failed(f"connection failed: {task}: {one_line(str(exc), 120)}", never_ran=True)
    except httpx.HTTPError as exc:
        return Failed(f"transport error: {task}: {type(exc).__name__}: {one_line(str(exc), 120)}")


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None when absent
    or unreadable (RFC 9110, 10.2.3)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _read_prefix(response: httpx.Response) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= MAX_RESPONSE_BYTES:
            break
        check_deadline()  # holds over a transport that does not bound its reads itself
    return bytes(body[:MAX_RESPONSE_BYTES])


def _timeout_message(timeout: httpx.Timeout, exc: httpx.TimeoutException, task: str) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        seconds, doing = timeout.connect, "connecting to"
    elif isinstance(exc, httpx.PoolTimeout):
        seconds, doing = timeout.pool, "waiting for a connection to"
    elif isinstance(exc, httpx.WriteTimeout):
        seconds, doing = timeout.write, "sending to"
    else:
        seconds, doing = timeout.read, "waiting for"
    after = f" after {seconds:g}s" if seconds is not None else ""
    return f"timeout{after} {doing} {task}"


def _sync_outcome(reply: _Reply, task: str, retry_on_404: bool) -> Outcome:
    if 200 <= reply.status < 300:
        if reply.job_error:
            return Failed(f"{task} reported an error: {_error_message(reply.body)}")
        return Done()
    detail = reply.body.decode("utf-8", "replace")
    return classify_status(
        reply.status,
        retry_on_404=retry_on_404,
        task=task,
        detail=detail,
        retry_after=reply.retry_after,
    )


def _error_message(body: bytes) -> str:
    """The message of a legacy ``{"message": ...}`` (or ``{"error": ...}``) error body."""
    text = body.decode("utf-8", "replace")
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict):
        for key in ("message", "error"):
            if isinstance(value.get(key), str):
                text = value[key]
                break
    return one_line(text, EXCERPT_CHARS) or "no message"


# -- the executors' common part -------------------------------------------------------


class _HttpExecutor:
    """Validate, build the request, POST once, map the reply; subclasses say where."""

    name = "http"

    def __init__(self, client: FunctionClient, retry_on_404: bool) -> None:
        self._client = client
        self._retry_on_404 = retry_on_404

    def invoke(self, invocation: Invocation) -> Outcome:
        started = time.monotonic()
        try:
            request = self._request(invocation)
        except InvalidInvocation as exc:
            log_refused(self.name, invocation, str(exc))
            return Failed(str(exc), permanent=True)
        task = one_line(invocation.task_identifier, 80)
        reply = _post(self._client, request, task)
        if isinstance(reply, Failed):
            outcome: Outcome = reply
        else:
            outcome = self._outcome(reply, task)
            if isinstance(outcome, Done) and reply.status == 202 and invocation.callback_url:
                # Accepted: the function (e.g. the Node job wrapper) reports through the
                # callback URL later. Completing now would settle the job too early.
                outcome = Deferred()
        status = None if isinstance(reply, Failed) else reply.status
        log_outcome(self.name, invocation, outcome, status, time.monotonic() - started)
        return outcome

    def _request(self, invocation: Invocation) -> _Request:
        raise NotImplementedError

    def _outcome(self, reply: _Reply, task: str) -> Outcome:
        return _sync_outcome(reply, task, self._retry_on_404)


def _body(invocation: Invocation) -> bytes:
    try:
        return invocation.payload.encode("utf-8")
    except (AttributeError, UnicodeEncodeError):
        raise InvalidInvocation("payload is not valid UTF-8 text") from None
