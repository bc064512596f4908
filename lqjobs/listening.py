"""The LISTEN / wait / reconnect / back-off loop the bridge and the scheduler share.

:class:`Listener` owns a component's dedicated LISTEN connection: it (re)opens it
on the component's channels and sleeps on it until a notification, a timeout or
stop, in slices short enough that ``stop()`` is honoured quickly.
:class:`Poller` takes its place where notifications cannot arrive (a transaction
pooler and no direct listen URL): the owner's poll, made short, is all there is.
:class:`ServiceLoop` owns the stop event and the count of consecutive failures,
and runs the component's cycle until stopped, backing off (jittered) after a
failed one. Each component keeps its own pass, logger, messages and ``action``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from lqjobs import db
from lqjobs.backoff import pause_after_failure
from lqjobs.db import Connection
from lqjobs.errors import DatabaseError

WAIT_SLICE = 0.25  # longest uninterrupted wait, so stop() is honoured quickly
Errors = type[Exception] | tuple[type[Exception], ...]


class Listener:
    """One dedicated LISTEN connection. A new one is listening before ``on_listen``
    runs and before the poll its owner makes after it, so no insert falls between
    the two."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        channels: Sequence[str],
        stopping: threading.Event,
        *,
        on_listen: Callable[[], None] | None = None,
    ) -> None:
        self._connect = connect
        self.channels = tuple(channels)
        self._stopping = stopping
        self._on_listen = on_listen
        self._conn: Connection | None = None

    def open(self) -> Connection:
        """The listening connection, (re)opened when there is none; a connection whose
        LISTEN fails is closed again."""
        if self._conn is None or self._conn.closed:
            conn = self._connect()
            try:
                db.listen(conn, *self.channels)
            except DatabaseError:
                conn.close()
                raise
            self._conn = conn
            if self._on_listen is not None:
                self._on_listen()
        return self._conn

    def ping(self) -> None:
        db.ping(self.open())  # a silently dead listener shows up here

    def wait(self, timeout: float, *, ping_on_timeout: bool = False) -> bool:
        """Sleep until a notification (True), the timeout or stop() (False); with
        ``ping_on_timeout``, a timeout without a notification pings the listener."""
        listener = self.open()
        deadline = time.monotonic() + timeout
        while not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if ping_on_timeout:
                    db.ping(listener)  # a silently dead listener shows up here
                return False
            with db.translated_errors():
                if list(listener.notifies(timeout=min(remaining, WAIT_SLICE), stop_after=1)):
                    for _ in listener.notifies(timeout=0):  # drain: one pass serves them all
                        pass
                    return True
        return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None


class Poller:
    """Stands in for a :class:`Listener` where no notification can arrive: LISTEN
    through a transaction pooler is accepted on whichever server session runs it
    and never delivered to this client. It opens no connection; ``wait`` sleeps
    out its timeout (the owner's poll) unless stopped."""

    def __init__(
        self, stopping: threading.Event, *, on_listen: Callable[[], None] | None = None
    ) -> None:
        self._stopping = stopping
        self._on_listen = on_listen
        self._open = False

    def open(self) -> None:
        if not self._open:  # as a new listener: its owner polls at once
            self._open = True
            if self._on_listen is not None:
                self._on_listen()

    def ping(self) -> None:
        """Nothing to ping: the owner's next statement finds a dead database."""

    def wait(self, timeout: float, *, ping_on_timeout: bool = False) -> bool:
        self._stopping.wait(max(timeout, 0.0))
        return False

    def close(self) -> None:
        self._open = False


def wake_source(
    connect: Callable[[], Connection] | None,
    channels: Sequence[str],
    stopping: threading.Event,
    *,
    on_listen: Callable[[], None] | None = None,
) -> Listener | Poller:
    """A :class:`Listener` on ``connect``'s connections; a :class:`Poller` when there
    is nowhere to LISTEN (``connect`` None)."""
    if connect is None:
        return Poller(stopping, on_listen=on_listen)
    return Listener(connect, channels, stopping, on_listen=on_listen)


class ServiceLoop:
    """Runs a cycle until ``stop()``. ``outages`` pairs the errors a cycle may fail
    with (tried in order) with the warning logged for each; a failed cycle is
    counted, handed to ``on_failure`` (close the connections) and backed off.
    Any other error is a bug and propagates."""

    def __init__(
        self, log: logging.Logger, outages: Sequence[tuple[Errors, str]], **fields: Any
    ) -> None:
        self.log = log
        self.outages = tuple(outages)
        self.fields = fields  # of the back-off warning: action, worker_id
        self.stopping = threading.Event()
        self.failures = 0  # consecutive failed cycles; 0 when healthy

    def stop(self) -> None:
        """Safe from any thread or a signal handler, any number of times."""
        self.stopping.set()

    def run(
        self,
        cycle: Callable[[], object],
        *,
        on_failure: Callable[[Exception], object],
        idle: Callable[[], object] | None = None,
    ) -> None:
        """``cycle()``, then (a good cycle: ``failures`` back to 0) ``idle()``, until
        stopped."""
        errors = tuple(
            error
            for caught, _ in self.outages
            for error in (caught if isinstance(caught, tuple) else (caught,))
        )
        while not self.stopping.is_set():
            try:
                cycle()
                self.failures = 0
                if idle is not None:
                    idle()
            except errors as exc:
                self._failed(exc, on_failure)

    def _failed(self, exc: Exception, on_failure: Callable[[Exception], object]) -> None:
        message = next(text for caught, text in self.outages if isinstance(exc, caught))
        self.failures += 1
        on_failure(exc)
        pause_after_failure(
            self.stopping,
            self.failures,
            self.log,
            message,
            **self.fields,
            error=type(exc).__name__,
        )
