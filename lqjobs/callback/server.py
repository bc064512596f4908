"""The callback service's HTTP server: ``POST /callback`` and ``GET /healthz`` on
Tornado's IO loop, plus the deadline reaper beside it.

One request per connection: its head is parsed by Tornado's strict HTTP/1 parsers,
its body (at most 64 KiB, by ``Content-Length``; chunked is 411) read whole, and
the request handed to :class:`~lqjobs.callback.service.CallbackService` on a
bounded set of worker threads, so the IO loop never waits on Postgres. What a
client may hold (a deadline over the whole request, a cap on connections, a bounded
drain on stop) is :mod:`lqjobs.callback.connections`; why: docs/design.md, S8.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, TypeVar

import redis
from psycopg_pool import ConnectionPool
from tornado import httputil
from tornado.iostream import IOStream, StreamClosedError, UnsatisfiableReadError
from tornado.netutil import bind_sockets
from tornado.tcpserver import TCPServer

from lqjobs import db
from lqjobs.broker_state import DeferredDeadlines, is_redis
from lqjobs.callback import tokens
from lqjobs.callback.connections import Connections, Limits, Workers
from lqjobs.callback.deadlines import DeadlineReaper
from lqjobs.callback.parsing import MAX_BODY_BYTES, CallbackRequest
from lqjobs.callback.service import CallbackService, Reply
from lqjobs.db.fence import Fence
from lqjobs.errors import ConfigurationError
from lqjobs.metrics import Sample
from lqjobs.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_HEAD_BYTES = 64 * 1024  # the request line and headers
# A burst of callbacks (the queue-worker finishing many calls at once) overflowed
# the standard library's backlog of 5: the kernel dropped the SYN and the poster
# never retried (found by the chaos suite, F16 run).
BACKLOG = 1024
_END_OF_HEAD = rb"\r?\n\r?\n"
_CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")
# Headers read by the service: a request repeating one with different values is refused.
_SINGLE = frozenset(
    {"x-job-id", "x-worker-id", "x-job-error", "x-function-status", "x-retry", "x-retry-max"}
)
_NOT_FOUND = Reply(404, "not_found")


class _Request:
    """A request read whole: what the service needs, or the refusal already decided."""

    def __init__(
        self, method: str, path: str, query: str, headers: dict[str, str] | None, body: bytes
    ) -> None:
        self.method, self.path, self.query = method, path, query
        self.headers, self.body = headers, body


class _Server(TCPServer):
    """Reads one request per connection and answers it once, under ``connections``."""

    def __init__(self, service: CallbackService, limits: Limits, workers: Workers) -> None:
        super().__init__(max_buffer_size=MAX_HEAD_BYTES + MAX_BODY_BYTES)
        self.service = service
        self.workers = workers
        self.connections = Connections(limits)

    async def handle_stream(self, stream: IOStream, address: Any) -> None:
        if not self.connections.admit(stream):
            return
        try:
            await self._exchange(stream)
        except (StreamClosedError, UnsatisfiableReadError):
            pass  # cut at its deadline, evicted, or the client left: nothing to answer
        except Exception:
            log.exception("callback request crashed", extra={"action": "callback_crashed"})
        finally:
            self.connections.forget(stream)
            stream.close()

    async def _exchange(self, stream: IOStream) -> None:
        request = await self._read(stream)
        self.connections.answering(stream)
        reply = request if isinstance(request, Reply) else await self._answer(request)
        await stream.write(_response(reply))

    async def _read(self, stream: IOStream) -> _Request | Reply:
        head = await stream.read_until_regex(_END_OF_HEAD, max_bytes=MAX_HEAD_BYTES)
        try:
            start, headers = _parse_head(head)
        except httputil.HTTPInputError:
            return self.service.refused(Reply(400, "bad_request"))  # its text is the client's
        path, _, query = start.path.partition("?")
        if (start.method, path) != ("POST", "/callback"):
            return _Request(start.method, path, query, None, b"")
        length = _body_length(headers)
        if isinstance(length, Reply):
            return self.service.refused(length)
        if length and headers.get("Expect", "").lower() == "100-continue":
            await stream.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await stream.read_bytes(length) if length else b""
        return _Request(start.method, path, query, _single_headers(headers.get_all()), body)

    async def _answer(self, request: _Request) -> Reply:
        if (request.method, request.path) == ("GET", "/healthz"):
            healthy = await self._off_loop(self.service.healthy)
            return Reply(200, "ok") if healthy else Reply(503, "database_unavailable")
        if (request.method, request.path) != ("POST", "/callback"):
            return _NOT_FOUND
        if request.headers is None:
            return self.service.refused(Reply(400, "bad_request"))
        callback = CallbackRequest(request.query, request.headers, request.body)
        return await self._off_loop(lambda: self.service.handle(callback))

    async def _off_loop(self, call: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.workers.submit(call))


def _parse_head(head: bytes) -> tuple[httputil.RequestStartLine, httputil.HTTPHeaders]:
    text = head.decode("latin-1")
    line, _, rest = text.lstrip("\r\n").partition("\n")
    return httputil.parse_request_start_line(line.rstrip("\r")), httputil.HTTPHeaders.parse(rest)


def _body_length(headers: httputil.HTTPHeaders) -> int | Reply:
    if "Transfer-Encoding" in headers:
        return Reply(411, "length_required")
    lengths = headers.get_list("Content-Length") or ["0"]
    length = lengths[0].strip()
    if len(set(lengths)) > 1 or not _CONTENT_LENGTH.fullmatch(length):
        return Reply(400, "bad_request")
    if int(length) > MAX_BODY_BYTES:
        return Reply(413, "too_large")
    return int(length)


def _single_headers(items: Iterable[tuple[str, str]]) -> dict[str, str] | None:
    """Headers by lower-cased name; None when one the service reads is repeated with
    different values."""
    headers: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        if key in headers and key in _SINGLE and headers[key] != value:
            return None
        headers.setdefault(key, value)
    return headers


def _response(reply: Reply) -> bytes:
    payload = reply.body()
    head = (
        f"HTTP/1.1 {reply.status} {HTTPStatus(reply.status).phrase}\r\n"
        f"Server: lqjobs-callback\r\nDate: {formatdate(usegmt=True)}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + payload


class CallbackServer:
    """The HTTP server around a :class:`CallbackService`, plus its deadline reaper.

    ``start()`` serves on an IO loop in a background thread; ``stop()`` stops
    accepting, lets the requests in flight finish within ``limits.drain_seconds``
    (closing what is left then), and stops the reaper and closes the pool. ``stop()``
    and ``request_stop()`` are idempotent; ``request_stop()`` is safe in a signal
    handler.
    """

    def __init__(
        self,
        service: CallbackService,
        host: str,
        port: int,
        reaper: DeadlineReaper | None,
        limits: Limits | None = None,
    ) -> None:
        self.service = service
        self.reaper = reaper
        self.limits = limits or Limits()
        self._sockets = bind_sockets(port, host, backlog=BACKLOG)
        bound, port = self._sockets[0].getsockname()[:2]
        self._url = f"http://[{bound}]:{port}" if ":" in bound else f"http://{bound}:{port}"
        self._workers = Workers(self.limits.workers)
        self._server: _Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def url(self) -> str:
        return self._url

    @property
    def open_connections(self) -> int:
        return 0 if self._server is None else self._server.connections.open

    def start(self) -> CallbackServer:
        self._thread = threading.Thread(target=self._run_loop, name="callback-http")
        self._thread.start()
        self._ready.wait()
        if self.reaper is not None:
            self.reaper.start()
        extra = {"action": "callback_started", "address": self.url.removeprefix("http://")}
        log.info("callback service listening", extra=extra)
        return self

    def run_forever(self) -> None:
        self.start()
        while not self._stop_requested.wait(1.0):
            pass
        self.stop()

    def request_stop(self) -> None:
        self._stop_requested.set()

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stop_requested.set()
        if self._thread is None:
            for sock in self._sockets:
                sock.close()
        elif self._loop is not None and self._stopping is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join()
        if self.reaper is not None:
            self.reaper.stop()
        self.service.close()
        cuts = {} if self._server is None else self._server.connections.cut_counts()
        log.info("callback service stopped", extra={"action": "callback_stopped", **cuts})

    def metrics(self) -> list[Sample]:
        server = self._server
        connections = [] if server is None else server.connections.samples()
        return [*self.service.metrics(), *connections]

    def _run_loop(self) -> None:
        try:
            asyncio.run(self._serve())
        finally:
            self._ready.set()  # start() must not wait for a loop that died

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._server = _Server(self.service, self.limits, self._workers)
        self._server.add_sockets(self._sockets)
        self._ready.set()
        await self._stopping.wait()
        self._server.stop()  # closes the listening sockets: new connections are refused
        cut = await self._server.connections.drain()
        self._workers.shutdown(wait=False)
        if cut:
            extra = {"action": "callback_drain_cut", "connections": cut}
            log.warning("callback connections closed at the drain bound", extra=extra)


def limits_for(settings: Settings) -> Limits:
    """The service's bounds for ``settings``; one worker thread per pooled connection."""
    return Limits(
        request_seconds=settings.callback_request_timeout,
        connections=settings.callback_max_connections,
        drain_seconds=settings.callback_drain_timeout,
        workers=settings.db_pool_size,
    )


def build_server(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    reaper_interval: float = 1.0,
    limits: Limits | None = None,
) -> CallbackServer:
    """The callback service as ``settings`` describe it (not started)."""
    if settings.callback_keys is None:
        raise ConfigurationError(
            "LQJOBS_CALLBACK_KEYS is not set: the callback service needs the keys "
            "that sign callback URLs (the workers' LQJOBS_CALLBACK_KEYS)"
        )
    keys = tokens.CallbackKeys.parse(settings.callback_keys.get_secret_value())
    host = settings.callback_host if host is None else host
    port = settings.internal_jobs_callback_port if port is None else port
    service = CallbackService(
        keys,
        _pool(settings),
        Fence(settings.jobs_schema),
        _deadlines(settings),
        settings.callback_deadline_seconds(),
        settings.retry_on_404,
    )
    reaper = None
    if service.deadlines is not None:
        reaper = DeadlineReaper(service.deadlines, service.fail_overdue, reaper_interval)
    try:
        return CallbackServer(service, host, port, reaper, limits or limits_for(settings))
    except OSError as exc:
        service.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _pool(settings: Settings) -> ConnectionPool[db.Connection]:
    return ConnectionPool(
        settings.conninfo(),
        min_size=1,
        max_size=settings.db_pool_size,
        kwargs={"autocommit": True, **db.session_options(settings.database_pool_mode)},
        check=ConnectionPool.check_connection,
        open=True,
        name="lqjobs-callback",
    )


def _deadlines(settings: Settings) -> DeferredDeadlines | None:
    broker = settings.broker_url.get_secret_value()
    if not is_redis(broker):
        log.warning(
            "broker is not redis: overdue callbacks are recovered by the lease expiry only",
            extra={"action": "deadlines_disabled"},
        )
        return None
    return DeferredDeadlines(redis.Redis.from_url(broker))
