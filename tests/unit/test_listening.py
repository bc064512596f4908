"""The wake source a component gets: a LISTEN connection, or polling alone."""

from __future__ import annotations

import threading
import time

from lqjobs.listening import Listener, Poller, wake_source


def test_nowhere_to_listen_gives_a_poller_that_sleeps_out_its_timeout() -> None:
    stopping = threading.Event()
    opened: list[bool] = []
    source = wake_source(None, ("jobs:insert",), stopping, on_listen=lambda: opened.append(True))
    assert isinstance(source, Poller)
    source.open()
    source.open()
    assert opened == [True]  # like a new listener: its owner polls at once, once
    started = time.monotonic()
    assert source.wait(0.2) is False
    assert time.monotonic() - started >= 0.2
    source.close()
    source.open()
    assert opened == [True, True]  # reopened after a failure: poll at once again
    stopping.set()
    started = time.monotonic()
    assert source.wait(30) is False and time.monotonic() - started < 1  # stop is honoured


def test_a_connection_to_listen_on_gives_a_listener() -> None:
    def never() -> None:
        raise AssertionError("not connected until opened")

    source = wake_source(never, ("jobs:insert",), threading.Event())  # type: ignore[arg-type]
    assert isinstance(source, Listener)
