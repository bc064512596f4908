"""kombu's Redis transport, with one reused client per channel.

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
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

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


class Transport(kombu_redis.Transport):
    Channel = Channel
