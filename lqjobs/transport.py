"""kombu's Redis transport, with one reused client per channel, and a broken
channel that closes once.

kombu 5.x builds a new ``redis.Redis`` object for every command it sends outside
the consumer's blocking read: each acknowledgement, each message it records as
unacknowledged, each task event, each publish. A ``redis.Redis`` object only
wraps the channel's connection pool (every command borrows a pooled connection,
so one object is safe to share between threads), yet building one costs about
90 microseconds of CPU. Per job that is five or six of them, on the worker's
event-loop thread, which a profile of a busy worker put at an eighth of its CPU.

This channel keeps one client per connection pool and hands it out instead;
everything else, wire traffic included, is kombu's. The app selects it with
``broker_transport`` for ``redis://`` and ``rediss://`` broker URLs only.

It also lets the worker ride out a broker restart (docs/design.md, F22). When the
connection breaks, kombu's ``close()`` stops at the pending BRPOP it cannot drain
and leaves the channel open; Celery closes the connection again after detaching
its transport, and the second ``close()`` dies of an ``AttributeError`` that kills
the worker. Here a broken channel closes the first time, and any channel whose
transport was detached fails with a connection error, which kombu and Celery
recover from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

TRANSPORT_PATH = "lqjobs.transport:Transport"


class Channel(kombu_redis.Channel):
    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool  # a fresh pool after a fork or a reconnect: a fresh client
        shared = self._shared_client
        if shared is None or shared.connection_pool is not pool:
            shared = self._shared_client = self._create_client()  # type: ignore[no-untyped-call]
        yield shared

    def close(self) -> None:
        if self._in_poll:  # kombu's own drain lets a lost connection abort the close
            with contextlib.suppress(Empty, *self.connection_errors):
                self._brpop_read()  # type: ignore[no-untyped-call]
        super().close()  # type: ignore[no-untyped-call]

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple)  # type: ignore[no-untyped-call]
        self._after_late_settle()

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]
        self._after_late_settle()

    def _after_late_settle(self) -> None:
        # A call that outlived its connection settled through this closed channel: its
        # socket would stay open until the collector frees the channel. The pool stays,
        # for the next such call.
        if self.closed and self._pool is not None:
            self._pool.disconnect()

    def _get_pool(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is None:
            # kombu would read the broker's address from the detached None
            raise RedisConnectionError("the channel's broker connection is closed")
        return super()._get_pool(asynchronous)  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    Channel = Channel
