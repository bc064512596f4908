"""The in-process stack (tests/stack.py) leaves nothing open, even when the test using
it fails: a runner left unclosed keeps the worker's HTTP connections to the function
server, and the sockets warn when the collector frees them, during some later test
(the suite's warning filter makes that an error there)."""

from __future__ import annotations

import gc
import socket

import pytest

from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer
from tests.stack import add_jobs, make_settings, stack

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]


def open_sockets_to(port: int) -> int:
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, socket.socket) and o.fileno() != -1 and _peer_port(o) == port
    )


def _peer_port(sock: socket.socket) -> int | None:
    try:
        return int(sock.getpeername()[1])
    except OSError:
        return None


def test_a_test_failing_inside_the_stack_leaves_no_socket_open(db_url: str, redis_url: str) -> None:
    with FunctionServer() as functions:
        settings = make_settings(
            db_url, redis_url, executor="knative", knative_ingress_url=functions.url
        )
        add_jobs(db_url, "slow", 4, {"sleep": 2.0})
        with pytest.raises(RuntimeError, match="the test failed"), stack(settings, concurrency=4):
            wait_until(lambda: functions.calls_in_progress() == 4, 20, "every call running")
            raise RuntimeError("the test failed")  # while the calls still run
        assert functions.calls_in_progress() == 0, "the stack waited for its calls"
        assert open_sockets_to(functions.port) == 0
