"""R14: the components' clocks hours away from the database's."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from tests.chaos.cluster import Cluster
from tests.chaos.oracle import Tally
from tests.chaos.scenarios.common import (
    Scale,
    finish,
)
from tests.chaos.scoreboard import Bounds, Result, Row

# -- R14: clock skew --------------------------------------------------------------------


def faketime(offset: str) -> dict[str, str]:
    import libfaketime

    library = Path(libfaketime.__file__).parent / "vendor/libfaketime/src/libfaketime.so.1"
    return {
        "LD_PRELOAD": str(library),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }


def r14(cluster: Cluster, scale: Scale) -> Row:
    results = []
    for offset in ("+2h", "-2h"):
        n = scale.jobs(300, least=60)
        with cluster.run(f"R14{offset}", settings=faketime(offset)) as run:
            ids = run.add_jobs("noop", [{"i": i} for i in range(n)])
            async_ids = run.add_jobs("asyncfn", [{"i": i} for i in range(n // 3)])
            run.spawn("callback")
            run.spawn("worker", LQJOBS_TASK_EXECUTORS='{"asyncfn": "openfaas-async"}')
            run.spawn("bridge")
            result = finish(run, ids + async_ids, [], stall=15)
            result.checks[f"{offset}: no callback token refused"] = all(
                c.callback_status == 200 for c in run.functions.calls.all() if c.route != "knative"
            )
            result.preconditions[f"{offset}: the processes' clock really was skewed"] = skewed(
                run.env("bridge"), offset
            )
            results.append(result)
    merged = merge(results)
    merged.faults = 2
    return Row("R14", "F16 bridge, worker, callback at +2 h and -2 h", merged, Bounds())


def skewed(env: dict[str, str], offset: str) -> bool:
    """Whether a process started with ``env`` sees its clock ``offset`` away."""
    seen = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return abs(float(seen.stdout) - time.time() - offset_seconds(offset)) < 5


def offset_seconds(offset: str) -> float:
    """libfaketime's relative offset (``+2h``, ``-30s``) in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return float(offset[:-1]) * units[offset[-1]]


def merge(results: list[Result]) -> Result:
    tally = Tally()
    for r in results:
        for name in (
            "jobs",
            "completed",
            "parked",
            "lost",
            "duplicated",
            "overlapping",
            "stranded",
            "attempts_burned",
        ):
            setattr(tally, name, getattr(tally, name) + getattr(r.tally, name))
        tally.lost_ids += r.tally.lost_ids
    recoveries = [r.recovery for r in results]
    exits: Counter[str] = Counter()
    for r in results:
        exits.update(r.exits or {})
    return Result(
        tally,
        sum(r.faults for r in results),
        None if None in recoveries else max(x for x in recoveries if x is not None),
        {k: v for r in results for k, v in r.checks.items()},
        {k: v for r in results for k, v in r.preconditions.items()},
        exits=dict(exits),
    )
