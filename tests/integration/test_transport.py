"""tasks/transport.py: kombu's Redis transport with one reused client per channel.
Same wire behaviour (messages published, held as unacknowledged, acknowledged),
without a ``redis.Redis`` object built per command."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue
from kombu.transport import redis as kombu_redis

from lqjobs.celery import create_app, redis_transport
from lqjobs.transport import Channel, Transport
from tests.stack import flush_broker, make_settings

pytestmark = pytest.mark.integration
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
