"""What every scenario uses: its size, switching protections off, waiting for
quiescence and judging the run."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lqjobs.ops.embedded import wait_until
from tests.chaos.cluster import Component, Run
from tests.chaos.oracle import judge, wait_quiescent
from tests.chaos.scoreboard import Result


@dataclass(frozen=True)
class Scale:
    """1.0: the full run; the quick subset inside pytest uses less."""

    factor: float = 1.0

    def jobs(self, full: int, least: int = 20) -> int:
        return max(least, int(full * self.factor))


def sabotage(protected: bool, *protections: str) -> dict[str, str]:
    return {} if protected else {"CHAOS_SABOTAGE": ",".join(protections)}


def killed(*components: Component) -> list[float]:
    """Times of the SIGKILLs the components suffered (self-inflicted faults)."""
    return [at for c in components for at, code in c.unplanned_exits if code == -9]


def own_exits(run: Run) -> dict[str, int]:
    """How often each component exited on its own (its supervisor restarted it)."""
    return {name: len(c.own_exits) for name, c in run.components.items() if c.own_exits}


def finish(
    run: Run,
    ids: list[int],
    fault_times: list[float] | Callable[[], list[float]],
    *,
    timeout: float = 120,
    stall: float = 15,
    genuine_failures: Mapping[int, int] | None = None,
    expect_parked: tuple[int, ...] | list[int] = (),
    checks: dict[str, bool] | None = None,
    faults: int | None = None,
) -> Result:
    """Wait for quiescence, stop every component, and judge the run."""
    quiet_at = wait_quiescent(run.db_url, ids, timeout, stall)
    run.stop_components()
    if callable(fault_times):
        fault_times = fault_times()
    # a call still running (its caller killed or gone) is judged once it has ended
    until = time.monotonic() + 30
    while run.functions.calls_in_progress() > 0 and time.monotonic() < until:
        time.sleep(0.1)
    tally = judge(
        run.db_url,
        ids,
        run.functions.calls.all(),
        genuine_failures=genuine_failures,
        expect_parked=expect_parked,
    )
    last_fault = max(fault_times, default=run.started)  # continuous faults: from the start
    recovery = None
    if quiet_at is not None:
        recovery = max(0.0, quiet_at - last_fault)
    return Result(
        tally,
        len(fault_times) if faults is None else faults,
        recovery,
        checks or {},
        exits=own_exits(run),
    )


def wait_for_calls(run: Run, calls: int) -> None:
    wait_until(lambda: len(run.functions.calls) >= calls, 120, f"{calls} calls")


def locked_count(run: Run) -> int:
    row = run.sql("SELECT count(*) FROM app_jobs.jobs WHERE locked_by IS NOT NULL")
    return int(row[0][0])


def count_left(run: Run, ids: list[int]) -> int:
    row = run.sql("SELECT count(*) FROM app_jobs.jobs WHERE id = ANY(%s)", [ids])
    return int(row[0][0])
