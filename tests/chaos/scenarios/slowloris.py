"""R19: a slowloris on the callback port while asynchronous jobs settle through it
(docs/design.md, S8)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

from tests.chaos.cluster import Cluster, Component, Run
from tests.chaos.oracle import wait_quiescent
from tests.chaos.scenarios.callbacks import ASYNC
from tests.chaos.scenarios.common import Scale, finish, sabotage
from tests.chaos.scoreboard import Bounds, Result, Row
from tests.slowloris import SlowClients, server_connections, thread_count

DEADLINE, CAP, DRAIN = 4.0, 64, 5.0
R19_LIMITS = {
    "LQJOBS_CALLBACK_REQUEST_TIMEOUT": f"{DEADLINE:g}",
    "LQJOBS_CALLBACK_MAX_CONNECTIONS": str(CAP),
    "LQJOBS_CALLBACK_DRAIN_TIMEOUT": f"{DRAIN:g}",
}
SLOW = 160  # slow connections kept open, 2.5 times the cap, each re-opened once cut
WORKERS = 32  # LQJOBS_DB_POOL_SIZE's default: the callback service's worker threads
SLACK = 2.0  # how late past a bound the service may act (2 cores, a busy run)


class Watch:
    """Samples the callback process's threads and server-side connections."""

    def __init__(self, component: Component, port: int) -> None:
        self.component, self.port = component, port
        self.threads = 0
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="r19-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            pid = self.component.proc.pid
            with contextlib.suppress(OSError):  # between two incarnations
                self.threads = max(self.threads, thread_count(pid))
                self.connections = max(self.connections, server_connections(self.port, pid))


def timed_stop(component: Component) -> tuple[int | None, float]:
    """SIGTERM without restart: the exit code and the seconds it took."""
    started = time.monotonic()
    code = component.stop(timeout=30)
    return code, time.monotonic() - started


def r19(cluster: Cluster, scale: Scale) -> Row:
    batch = scale.jobs(10, least=5)

    def once(protected: bool) -> Result:
        name = f"R19{'' if protected else '-negative'}"
        with cluster.run(name, settings=ASYNC | R19_LIMITS, least_privilege=protected) as run:
            callback = run.spawn("callback", **sabotage(protected, "no_callback_limits"))
            callback.wait_ready()
            idle = thread_count(callback.proc.pid)
            run.spawn("worker")
            run.spawn("bridge")
            return _attacked(run, callback, idle, batch)

    return Row(
        "R19",
        "S8 a slowloris on the callback port",
        once(True),
        Bounds(),
        once(False),
        "no request deadline or connection cap",
        ("check failed: slow connections cut", "check failed: connections under the cap"),
    )


def _attacked(run: Run, callback: Component, idle: int, batch: int) -> Result:
    """Two attacks while jobs keep coming: under the cap (the deadline must cut every
    slow connection), then 2.5 times over it (the cap must hold)."""
    watch = Watch(callback, run.callback_port)
    ids: list[int] = []
    under = _slow(run, CAP * 3 // 4)
    with under:
        # two rounds of deadline cuts; without a deadline, three deadlines' time
        cuts_twice = _cut_at_least(under, 2 * under.count, 3 * DEADLINE)
        _stream_jobs(run, ids, batch, cuts_twice)
        oldest = max(c.lifetime for c in under.snapshot())
    over = _slow(run, SLOW)
    with over:
        _stream_jobs(run, ids, batch, _cut_at_least(over, 2 * over.count, 2 * DEADLINE))
        wait_quiescent(run.db_url, ids, 60, stall=20)
        code, drained = timed_stop(callback)  # with the slow clients still connected
        opened = len(under.snapshot()) + len(over.snapshot())
    watch.stop()
    result = finish(run, ids, [], stall=15)
    result.faults = opened
    _judge(result, run, watch, idle, oldest, code, drained)
    return result


def _slow(run: Run, count: int) -> SlowClients:
    """Slow clients re-opened as they are cut; half of them reach a slow body."""
    return SlowClients(
        "127.0.0.1", run.callback_port, count, lifetime=120, reconnect=True, head_ticks=(None, 1)
    )


def _cut_at_least(clients: SlowClients, cuts: int, seconds: float) -> Callable[[], bool]:
    """True once the server cut ``cuts`` of the connections, or ``seconds`` passed."""
    until = time.monotonic() + seconds

    def done() -> bool:
        closed = sum(c.closed is not None for c in clients.snapshot())
        return closed >= cuts or time.monotonic() > until

    return done


def _stream_jobs(run: Run, ids: list[int], batch: int, done: Callable[[], bool]) -> None:
    """Asynchronous jobs a batch at a time, each once the one before settled, until
    ``done``; a batch that does not settle is left to the oracle."""
    while not done():
        added = run.add_jobs("asyncfn", [{"sleep": 0.2} for _ in range(batch)])
        ids += added
        if wait_quiescent(run.db_url, added, 30, stall=15) is None:
            return


def _judge(
    result: Result,
    run: Run,
    watch: Watch,
    idle: int,
    oldest: float,
    code: int | None,
    drained: float,
) -> None:
    settled = [c.callback_status == 200 for c in run.functions.calls.all()]
    result.preconditions["the slow clients filled the cap"] = watch.connections >= CAP
    result.checks["every job settled by its callback"] = bool(settled) and all(settled)
    result.checks[f"slow connections cut within {DEADLINE:g}+{SLACK:g} s"] = (
        oldest <= DEADLINE + SLACK
    )
    # +1: a connection being admitted while the one it evicts is being closed
    result.checks[f"connections under the cap ({CAP})"] = watch.connections <= CAP + 1
    result.checks["threads stay under idle + workers"] = watch.threads <= idle + WORKERS
    result.checks[f"SIGTERM drained within {DRAIN:g}+1+{SLACK:g} s, exit 0"] = (
        code == 0 and drained <= DRAIN + 1 + SLACK
    )
    result.notes = (
        f"slowest connection {oldest:.1f} s; at most {watch.connections} connections, "
        f"{watch.threads} threads (idle {idle}); SIGTERM {drained:.1f} s"
    )
