"""Invoke a job's function: one protocol, one class per platform.

An executor turns one job into an :data:`Outcome` and never raises for a failure
of the function or of the network. Task names and header values are validated
before anything touches the network: a task name is never formatted into a URL
unchecked (reliability.md S2) and only integers, a checked worker id and UUIDs
go into headers (S3). ``httpx.HTTPError`` is caught here and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Protocol, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from lqjobs.errors import ConfigurationError, ExecutorError
from lqjobs.settings import Settings

logger = logging.getLogger(__name__)

# Knative service and OpenFaaS function names are DNS-1035 labels.
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_WORKER_ID = re.compile(r"[A-Za-z0-9._:-]{4,64}")
_CALL_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,4096}")
_PLAIN_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)*/?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}

EXCERPT_CHARS = 200
MAX_RESPONSE_BYTES = 64 * 1024  # read at most this much of a reply; the rest is dropped


# -- what an executor is given and returns --------------------------------------


@dataclass(frozen=True)
class Invocation:
    """One attempt of one job, as the Celery task hands it to an executor."""

    job_id: int
    task_identifier: str
    database_id: str
    worker_id: str
    attempt: int
    payload: str  # the job's JSON text, sent byte for byte, never re-encoded
    call_id: str  # the Celery task id
    callback_url: str | None = None
    current_user_id: str | None = None


@dataclass(frozen=True)
class Done:
    """The function finished successfully."""


@dataclass(frozen=True)
class Failed:
    """The function failed; ``permanent`` means retrying cannot help."""

    message: str
    permanent: bool = False


@dataclass(frozen=True)
class Deferred:
    """The function was accepted and will report through the callback URL."""


Outcome: TypeAlias = Done | Failed | Deferred


class JobExecutor(Protocol):
    """Runs a job's function on one platform."""

    name: str

    def invoke(self, invocation: Invocation) -> Outcome:
        """Call the function once and report how it went.

        Never raises for a failure of the function, the network or the job's
        data: those become :class:`Failed` (``permanent=True`` when a retry
        cannot help). An asynchronous platform that accepted the job returns
        :class:`Deferred`.
        """
        ...


class InvalidInvocation(ExecutorError):
    """The job cannot be sent: a task name or header value failed validation."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, retryable=False)


class PermanentJobError(ExecutorError):
    """Raised by a native handler when retrying the job cannot help."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, retryable=False)


# -- text, status codes and headers ---------------------------------------------


def clean_text(text: str, limit: int = EXCERPT_CHARS) -> str:
    """One line without control characters, at most ``limit`` characters (CWE-117)."""
    flat = _CONTROL.sub(" ", text).strip()
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


_RETRYABLE_4XX = frozenset({408, 425, 429})
_PERMANENT_4XX = frozenset({400, 401, 403, 405, 410, 413, 415, 422})


def classify_status(
    status: int, *, retry_on_404: bool, task: str = "function", detail: str = ""
) -> Outcome:
    """Map an HTTP status to an outcome (reliability.md F13).

    ``detail`` (usually the response body) is cut to a short, clean excerpt.
    """
    if 200 <= status < 300:
        return Done()
    message = f"HTTP {status} from {task}"
    if 300 <= status < 400:
        message += " (redirects are not followed)"
    excerpt = clean_text(detail)
    if excerpt:
        message += f": {excerpt}"
    return Failed(message, permanent=is_permanent_status(status, retry_on_404))


def is_permanent_status(status: int, retry_on_404: bool) -> bool:
    """Whether a function's non-2xx status means retrying cannot help (F13)."""
    if status == 404:
        return not retry_on_404
    if status in _PERMANENT_4XX:
        return True
    return 400 <= status < 500 and status not in _RETRYABLE_4XX


def function_name(task: str) -> str:
    """``task`` if it is a valid OpenFaaS / Knative name (a DNS-1035 label)."""
    if not isinstance(task, str) or not _DNS_1035_LABEL.fullmatch(task):
        raise InvalidInvocation(
            f"task name {_label(task)} is not a valid function name (DNS-1035 label)"
        )
    return task


def build_headers(invocation: Invocation) -> dict[str, str]:
    """The standard headers of every HTTP invocation (architecture decision 8)."""
    job_id = _count(invocation.job_id, "job id", minimum=1)
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": str(job_id),
        "X-Job-Id": str(job_id),
        "X-Job-Attempt": str(_count(invocation.attempt, "attempt", minimum=0)),
        "X-Worker-Id": _worker_id(invocation.worker_id),
        "X-Database-Id": _uuid(invocation.database_id, "database id"),
    }
    if invocation.callback_url is not None:
        headers["X-Callback-Url"] = _http_url(invocation.callback_url, "callback URL")
    if invocation.current_user_id is not None:
        headers["X-Current-User-Id"] = _uuid(invocation.current_user_id, "current user id")
    return headers


def _count(value: object, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInvocation(f"{what} must be an integer >= {minimum}")
    return value


def _worker_id(value: object) -> str:
    if not isinstance(value, str) or not _WORKER_ID.fullmatch(value):
        raise InvalidInvocation("worker id must match [A-Za-z0-9._:-]{4,64}")
    return value


def _uuid(value: object, what: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidInvocation(f"{what} is not a UUID") from None


def _http_url(value: object, what: str) -> str:
    if not isinstance(value, str) or not _VISIBLE_ASCII.fullmatch(value):
        raise InvalidInvocation(f"{what} must be printable ASCII without spaces")
    parts = urlsplit(value)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise InvalidInvocation(f"{what} must be an http(s) URL")
    return value


def _label(task: object) -> str:
    """A task name fit for a message or a log line, whatever it contains."""
    return clean_text(repr(task), 80)


# -- URLs -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """A configured base URL, parsed once; builds URLs below it and checks them."""

    scheme: str
    host: str
    port: int | None
    path: str

    @classmethod
    def parse(cls, url: str, what: str) -> _Origin:
        parts = urlsplit(url.strip())
        try:
            port = parts.port
        except ValueError:
            raise ConfigurationError(f"{what} has an invalid port") from None
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ConfigurationError(f"{what} must be an http(s) URL with a host")
        if parts.username is not None or parts.query or parts.fragment:
            raise ConfigurationError(f"{what} must not carry credentials, a query or a fragment")
        if not _PLAIN_PATH.fullmatch(parts.path):
            raise ConfigurationError(f"{what} has a path lqjobs cannot extend safely")
        if port == _DEFAULT_PORTS[parts.scheme]:
            port = None
        return cls(parts.scheme, parts.hostname, port, parts.path)

    def url(self, path: str = "") -> httpx.URL:
        """This origin's URL with ``path`` appended below its own path, checked."""
        full_path = (self.path.rstrip("/") + path if path else self.path) or "/"
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = host if self.port is None else f"{host}:{self.port}"
        url = urlunsplit((self.scheme, netloc, full_path, "", ""))
        return _check_url(url, self.scheme, self.host, self.port, full_path)


def _check_url(url: str, scheme: str, host: str, port: int | None, path: str) -> httpx.URL:
    """``url`` parsed as the HTTP client will send it; refused unless that is exactly
    the intended origin and path."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise InvalidInvocation("refusing to call a URL that does not parse") from None
    intended = (scheme, host, port, path, b"", "", b"")
    actual = (
        parsed.scheme,
        parsed.host,
        parsed.port,
        parsed.path,
        parsed.query,
        parsed.fragment,
        parsed.userinfo,
    )
    if actual != intended or scheme not in _DEFAULT_PORTS:
        raise InvalidInvocation("refusing to call a URL outside the intended origin")
    return parsed


def _service_suffix(value: str) -> tuple[str, int | None]:
    """``KNATIVE_SERVICE_URL`` (``default.example.com[:port]``) as a checked host and port."""
    host, _, port_text = value.strip().lower().partition(":")
    labels = host.split(".")
    if len(host) > 190 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigurationError(
            "KNATIVE_SERVICE_URL must be a host name such as default.example.com"
        )
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ConfigurationError("KNATIVE_SERVICE_URL has an invalid port")
    return host, int(port_text) if port_text else None


# -- the HTTP exchange ------------------------------------------------------------


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


class FunctionClient:
    """The one HTTP connection pool every HTTP executor shares: an httpx transport,
    called directly. ``httpx.Client`` around it (cookie jar, auth, redirects, URL
    merging) cost a third of each call's CPU and does nothing for one POST to a
    function. A transport never follows a redirect and never reads proxy settings
    from the environment."""

    DEFAULT_HEADERS: ClassVar[Mapping[str, str]] = {
        "User-Agent": "lqjobs",
        "Accept-Encoding": "identity",
    }

    def __init__(self, timeout: httpx.Timeout, transport: httpx.BaseTransport) -> None:
        self.timeout = timeout
        self._transport = transport
        self._extensions = {"timeout": timeout.as_dict()}

    @contextlib.contextmanager
    def post(
        self, url: httpx.URL, headers: Mapping[str, str], body: bytes
    ) -> Iterator[httpx.Response]:
        """POST ``body``; the response's body is read from the stream, at most as much
        as the caller asks for, and the connection goes back to the pool on exit."""
        request = httpx.Request(
            "POST",
            url,
            headers={**self.DEFAULT_HEADERS, **headers},
            content=body,
            extensions=self._extensions,
        )
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


def _post(client: FunctionClient, request: _Request, task: str) -> _Reply | Failed:
    try:
        with client.post(request.url, request.headers, request.body) as response:
            job_error = response.headers.get("x-job-error", "").strip().lower() == "true"
            return _Reply(response.status_code, job_error, _read_prefix(response))
    except httpx.TimeoutException as exc:
        return Failed(_timeout_message(client.timeout, exc, task))
    except httpx.ConnectError as exc:
        return Failed(f"connection failed: {task}: {clean_text(str(exc), 120)}")
    except httpx.HTTPError as exc:
        return Failed(f"transport error: {task}: {type(exc).__name__}: {clean_text(str(exc), 120)}")


def _read_prefix(response: httpx.Response) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) >= MAX_RESPONSE_BYTES:
            break
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
    return classify_status(reply.status, retry_on_404=retry_on_404, task=task, detail=detail)


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
    return clean_text(text) or "no message"


# -- the HTTP executors ----------------------------------------------------------


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
            _log_refused(self.name, invocation, str(exc))
            return Failed(str(exc), permanent=True)
        task = clean_text(invocation.task_identifier, 80)
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
        _log_outcome(self.name, invocation, outcome, status, time.monotonic() - started)
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


class OpenFaaSExecutor(_HttpExecutor):
    """OpenFaaS through its gateway: ``/function/<task>`` or ``/async-function/<task>``.

    Asynchronous calls pass ``X-Callback-Url`` and ``X-Call-Id``; the gateway
    answers 202 and its queue-worker posts the function's result to the
    callback URL later, so the outcome is :class:`Deferred`.
    """

    def __init__(
        self,
        client: FunctionClient,
        gateway_url: str,
        *,
        asynchronous: bool,
        retry_on_404: bool = True,
    ) -> None:
        super().__init__(client, retry_on_404)
        self.name = "openfaas-async" if asynchronous else "openfaas"
        self._gateway = _Origin.parse(gateway_url, "INTERNAL_GATEWAY_URL")
        self._asynchronous = asynchronous

    def _request(self, invocation: Invocation) -> _Request:
        task = function_name(invocation.task_identifier)
        headers = build_headers(invocation)
        if self._asynchronous:
            if invocation.callback_url is None:
                raise InvalidInvocation("openfaas-async needs a callback URL")
            if not _CALL_ID.fullmatch(invocation.call_id):
                raise InvalidInvocation("call id must match [A-Za-z0-9._:-]{1,128}")
            headers["X-Call-Id"] = invocation.call_id
        route = "async-function" if self._asynchronous else "function"
        return _Request(self._gateway.url(f"/{route}/{task}"), headers, _body(invocation))

    def _outcome(self, reply: _Reply, task: str) -> Outcome:
        if self._asynchronous and 200 <= reply.status < 300:
            return Deferred()
        return super()._outcome(reply, task)


class KnativeExecutor(_HttpExecutor):
    """A Knative service per task: ``http://<task>.<namespace>.svc.cluster.local/``.

    With ``service_suffix`` (``KNATIVE_SERVICE_URL``) the host is
    ``<task>.<suffix>``. With ``ingress_url`` the request goes to the ingress
    (Kourier, Istio), which routes on the ``Host`` header.
    """

    name = "knative"

    def __init__(
        self,
        client: FunctionClient,
        *,
        namespace: str = "default",
        service_suffix: str | None = None,
        ingress_url: str | None = None,
        retry_on_404: bool = True,
    ) -> None:
        super().__init__(client, retry_on_404)
        if service_suffix:
            self._suffix, self._port = _service_suffix(service_suffix)
        elif _DNS_LABEL.fullmatch(namespace):
            self._suffix, self._port = f"{namespace}.svc.cluster.local", None
        else:
            raise ConfigurationError("LQJOBS_KNATIVE_NAMESPACE must be a DNS label")
        self._ingress = (
            _Origin.parse(ingress_url, "LQJOBS_KNATIVE_INGRESS_URL") if ingress_url else None
        )

    def service_host(self, task: str) -> str:
        """``Host`` of the task's service (with the suffix's port, if it has one)."""
        host = f"{function_name(task)}.{self._suffix}"
        return host if self._port is None else f"{host}:{self._port}"

    @functools.cached_property
    def _ingress_url(self) -> httpx.URL | None:
        """The ingress' URL, the same for every task: built and checked once (a check
        that fails is not cached, so every job fails as before). None: no ingress."""
        return None if self._ingress is None else self._ingress.url("/")

    def _request(self, invocation: Invocation) -> _Request:
        authority = self.service_host(invocation.task_identifier)
        headers = build_headers(invocation)
        ingress = self._ingress_url
        if ingress is not None:
            headers["Host"] = authority
            return _Request(ingress, headers, _body(invocation))
        host = authority.partition(":")[0]
        port = self._port if self._port != 80 else None
        url = _check_url(f"http://{authority}/", "http", host, port, "/")
        return _Request(url, headers, _body(invocation))


class DevMapExecutor(_HttpExecutor):
    """``INTERNAL_GATEWAY_DEVELOPMENT_MAP``: a fixed URL per task.

    An unknown task fails permanently. It never falls back to the callback URL
    (the Node runtime does, so such a job "completes" itself).
    """

    name = "devmap"

    def __init__(
        self, client: FunctionClient, mapping: Mapping[str, str], retry_on_404: bool = True
    ) -> None:
        super().__init__(client, retry_on_404)
        self._origins = {
            task: _Origin.parse(url, f"development URL for task {_label(task)}")
            for task, url in mapping.items()
        }

    def _request(self, invocation: Invocation) -> _Request:
        origin = self._origins.get(invocation.task_identifier)
        if origin is None:
            raise InvalidInvocation(
                f"no development URL for task {_label(invocation.task_identifier)}"
            )
        return _Request(origin.url(), build_headers(invocation), _body(invocation))


# -- Python handlers in the Celery app -------------------------------------------

Handler: TypeAlias = Callable[[Any, Invocation], None]
_H = TypeVar("_H", bound=Handler)


class HandlerRegistry:
    """Python functions that run jobs in the Celery worker itself."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def handler(self, task: str) -> Callable[[_H], _H]:
        """Decorator: ``@registry.handler("send-email")`` on ``fn(payload, job)``."""

        def register(fn: _H) -> _H:
            self.register(task, fn)
            return fn

        return register

    def register(self, task: str, fn: Handler) -> None:
        known = self._handlers.get(task)
        if known is not None and _qualified_name(known) != _qualified_name(fn):
            raise ConfigurationError(f"task {_label(task)} already has a handler")
        self._handlers[task] = fn

    def unregister(self, task: str) -> None:
        self._handlers.pop(task, None)

    def get(self, task: str) -> Handler | None:
        return self._handlers.get(task)

    def tasks(self) -> frozenset[str]:
        return frozenset(self._handlers)


def _qualified_name(fn: Handler) -> str:
    # A module reload registers a new function object under the same name.
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


handlers = HandlerRegistry()
job_handler = handlers.handler


class NativeExecutor:
    """Runs the handler registered for the task, with the payload parsed from JSON.

    Celery's ``SoftTimeLimitExceeded`` is re-raised for the task to record as a
    timeout; every other exception from a handler becomes :class:`Failed`.
    """

    name = "native"

    def __init__(self, registry: HandlerRegistry) -> None:
        self._registry = registry

    def invoke(self, invocation: Invocation) -> Outcome:
        started = time.monotonic()
        outcome = self._run(invocation)
        _log_outcome(self.name, invocation, outcome, None, time.monotonic() - started)
        return outcome

    def _run(self, invocation: Invocation) -> Outcome:
        fn = self._registry.get(invocation.task_identifier)
        if fn is None:
            message = f"no handler registered for task {_label(invocation.task_identifier)}"
            return Failed(message, permanent=True)
        try:
            payload = json.loads(invocation.payload)
        except (ValueError, TypeError, RecursionError):
            return Failed("payload is not valid JSON", permanent=True)
        try:
            fn(payload, invocation)
        except PermanentJobError as exc:
            return Failed(clean_text(str(exc)) or "permanent failure", permanent=True)
        except Exception as exc:
            if type(exc).__name__ == "SoftTimeLimitExceeded":
                raise  # Celery's soft time limit is the task's to handle (without importing it)
            detail = clean_text(str(exc))
            return Failed(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)
        return Done()


class UnavailableExecutor:
    """Stands in for an executor whose configuration is missing or invalid."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason

    def invoke(self, invocation: Invocation) -> Outcome:
        message = f"executor {self.name} is not configured: {self.reason}"
        _log_refused(self.name, invocation, message)
        return Failed(message, permanent=True)


# -- wiring -----------------------------------------------------------------------


def make_http_client(settings: Settings) -> FunctionClient:
    """The one pooled client every HTTP executor shares."""
    # identity encoding (FunctionClient.DEFAULT_HEADERS): a compressed reply could
    # expand far past MAX_RESPONSE_BYTES per chunk.
    transport = httpx.HTTPTransport(
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=16, keepalive_expiry=30),
        trust_env=False,  # no SSL_CERT_FILE / SSL_CERT_DIR from the environment either
    )
    timeout = httpx.Timeout(settings.http_timeout, connect=settings.http_connect_timeout)
    return FunctionClient(timeout, transport)


class ExecutorRouter:
    """Picks the executor configured for a task; executors are built once."""

    def __init__(self, settings: Settings, executors: Mapping[str, JobExecutor]) -> None:
        self._settings = settings
        self._executors = dict(executors)

    def for_task(self, task_identifier: str) -> JobExecutor:
        name = self._settings.executor_for(task_identifier)
        executor = self._executors.get(name)
        return executor if executor is not None else UnavailableExecutor(name, "not built")

    @property
    def executors(self) -> Mapping[str, JobExecutor]:
        return dict(self._executors)


def build_router(
    settings: Settings, client: FunctionClient, registry: HandlerRegistry = handlers
) -> ExecutorRouter:
    names = {settings.executor, *settings.task_executors.values()}
    executors: dict[str, JobExecutor] = {
        name: _build_executor(name, settings, client, registry) for name in names
    }
    return ExecutorRouter(settings, executors)


def _build_executor(
    name: str, settings: Settings, client: FunctionClient, registry: HandlerRegistry
) -> JobExecutor:
    try:
        return _construct(name, settings, client, registry)
    except ConfigurationError as exc:
        logger.warning(
            "executor not configured",
            extra={"action": "executor_unavailable", "executor": name, "reason": str(exc)},
        )
        return UnavailableExecutor(name, str(exc))


def _construct(
    name: str, settings: Settings, client: FunctionClient, registry: HandlerRegistry
) -> JobExecutor:
    retry_on_404 = settings.retry_on_404
    match name:
        case "openfaas" | "openfaas-async":
            if not settings.internal_gateway_url:
                raise ConfigurationError("INTERNAL_GATEWAY_URL is not set")
            return OpenFaaSExecutor(
                client,
                settings.internal_gateway_url,
                asynchronous=name == "openfaas-async",
                retry_on_404=retry_on_404,
            )
        case "knative":
            return KnativeExecutor(
                client,
                namespace=settings.knative_namespace,
                service_suffix=settings.knative_service_url,
                ingress_url=settings.knative_ingress_url,
                retry_on_404=retry_on_404,
            )
        case "devmap":
            if not settings.internal_gateway_development_map:
                raise ConfigurationError("INTERNAL_GATEWAY_DEVELOPMENT_MAP is empty")
            mapping = settings.internal_gateway_development_map
            return DevMapExecutor(client, mapping, retry_on_404=retry_on_404)
        case "native":
            return NativeExecutor(registry)
    raise ConfigurationError(f"unknown executor {name!r}")


# -- logs (job id, task, status, duration; never payloads) -------------------------


def _log_outcome(
    executor: str, invocation: Invocation, outcome: Outcome, status: int | None, seconds: float
) -> None:
    failed = isinstance(outcome, Failed)
    level = logging.WARNING if failed else logging.INFO
    if not logger.isEnabledFor(level):  # the fields cost more than the call to log
        return
    permanent = isinstance(outcome, Failed) and outcome.permanent
    logger.log(
        level,
        "function invoked",
        extra={
            "action": "function_failed" if failed else "function_invoked",
            "executor": executor,
            "job_id": invocation.job_id,
            "task": clean_text(str(invocation.task_identifier), 80),
            "attempt": invocation.attempt,
            "outcome": type(outcome).__name__.lower(),
            "permanent": permanent,
            "status": status,
            "duration": round(seconds, 4),
        },
    )


def _log_refused(executor: str, invocation: Invocation, reason: str) -> None:
    logger.warning(
        "invocation refused",
        extra={
            "action": "invocation_refused",
            "executor": executor,
            "job_id": invocation.job_id,
            "task": clean_text(str(invocation.task_identifier), 80),
            "reason": reason,
        },
    )
