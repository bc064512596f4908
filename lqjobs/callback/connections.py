"""What clients may hold of the callback service: connections, time and threads.

:class:`Connections` runs on the server's IO loop. It admits a connection under the
cap, arms one deadline over the whole request (head and body, from the accept),
disarms it once the request is in, and drains on stop within a bound.
:class:`Workers` runs the blocking part of an answer (Postgres) on a fixed number
of threads. Why these and not Tornado's own timeouts: docs/design.md, S8.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from tornado.iostream import IOStream

from lqjobs.metrics import Sample, counter_samples

P = ParamSpec("P")
T = TypeVar("T")
WARN_EVERY = 60.0  # seconds between two warnings that connections are being cut
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """The service's bounds (docs/design.md, S8)."""

    request_seconds: float = 10.0  # from the accept to the last byte of the body
    connections: int = 256  # open at once, reading or being answered
    drain_seconds: float = 10.0  # stop(): how long requests in flight may still take
    workers: int = 32  # threads answering at once (the database pool's size)


class Connections:
    """The open connections, oldest first, each reading its request or being answered.

    At the cap a new connection evicts the oldest one still reading (a slow client
    has been there longest, a genuine callback is read in milliseconds); when every
    slot is being answered, the new one is closed. Create and use it on the IO loop;
    ``open`` and ``samples`` may be read from any thread.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._reading: dict[IOStream, asyncio.TimerHandle] = {}  # insertion order: oldest first
        self._answering: set[IOStream] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock = threading.Lock()  # the counts, read by the metrics thread
        self._open = 0
        self.closed: Counter[str] = Counter()
        self._warned_at = -WARN_EVERY

    @property
    def open(self) -> int:
        with self._lock:
            return self._open

    def admit(self, stream: IOStream) -> bool:
        """Track ``stream`` under its deadline; False when it was closed instead."""
        if len(self._reading) + len(self._answering) >= self.limits.connections:
            if not self._reading:
                self._cut(stream, "refused")
                return False
            self._cut(next(iter(self._reading)), "evicted")
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.limits.request_seconds, self._cut, stream, "deadline")
        self._reading[stream] = timer
        self._changed()
        return True

    def answering(self, stream: IOStream) -> None:
        """The request is in: its deadline no longer applies."""
        timer = self._reading.pop(stream, None)
        if timer is not None:
            timer.cancel()
            self._answering.add(stream)

    def forget(self, stream: IOStream) -> None:
        timer = self._reading.pop(stream, None)
        if timer is not None:
            timer.cancel()
        self._answering.discard(stream)
        self._changed()

    async def drain(self) -> int:
        """Wait up to the drain bound for every connection to finish, then close the
        rest; the number closed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.limits.drain_seconds)
        left = [*self._reading, *self._answering]
        for stream in left:
            self._cut(stream, "drain")
        return len(left)

    def samples(self) -> list[Sample]:
        with self._lock:
            open_now, closed = self._open, dict(self.closed)
        gauge = Sample("callback_connections", "gauge", "Open callback connections.", open_now)
        help = "Callback connections the service closed, by reason."
        return [gauge, *counter_samples("callback_connections_cut_total", help, closed, "reason")]

    def cut_counts(self) -> dict[str, int]:
        with self._lock:
            return {f"cut_{reason}": count for reason, count in sorted(self.closed.items())}

    def _cut(self, stream: IOStream, reason: str) -> None:
        self.forget(stream)
        stream.close()
        with self._lock:
            self.closed[reason] += 1
        # one line a minute at most: a slowloris must not flood the log as well
        now = time.monotonic()
        if reason != "drain" and now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            extra = {"action": "callback_connections_cut", "open": self._open, **self.cut_counts()}
            log.warning("slow or surplus callback connections closed", extra=extra)

    def _changed(self) -> None:
        count = len(self._reading) + len(self._answering)
        with self._lock:
            self._open = count
        if count:
            self._idle.clear()
        else:
            self._idle.set()


class Workers(Executor):
    """At most ``size`` daemon threads, started as work arrives.

    Not a ThreadPoolExecutor: its threads are joined at interpreter exit, so one
    settle stuck on a row lock would hold the process past the drain bound. A thread
    abandoned at the drain dies with the process and Postgres rolls its transaction
    back; the job's deadline or lock expiry settles it.
    """

    def __init__(self, size: int, name: str = "callback-worker") -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("workers shut down")
            self._jobs.put((future, functools.partial(fn, *args, **kwargs)))
            self._grow()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        if wait:
            for thread in threads:
                thread.join()

    def _grow(self) -> None:
        if self._idle.acquire(blocking=False) or len(self._threads) >= self._size:
            return
        thread = threading.Thread(
            target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, call = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(call())
                except BaseException as exc:
                    future.set_exception(exc)
            self._idle.release()
