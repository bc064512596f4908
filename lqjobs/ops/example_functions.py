"""Fake function platforms on 127.0.0.1: real HTTP, for tests and ``lqjobs dev``.

One threaded HTTP server plays every platform lqjobs calls:

``POST /``                        a Knative ingress: the function is the first label of ``Host``
``POST /function/<task>``         the OpenFaaS gateway, synchronous
``POST /async-function/<task>``   the OpenFaaS gateway, asynchronous: 202 at once, then the
                                  function runs and its result is POSTed to ``X-Callback-Url``
                                  the way the queue-worker does it
``POST /fn/<task>``               a plain per-task URL (``INTERNAL_GATEWAY_DEVELOPMENT_MAP``)

Every task name is a function. Like the Node wrapper, a function echoes
``X-Worker-Id`` / ``X-Job-Id`` / ``X-Database-Id`` as response headers.

Behaviour comes from the job payload (a JSON object) over per-task defaults
given as ``FunctionServer(tasks={"slow": {"sleep": 1}})``:

``sleep``: seconds     work this long before answering
``fast_calls``: int    the first N calls of a job skip ``sleep``
``status``: int        answer with this status (default 200)
``error``: str         fail with this message
``fail_times``: int    fail the first N calls for this job id, then succeed
``legacy``: bool       fail the Node wrapper's way: 200, ``X-Job-Error: true``, ``{"message"}``
                       (otherwise a failure is ``status`` if >= 400, else 500, ``{"message"}``)
``redirect``: url      answer 302 with this ``Location``
``hang``: bool         never answer (until the server stops)
``unreachable``: bool  sync: drop the connection unanswered; async: the queue-worker could not
                       reach the function and posts a 503 callback without function headers
``drop_callback``: bool  async: run the function but never post the callback
``callback_copies``: int  async: post the callback this many times (a retrying proxy)
``callback_delay``: seconds  async: wait this long before posting the callback
``late_calls``: int       async: only the first N calls of a job wait ``callback_delay`` (0: all)
``trickle``: seconds      sync: send the reply one byte per this many seconds, for 5 minutes
                          (the body is padded with spaces); recorded once it ends, with status
                          499 if the caller hung up first
``trickle_headers``: bool  trickle the status line and headers too (else they go at once)
``trickle_calls``: int    only the first N calls of a job trickle (0: all)
``gate``: str             wait until ``server.open_gate(<gate>)`` (or the server stops),
                          then answer as the other options say
"""

from __future__ import annotations

import http.client
import json
import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, cast
from urllib.parse import urlsplit

from lqjobs.ops.function_calls import Behaviour, CallLog, CallRecord

logger = logging.getLogger(__name__)

_ECHOED = ("X-Worker-Id", "X-Job-Id", "X-Database-Id")
_MAX_BODY = 8 * 1024 * 1024
_TRICKLE_SECONDS = 300  # a trickled reply ends by itself after this long
_HUNG_UP = 499  # the status recorded for a reply its caller did not wait for


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    pace: float = 0.0  # > 0: trickled, one byte per ``pace`` seconds
    pace_headers: bool = False  # the status line and headers trickle too


@dataclass(frozen=True)
class _Call:
    """A request as the function sees it."""

    route: str
    task: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    started: float = field(default_factory=time.monotonic)


class FunctionServer:
    """``with FunctionServer() as server:`` — ``server.url``, ``server.port``, ``server.calls``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tasks: Mapping[str, Mapping[str, Any]] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.calls = CallLog(log_path)
        self._tasks = dict(tasks or {})
        self._host, self._requested_port = host, port
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int | None], int] = {}
        self._workers: list[threading.Thread] = []
        self._gates: dict[str, threading.Event] = {}
        self._httpd: _Server | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FunctionServer:
        self._httpd = _Server((self._host, self._requested_port), _Handler)
        self._httpd.app = self
        thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        self._workers.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging and sleeping functions
        with self._lock:
            for gate in self._gates.values():
                gate.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for thread in self._workers:
            thread.join(timeout=5)

    def __enter__(self) -> FunctionServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def dev_url(self, task: str) -> str:
        """The plain per-task URL, for ``INTERNAL_GATEWAY_DEVELOPMENT_MAP``."""
        return f"{self.url}/fn/{task}"

    # -- routing -----------------------------------------------------------------

    def route(self, path: str, host: str) -> tuple[str, str] | None:
        """(route, task) for a request path and Host header; None when nothing serves it."""
        if path == "/":
            name, dot, _ = host.partition(".")
            return ("knative", name) if dot and name[:1].isalpha() else None
        for prefix, route in (
            ("/function/", "openfaas"),
            ("/async-function/", "openfaas-async"),
            ("/fn/", "plain"),
        ):
            task = path.removeprefix(prefix)
            if task != path and task and "/" not in task:
                return route, task
        return None

    def handle(self, call: _Call) -> _Reply | None:
        """Answer a request; None means "close the connection without answering"."""
        if call.route == "openfaas-async":
            return self._accept_async(call)
        behaviour = self._behaviour(call)
        if behaviour.unreachable:
            return None
        reply = self._run(call, behaviour)
        if reply is not None and not reply.pace:  # a trickle is recorded once it ends
            self._record(call, reply)
        return reply

    def trickle(self, call: _Call, reply: _Reply, sock: socket.socket) -> None:
        """Send ``reply`` on ``sock`` one byte at a time, then record the call: its end is
        when the last byte went out, the caller hung up or the server stopped."""
        body = reply.body.ljust(int(_TRICKLE_SECONDS / reply.pace))
        head = _head(reply, len(body))
        slow = head + body if reply.pace_headers else body
        status = reply.status
        try:
            if not reply.pace_headers:
                sock.sendall(head)
            for at in range(len(slow)):
                if self._hung_up(sock, reply.pace):
                    status = 0 if self._stopping.is_set() else _HUNG_UP
                    break
                sock.sendall(slow[at : at + 1])
        except OSError:  # reset by the caller
            status = _HUNG_UP
        self._record(call, _Reply(status))

    def _hung_up(self, sock: socket.socket, wait: float) -> bool:
        """Wait ``wait`` seconds; True as soon as the caller closed or the server stops."""
        readable, _, _ = select.select([sock], [], [], wait)
        if self._stopping.is_set():
            return True
        if not readable:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # -- the function --------------------------------------------------------------

    def _behaviour(self, call: _Call) -> Behaviour:
        try:
            payload = json.loads(call.body)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to parse here
            payload = None
        options = payload if isinstance(payload, dict) else {}
        return Behaviour.from_options(self._tasks.get(call.task, {}), options)

    def _run(self, call: _Call, behaviour: Behaviour) -> _Reply | None:
        nth = self._count(call)
        if behaviour.gate is not None:
            self._gate(behaviour.gate).wait()
        if behaviour.hang:
            self._record(call, _Reply(0))
            self._stopping.wait()
            return None
        if behaviour.sleep > 0 and nth > behaviour.fast_calls:
            self._stopping.wait(behaviour.sleep)
        echoed = {
            name: call.headers[name.lower()] for name in _ECHOED if name.lower() in call.headers
        }
        headers = {"Content-Type": "application/json", **echoed}
        if behaviour.redirect:
            return _Reply(302, {**headers, "Location": behaviour.redirect})
        error = behaviour.error
        if error is None and nth <= behaviour.fail_times:
            error = f"failing call {nth} of {behaviour.fail_times}"
        if error is not None:
            return _failure(error, behaviour, headers)
        if behaviour.status != 200:
            return _Reply(
                behaviour.status, headers, _json({"message": f"status {behaviour.status}"})
            )
        body = _json({"complete": True, "task": call.task})
        if behaviour.trickle > 0 and nth <= (behaviour.trickle_calls or nth):
            return _Reply(200, headers, body, behaviour.trickle, behaviour.trickle_headers)
        return _Reply(200, headers, body)

    def open_gate(self, name: str) -> None:
        """Let the calls waiting at gate ``name`` go on, and later ones pass."""
        self._gate(name).set()

    def _gate(self, name: str) -> threading.Event:
        with self._lock:
            gate = self._gates.setdefault(name, threading.Event())
            if self._stopping.is_set():
                gate.set()
            return gate

    def calls_in_progress(self) -> int:
        """Calls started and not yet in ``calls`` (a hang is recorded as it starts)."""
        with self._lock:
            started = sum(self._seen.values())
        return started - len(self.calls)

    def _count(self, call: _Call) -> int:
        key = (call.task, _int_header(call.headers, "x-job-id"))
        with self._lock:
            self._seen[key] = self._seen.get(key, 0) + 1
            return self._seen[key]

    def _record(
        self,
        call: _Call,
        reply: _Reply,
        callback_status: int | None = None,
        ended: float | None = None,
    ) -> None:
        self.calls.append(
            CallRecord(
                route=call.route,
                task=call.task,
                job_id=_int_header(call.headers, "x-job-id"),
                attempt=_int_header(call.headers, "x-job-attempt"),
                started=call.started,
                ended=time.monotonic() if ended is None else ended,
                status=reply.status,
                headers=dict(call.headers),
                body=call.body,
                callback_status=callback_status,
            )
        )

    # -- OpenFaaS async: gateway + queue-worker ---------------------------------------

    def _accept_async(self, call: _Call) -> _Reply:
        call_id = call.headers.get("x-call-id") or str(uuid.uuid4())
        worker = threading.Thread(target=self._queue_worker, args=(call, call_id), daemon=True)
        with self._lock:
            self._workers = [t for t in self._workers if t.is_alive()] + [worker]
        worker.start()
        return _Reply(202, {"X-Call-Id": call_id})

    def _queue_worker(self, call: _Call, call_id: str) -> None:
        behaviour = self._behaviour(call)
        started = time.monotonic()
        if behaviour.unreachable:
            reply: _Reply | None = None
            status = 503
        else:
            reply = self._run(call, behaviour)
            if reply is None:
                return
            status = reply.status
        ended = time.monotonic()  # the function's end; its callback may come later
        callback = call.headers.get("x-callback-url")
        posted = None
        if callback and not behaviour.drop_callback:
            headers = dict(reply.headers) if reply is not None else {}
            headers.update(
                {
                    "X-Function-Status": str(status),
                    "X-Call-Id": call_id,
                    "X-Function-Name": call.task,
                    "X-Duration-Seconds": f"{time.monotonic() - started:f}",
                }
            )
            if behaviour.callback_delay > 0 and self._late(call, behaviour):
                self._stopping.wait(behaviour.callback_delay)
            body = reply.body if reply is not None else b""
            copies = [_post(callback, headers, body) for _ in range(behaviour.callback_copies)]
            posted = copies[0] if copies else None
        if reply is not None:
            self._record(call, reply, callback_status=posted, ended=ended)

    def _late(self, call: _Call, behaviour: Behaviour) -> bool:
        if not behaviour.late_calls:
            return True
        with self._lock:
            return self._seen.get((call.task, _int_header(call.headers, "x-job-id")), 0) <= (
                behaviour.late_calls
            )


def _failure(message: str, behaviour: Behaviour, headers: dict[str, str]) -> _Reply:
    body = _json({"message": message})
    if behaviour.legacy:
        return _Reply(200, {**headers, "X-Job-Error": "true"}, body)
    return _Reply(behaviour.status if behaviour.status >= 400 else 500, headers, body)


def _post(url: str, headers: Mapping[str, str], body: bytes) -> int | None:
    """POST once, like the queue-worker: a failure is logged, never retried."""
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname or "", parts.port, timeout=5)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", target, body=body, headers=dict(headers))
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as exc:
        logger.warning("callback failed", extra={"action": "callback_failed", "error": str(exc)})
        return None
    finally:
        connection.close()


def _head(reply: _Reply, length: int) -> bytes:
    """The status line and headers of ``reply``, as ``_Handler._answer`` sends them."""
    phrase = http.client.responses.get(reply.status, "")
    lines = [f"HTTP/1.1 {reply.status} {phrase}"]
    lines += [f"{name}: {value}" for name, value in reply.headers.items()]
    lines += [f"Content-Length: {length}", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    try:
        return int(headers.get(name, ""))
    except ValueError:
        return None


# -- the HTTP plumbing -------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many workers connect at once; the default backlog is 5
    app: FunctionServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A caller that went away mid-answer (its worker was killed) is routine here.
        logger.debug("functions: connection closed by the caller", exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    timeout = 10  # idle keep-alive connections end on their own

    def do_POST(self) -> None:
        app = cast(_Server, self.server).app
        found = app.route(urlsplit(self.path).path, self.headers.get("Host", ""))
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > _MAX_BODY:
            self._answer(_Reply(411 if not length.isdigit() else 413))
            return
        body = self.rfile.read(int(length))
        if found is None:
            self._answer(_Reply(404, {}, _json({"message": "no such function"})))
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        call = _Call(found[0], found[1], headers, body)
        reply = app.handle(call)
        if reply is None:
            self.close_connection = True
        elif reply.pace:
            self.close_connection = True
            app.trickle(call, reply, self.connection)
        else:
            self._answer(reply)

    def _answer(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("functions: " + format, *args)


def main(argv: list[str] | None = None) -> None:
    """``python -m lqjobs.example_functions``: serve until SIGTERM or Ctrl-C."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="Example functions: Knative and OpenFaaS fakes")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--log", type=Path, help="append every call to this JSON-lines file")
    args = parser.parse_args(argv)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    with FunctionServer(args.host, args.port, log_path=args.log) as server:
        print(f"example functions on {server.url}", flush=True)
        stopping.wait()


if __name__ == "__main__":
    main()
