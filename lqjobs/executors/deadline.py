"""One wall-clock deadline over a whole HTTP exchange: connect, send, headers, body.

httpx's timeouts bound each network operation, so a function that sends a byte now and
then never trips them and a call can outlive the task's limits and its lease
(docs/design.md, F12). :func:`exchange_deadline` sets the deadline of the exchange that
runs in the current thread, and two things hold it:

- :class:`DeadlineTransport`'s network streams shrink every connect, read, write and TLS
  handshake to the time left, so even a blocked read returns at the deadline and the
  connection is closed: no watchdog thread, one clock read per operation;
- :func:`check_deadline`, called between the chunks of a body, holds it over any
  transport.

Past the deadline both raise :class:`DeadlineExceeded`.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

_deadline: ContextVar[float | None] = ContextVar("lqjobs_http_deadline", default=None)

# A request body goes out in slices, each bounded by the time left: httpcore bounds
# each send, so one large write to a peer that reads slowly could otherwise go on.
_WRITE_SLICE = 16 * 1024


class DeadlineExceeded(httpx.TimeoutException):
    """The exchange was still going on at its deadline."""


class _Expired(httpcore.TimeoutException):
    """:class:`DeadlineExceeded` below httpx, until the transport translates it."""


@contextlib.contextmanager
def exchange_deadline(seconds: float | None) -> Iterator[None]:
    """Everything in the block shares one deadline ``seconds`` from now (None: none)."""
    if seconds is None:
        yield
        return
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def check_deadline() -> None:
    """Raise :class:`DeadlineExceeded` if the current exchange's deadline has passed."""
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("deadline passed")


def _bounded(timeout: float | None) -> float | None:
    """``timeout`` shrunk to the time left before the deadline; _Expired when none is."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Expired("deadline passed")
    return left if timeout is None or left < timeout else timeout


def _expired(bounded: float | None, timeout: float | None, exc: Exception) -> Exception:
    """A timeout of an operation the deadline cut short is the deadline's."""
    return _Expired("deadline passed") if bounded != timeout else exc


class _BoundedStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        bounded = _bounded(timeout)
        try:
            return self._stream.read(max_bytes, bounded)
        except httpcore.TimeoutException as exc:
            raise _expired(bounded, timeout, exc) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), _WRITE_SLICE):
            bounded = _bounded(timeout)
            try:
                self._stream.write(buffer[start : start + _WRITE_SLICE], bounded)
            except httpcore.TimeoutException as exc:
                raise _expired(bounded, timeout, exc) from exc

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout)
        try:
            return _BoundedStream(self._stream.start_tls(ssl_context, server_hostname, bounded))
        except httpcore.TimeoutException as exc:
            raise _expired(bounded, timeout, exc) from exc

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _BoundedBackend(httpcore.NetworkBackend):
    """httpcore's own sockets, with every operation bounded by the deadline."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        bounded = _bounded(timeout)
        try:
            stream = self._backend.connect_tcp(host, port, bounded, local_address, socket_options)
        except httpcore.TimeoutException as exc:
            raise _expired(bounded, timeout, exc) from exc
        return _BoundedStream(stream)


# httpcore's errors and the httpx errors callers catch, the most specific first.
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (_Expired, DeadlineExceeded),
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


@contextlib.contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core, mapped in _ERRORS:
            if isinstance(exc, core):
                raise mapped(str(exc)) from exc
        raise


class _Body(httpx.SyncByteStream):
    def __init__(self, response: httpcore.Response) -> None:
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors():
            yield from self._response.iter_stream()

    def close(self) -> None:
        self._response.close()


class DeadlineTransport(httpx.BaseTransport):
    """httpcore's connection pool on :class:`_BoundedBackend`: ``httpx.HTTPTransport``
    takes no network backend. Like the transport lqjobs used before, it follows no
    redirect and reads no proxy or certificate settings from the environment."""

    def __init__(self, limits: httpx.Limits) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_BoundedBackend(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        url = request.url
        core = httpcore.Request(
            request.method,
            httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = self._pool.handle_request(core)
        return httpx.Response(
            response.status,
            headers=response.headers,
            stream=_Body(response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()
