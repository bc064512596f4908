"""The callback service's bounds without a server: who is evicted or refused at the
cap, the deadline and its disarming, the drain, and the worker threads' bound."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future

import pytest

from lqjobs.callback.connections import Connections, Limits, Workers


class Stream:
    """Stands in for an IOStream: Connections only ever closes one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def close(self) -> None:
        self.closed = True


def run(coroutine: object) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


async def until(check: Callable[[], bool], seconds: float) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_at_the_cap_the_oldest_reader_is_evicted_and_answers_are_kept() -> None:
    async def scenario() -> None:
        connections = Connections(Limits(connections=3))
        a, b, c, d, e = (Stream(n) for n in "abcde")
        for stream in (a, b, c):
            assert connections.admit(stream)  # type: ignore[arg-type]
        connections.answering(a)  # type: ignore[arg-type]
        assert connections.admit(d)  # type: ignore[arg-type]
        assert (a.closed, b.closed, c.closed) == (False, True, False)  # b: oldest reader
        connections.answering(c)  # type: ignore[arg-type]
        connections.answering(d)  # type: ignore[arg-type]
        assert not connections.admit(e)  # type: ignore[arg-type]
        assert e.closed and connections.open == 3  # every slot is being answered
        assert connections.cut_counts() == {"cut_evicted": 1, "cut_refused": 1}

    run(scenario())


def test_the_deadline_cuts_a_reader_but_not_a_request_being_answered() -> None:
    async def scenario() -> None:
        connections = Connections(Limits(request_seconds=0.05))
        answered, slow = Stream("answered"), Stream("slow")
        connections.admit(answered)  # type: ignore[arg-type]
        connections.admit(slow)  # type: ignore[arg-type]  # its deadline comes second
        connections.answering(answered)  # type: ignore[arg-type]
        await until(lambda: slow.closed, 5)
        assert not answered.closed
        assert connections.open == 1 and connections.cut_counts() == {"cut_deadline": 1}

    run(scenario())


def test_drain_waits_for_the_last_connection_or_closes_what_is_left() -> None:
    async def scenario() -> None:
        connections = Connections(Limits(drain_seconds=5))
        finishing = Stream("finishing")
        connections.admit(finishing)  # type: ignore[arg-type]
        asyncio.get_running_loop().call_later(0.05, connections.forget, finishing)
        assert await connections.drain() == 0 and not finishing.closed

        stuck = Connections(Limits(drain_seconds=0.05))
        held = Stream("held")
        stuck.admit(held)  # type: ignore[arg-type]
        assert await stuck.drain() == 1 and held.closed and stuck.open == 0

    run(scenario())


def test_workers_never_exceed_their_size_and_are_daemons() -> None:
    workers = Workers(2, name="test-worker")
    release = threading.Event()
    futures = [workers.submit(release.wait, 10) for _ in range(5)]
    names = [t for t in threading.enumerate() if t.name.startswith("test-worker")]
    assert len(names) == 2 and all(t.daemon for t in names)
    release.set()
    assert [f.result(10) for f in futures] == [True] * 5
    failed: Future[None] = workers.submit(_raise)
    with pytest.raises(ValueError, match="boom"):
        failed.result(10)
    workers.shutdown(wait=True)
    assert not any(t.is_alive() for t in names)
    with pytest.raises(RuntimeError):
        workers.submit(release.wait, 0)


def _raise() -> None:
    raise ValueError("boom")
