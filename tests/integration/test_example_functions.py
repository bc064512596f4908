"""The stand-in function server's own knobs that the chaos suite leans on."""

from __future__ import annotations

import threading
import time

import httpx

from lqjobs.ops.embedded import wait_until
from lqjobs.ops.example_functions import FunctionServer


def call(server: FunctionServer, job_id: int, payload: str) -> float:
    started = time.monotonic()
    reply = httpx.post(
        f"{server.url}/fn/slow", content=payload, headers={"x-job-id": str(job_id)}, timeout=10
    )
    assert reply.status_code == 200
    return time.monotonic() - started


def test_fast_calls_skip_the_sleep_and_a_running_call_is_in_progress() -> None:
    payload = '{"sleep": 0.6, "fast_calls": 1}'
    with FunctionServer() as server:
        assert call(server, 7, payload) < 0.5  # the first call of job 7 is fast
        assert server.calls_in_progress() == 0
        second = threading.Thread(target=call, args=(server, 7, payload))
        second.start()
        wait_until(lambda: server.calls_in_progress() == 1, 5, "the second call running")
        assert len(server.calls) == 1  # not recorded until it ends
        second.join(5)
        assert server.calls_in_progress() == 0 and len(server.calls) == 2
        durations = [c.ended - c.started for c in server.calls.all()]
        assert durations[0] < 0.5 <= durations[1]
