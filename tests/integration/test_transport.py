"""lqjobs/transport.py: kombu's Redis transport with one reused client per channel.
Same wire behaviour (messages published, held as unacknowledged, acknowledged),
without a ``redis.Redis`` object built per command; and a channel broken by a Redis
restart closes once, where kombu's dies of its detached transport (F22)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue
from kombu.message import Message
from kombu.transport import redis as kombu_redis

from lqjobs.celery import create_app, redis_transport
from lqjobs.ops.embedded import EmbeddedRedis
from lqjobs.transport import Channel, Transport
from tests.stack import flush_broker, make_settings

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]
MESSAGES = 40


def count_clients(monkeypatch: pytest.MonkeyPatch, channel_class: type[Any]) -> list[int]:
    built = [0]
    create = channel_class._create_client

    def counting(self: Any, asynchronous: bool = False) -> Any:
        built[0] += 1
        return create(self, asynchronous)

    monkeypatch.setattr(channel_class, "_create_client", counting)
    return built


def round_trip(redis_url: str, transport: type[Any]) -> None:
    """Publish MESSAGES messages, take each one unacknowledged, then acknowledge it."""
    queue = Queue("transport-test", Exchange("transport-test"), "transport-test")
    with Connection(redis_url, transport=transport) as conn:
        channel = conn.channel()
        producer = Producer(channel)
        for i in range(MESSAGES):
            producer.publish(
                {"i": i},
                exchange=queue.exchange,
                routing_key="transport-test",
                declare=[queue],
                serializer="json",
            )
        bound = queue(channel)
        received = []
        for _ in range(MESSAGES):
            message = bound.get(no_ack=False)
            assert message is not None
            received.append(message.payload["i"])
            message.ack()
        assert received == list(range(MESSAGES))
        channel.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    flush_broker(redis_url)
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def test_redis_broker_urls_select_the_transport(redis_url: str) -> None:
    app = create_app(make_settings("postgresql://nobody@127.0.0.1/none", redis_url))
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)
    assert redis_transport("rediss://broker:6380/0") == {
        "broker_transport": "lqjobs.transport:Transport"
    }
    assert redis_transport("amqp://guest@broker//") == {}  # other brokers are left alone
    assert redis_transport("sentinel://broker:26379") == {}


def test_one_client_serves_every_command(
    redis_url: str, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = count_clients(monkeypatch, Channel)
    round_trip(redis_url, Transport)
    assert built[0] <= 2, built  # the shared client, and the consumer's own
    assert client.hlen("unacked") == 0  # every acknowledgement landed
    assert client.llen("transport-test") == 0


def test_negative_control_stock_kombu_builds_a_client_per_command(
    redis_url: str, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = count_clients(monkeypatch, kombu_redis.Channel)
    round_trip(redis_url, kombu_redis.Transport)
    assert built[0] >= 3 * MESSAGES, built  # publish, hold, acknowledge: one each


def test_a_new_pool_gets_a_new_client(redis_url: str, client: redis.Redis) -> None:
    with Connection(redis_url, transport=Transport) as conn:
        channel = conn.channel()
        with channel.conn_or_acquire() as first:
            assert first.ping()
        channel._disconnect_pools()  # what kombu does after a fork
        with channel.conn_or_acquire() as second:
            assert second.ping()
        assert second is not first
        assert second.connection_pool is channel.pool
        with channel.conn_or_acquire() as third:
            assert third is second
        channel.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def restart_under_a_consumer(
    server: EmbeddedRedis, transport: type[Any], opened: list[Any] | None = None
) -> Message:
    """The worker's layout: tasks consumed on the default channel, remote control on a
    fanout queue of a second channel. A message is held unacknowledged, with the next
    BRPOP in flight (the event loop always has one), when Redis goes down; the
    connection is torn down as Celery's consumer does (``collect``, then ``close``),
    Redis comes back with its data, and the call that ran meanwhile acknowledges."""
    queue = Queue("transport-test", Exchange("transport-test"), "transport-test")
    control = Queue(
        "transport-test.control", Exchange("transport-test.control", "fanout"), auto_delete=True
    )
    conn = Connection(server.url, transport=transport)
    channel, control_channel = conn.default_channel, conn.channel()
    if opened is not None:
        opened += [channel, control_channel]
    Producer(channel).publish(
        {"i": 0}, exchange=queue.exchange, routing_key="transport-test", declare=[queue]
    )
    held: list[Message] = []
    conn.Consumer([queue], callbacks=[lambda _, message: held.append(message)]).consume()
    conn.Consumer([control], channel=control_channel).consume()
    for _ in range(10):  # the control channel's subscription may come first
        if not held:
            conn.drain_events(timeout=5)
    channel._brpop_start()  # the BRPOP the event loop issues next
    server.shutdown(save=True)
    conn.collect(socket_timeout=5)
    conn.close()
    server.start()
    held[0].ack()
    return held[0]


def test_a_broken_channel_closes_once_and_its_late_ack_lands(own_redis: EmbeddedRedis) -> None:
    message = restart_under_a_consumer(own_redis, Transport)
    assert message.acknowledged
    client = redis.Redis.from_url(own_redis.url)
    assert client.hlen("unacked") == 0  # acknowledged on the restarted Redis
    assert client.llen("transport-test") == 0
    client.close()


def test_negative_control_stock_kombu_dies_of_the_detached_transport(
    own_redis: EmbeddedRedis,
) -> None:
    opened: list[Any] = []
    try:
        with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'hostname'"):
            restart_under_a_consumer(own_redis, kombu_redis.Transport, opened)
    finally:
        for channel in opened:  # what kombu's teardown left open when it died
            channel._disconnect_pools()
            channel._close_clients()


def test_a_channel_whose_transport_is_gone_raises_a_connection_error(redis_url: str) -> None:
    conn = Connection(redis_url, transport=Transport)
    channel = conn.channel()
    conn.collect()  # detaches the transport; the channel's pool went with it
    channel._pool = None
    with pytest.raises(redis.ConnectionError, match="broker connection is closed"):
        channel.qos.ack("a-delivery-tag")
