"""The callback service's HTTP server: ``POST /callback`` and ``GET /healthz`` on the
standard library's threading server, plus the deadline reaper beside it.

Each request is read whole (at most 64 KiB, ``Content-Length`` required) and handed
to :class:`~lqjobs.callback.service.CallbackService`; one request per connection.
"""

from __future__ import annotations

import logging
import re
import threading
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import redis
from psycopg_pool import ConnectionPool

from lqjobs import db
from lqjobs.broker_state import DeferredDeadlines, is_redis
from lqjobs.callback import tokens
from lqjobs.callback.deadlines import DeadlineReaper
from lqjobs.callback.parsing import MAX_BODY_BYTES, CallbackRequest
from lqjobs.callback.service import CallbackService, Reply
from lqjobs.db.fence import Fence
from lqjobs.errors import ConfigurationError
from lqjobs.settings import Settings

log = logging.getLogger(__name__)

_CONTENT_LENGTH = re.compile(r"[0-9]{1,12}")
# Headers read by the service: a request repeating one with different values is refused.
_SINGLE = frozenset(
    {"x-job-id", "x-worker-id", "x-job-error", "x-function-status", "x-retry", "x-retry-max"}
)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() then waits for the requests in flight
    block_on_close = True
    # The standard library listens with a backlog of 5. A burst of callbacks (the
    # queue-worker finishing many calls at once) overflowed it: the kernel drops the
    # SYN, the poster times out and never retries, and the job waits for its
    # deadline (found by the chaos suite, F16 run).
    request_queue_size = 1024
    service: CallbackService

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("callback request crashed", extra={"action": "callback_crashed"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lqjobs-callback"
    sys_version = ""
    timeout = 10  # a client stalling mid-request cannot hold a thread, or the shutdown, longer
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    @property
    def service(self) -> CallbackService:
        return cast(_HTTPServer, self.server).service

    def do_POST(self) -> None:
        path, _, query = self.path.partition("?")
        if path != "/callback":
            self._send(Reply(404, "not_found"))
            return
        headers = _single_headers(self.headers)
        body = self._read_body()
        if isinstance(body, Reply):
            self._send(self.service.refused(body))
        elif headers is None:
            self._send(self.service.refused(Reply(400, "bad_request")))
        else:
            self._send(self.service.handle(CallbackRequest(query, headers, body)))

    def do_GET(self) -> None:
        if self.path != "/healthz":
            self._send(Reply(404, "not_found"))
        elif self.service.healthy():
            self._send(Reply(200, "ok"))
        else:
            self._send(Reply(503, "database_unavailable"))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every other method
            return lambda: self._send(Reply(404, "not_found"))
        raise AttributeError(name)

    def _read_body(self) -> bytes | Reply:
        if "Transfer-Encoding" in self.headers:
            return Reply(411, "length_required")
        length = (self.headers.get("Content-Length") or "0").strip()
        if not _CONTENT_LENGTH.fullmatch(length):
            return Reply(400, "bad_request")
        if int(length) > MAX_BODY_BYTES:
            return Reply(413, "too_large")
        body = self.rfile.read(int(length))
        return body if len(body) == int(length) else Reply(400, "bad_request")

    def _send(self, reply: Reply) -> None:
        payload = reply.body()
        self.close_connection = True  # one request per connection: shutdown drains quickly
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            pass  # the client left; the outcome is recorded either way

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request line holds the token; the service logs what matters


def _single_headers(message: Message) -> dict[str, str] | None:
    """Headers by lower-cased name; None when one the service reads is repeated with
    different values."""
    headers: dict[str, str] = {}
    for name, value in message.items():
        key = name.lower()
        if key in headers and key in _SINGLE and headers[key] != value:
            return None
        headers.setdefault(key, value)
    return headers


class CallbackServer:
    """The HTTP server around a :class:`CallbackService`, plus its deadline reaper.

    ``start()`` serves in a background thread; ``stop()`` stops accepting, waits for
    the requests in flight, then stops the reaper and closes the pool. ``stop()`` and
    ``request_stop()`` are idempotent; ``request_stop()`` is safe in a signal handler.
    """

    def __init__(
        self, service: CallbackService, host: str, port: int, reaper: DeadlineReaper | None
    ) -> None:
        self.service = service
        self.reaper = reaper
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.service = service
        self._thread: threading.Thread | None = None
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> CallbackServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="callback-http"
        )
        self._thread.start()
        if self.reaper is not None:
            self.reaper.start()
        host, port = self._httpd.server_address[:2]
        extra = {"action": "callback_started", "address": f"{host!s}:{port}"}
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
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()  # joins the request threads: in-flight callbacks finish
        if self.reaper is not None:
            self.reaper.stop()
        self.service.close()
        log.info("callback service stopped", extra={"action": "callback_stopped"})


def build_server(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    reaper_interval: float = 1.0,
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
        return CallbackServer(service, host, port, reaper)
    except OSError as exc:
        service.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _pool(settings: Settings) -> ConnectionPool[db.Connection]:
    return ConnectionPool(
        settings.conninfo(),
        min_size=1,
        max_size=settings.db_pool_size,
        kwargs={"autocommit": True},
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
