"""R18: functions that trickle their reply, a byte at a time (docs/design.md, F12)."""

from __future__ import annotations

from collections import Counter

from tests.chaos.cluster import LADDER, Cluster
from tests.chaos.scenarios.common import Scale, finish, sabotage
from tests.chaos.scoreboard import Bounds, Result, Row

T_HTTP = float(LADDER["LQJOBS_HTTP_CONNECT_TIMEOUT"]) + float(LADDER["LQJOBS_HTTP_TIMEOUT"])
PACE = 0.3  # a byte every 0.3 s: each read comes well within the 2 s read timeout
CUT_OFF = f"every trickling call ended within T_http ({T_HTTP:g} s) + 1 s"


def r18(cluster: Cluster, scale: Scale) -> Row:
    return Row(
        "R18",
        "F12 functions that trickle their body or headers",
        _once(cluster, scale, protected=True),
        Bounds(),
        _once(cluster, scale, protected=False),
        "no whole-exchange deadline",
        (f"check failed: {CUT_OFF}", "stranded"),
    )


def _once(cluster: Cluster, scale: Scale, protected: bool) -> Result:
    # four of each kind: their calls, which never end unprotected, leave worker slots free
    per = 4
    with cluster.run(f"R18{'' if protected else '-negative'}", least_privilege=protected) as run:
        healthy = run.add_jobs("noop", [{"i": i} for i in range(scale.jobs(200, least=40))])
        bodies = run.add_jobs("trickle", [{"trickle": PACE}] * per, max_attempts=2)
        heads = run.add_jobs(
            "trickle", [{"trickle": PACE, "trickle_headers": True}] * per, max_attempts=2
        )
        # the first call trickles, the second answers at once
        recovering = run.add_jobs(
            "trickle", [{"trickle": PACE, "trickle_calls": 1}] * per, max_attempts=3
        )
        run.spawn("worker", **sabotage(protected, "no_exchange_deadline"))
        run.spawn("bridge")
        parked = bodies + heads
        trickling = parked + recovering
        result = finish(
            run,
            healthy + trickling,
            [],
            stall=15,
            expect_parked=parked,
            genuine_failures={i: 2 for i in parked} | {i: 1 for i in recovering},
        )
        result.faults = len(trickling)
        calls = [c for c in run.functions.calls.all() if c.job_id in set(trickling)]
        result.preconditions["the trickling functions were called"] = {
            c.job_id for c in calls
        } == set(trickling)
        result.checks[CUT_OFF] = all(c.ended - c.started <= T_HTTP + 1 for c in calls)
        per_job = Counter(c.job_id for c in calls)
        errors = dict(
            run.sql(
                "SELECT id, coalesce(last_error, '') FROM app_jobs.jobs WHERE id = ANY(%s)",
                [parked],
            )
        )
        result.checks["parked after one call per attempt, as a whole-exchange timeout"] = all(
            per_job[i] == 2
            and errors.get(i, "").startswith(f"timeout after {T_HTTP:g}s (whole exchange)")
            for i in parked
        )
        return result
