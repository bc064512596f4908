"""R09-R11, R17: asynchronous callbacks that repeat, come late, are forged or never
come."""

from __future__ import annotations

import base64
import random
import socket
from collections import Counter
from datetime import timedelta
from typing import Any

import httpx
import psycopg

from lqjobs.callback import tokens
from lqjobs.lease import Lease
from lqjobs.ops.embedded import wait_until
from tests.chaos.cluster import CALLBACK_KEYS, Cluster, Run
from tests.chaos.scenarios.common import (
    Scale,
    finish,
    sabotage,
)
from tests.chaos.scoreboard import Bounds, Result, Row

# -- R09-R11, R17: asynchronous callbacks ------------------------------------------------

ASYNC = {"LQJOBS_EXECUTOR": "openfaas-async"}


def r09(cluster: Cluster, scale: Scale) -> Row:
    n = scale.jobs(300, least=60)
    payloads = [{"callback_copies": 5 if i % 10 == 0 else 2} for i in range(n)]
    with cluster.run("R09", settings=ASYNC) as run:
        ids = run.add_jobs("asyncfn", payloads)
        run.spawn("callback")
        run.spawn("worker")
        run.spawn("bridge")
        result = finish(run, ids, [], stall=15)
        result.faults = sum(p["callback_copies"] - 1 for p in payloads)
        calls = run.functions.calls.all()
        result.checks["first callback accepted"] = all(c.callback_status == 200 for c in calls)
    return Row("R09", "F9 every callback x2 (x5 for 10 %)", result, Bounds())


# A late job's first call fails at once, but its callback is held back 33 s. The callback
# deadline (25 s) fails that attempt first; the retry is locked about 3 s later and runs
# for 22 s, so the stale error callback lands 5 s into the retry, well inside its token's
# expiry (E = 60 s here). Fenced, it is refused (409). Upstream's server runs fail_job
# by job id and worker id, which unlocks the running retry: a third call starts (7.4 s
# of back-off later) while the second still runs.
R10_SETTINGS = {"LQJOBS_CALLBACK_DEADLINE": "25", "LQJOBS_JOB_EXPIRY": "60"}
R10_LATE = {"fail_times": 1, "callback_delay": 33, "late_calls": 1, "sleep": 22, "fast_calls": 1}


def r10(cluster: Cluster, scale: Scale) -> Row:
    n = scale.jobs(200, least=40)
    late = set(range(0, n, 10))

    def once(protected: bool) -> Result:
        payloads = [R10_LATE if i in late else {} for i in range(n)]
        with cluster.run(
            f"R10{'' if protected else '-negative'}",
            settings=ASYNC | R10_SETTINGS,
            least_privilege=protected,
        ) as run:
            ids = run.add_jobs("asyncfn", payloads)
            late_ids = {ids[i] for i in late}
            run.spawn("callback", **sabotage(protected, "unauthenticated_callbacks"))
            run.spawn("worker")
            run.spawn("bridge")

            def stale_statuses() -> list[int | None]:
                return [
                    c.callback_status
                    for c in run.functions.calls.all()
                    if c.job_id in late_ids and c.attempt == 1
                ]

            wait_until(lambda: len(stale_statuses()) >= len(late_ids), 120, "the late callbacks")
            result = finish(run, ids, [], stall=30, genuine_failures=dict.fromkeys(late_ids, 1))
            result.faults = len(late_ids)
            result.checks["late callbacks refused (409) while the retry ran"] = all(
                status == 409 for status in stale_statuses()
            )
            return result

    return Row(
        "R10",
        "F10 late callback while the job is re-run",
        once(True),
        Bounds(),
        once(False),
        "upstream callback server",
        ("overlapping",),
    )


def r11(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        n = scale.jobs(100, least=30)
        forged = scale.jobs(2000, least=300)
        settings = ASYNC | {"JOBS_SUPPORT_ANY": "false", "JOBS_SUPPORTED": "asyncfn"}
        with cluster.run(
            f"R11{'' if protected else '-negative'}", settings=settings, least_privilege=protected
        ) as run:
            ids = run.add_jobs("asyncfn", [{"sleep": 0.5} for _ in range(n)])
            bait = run.add_jobs("bait", [{"bait": i} for i in range(20)])
            victim = lock_bait(run, bait[:10])
            run.spawn("callback", **sabotage(protected, "unauthenticated_callbacks"))
            run.spawn("worker")
            run.spawn("bridge")
            before = bait_rows(run, bait)
            statuses = forge_callbacks(run, bait, victim, forged, cluster.seed)
            result = finish(run, ids, [], stall=15)
            result.faults = forged
            result.checks["forged callbacks change no row"] = bait_rows(run, bait) == before
            result.checks["every forged callback answered 4xx"] = all(
                400 <= s < 500 for s in statuses
            )
            result.notes = f"forged callbacks answered {dict(Counter(statuses))}"
            return result

    return Row(
        "R11",
        "F11 forged and replayed callbacks",
        once(True),
        Bounds(),
        once(False),
        "no callback authentication",
        ("check failed: forged callbacks change no row",),
    )


def lock_bait(run: Run, bait: list[int]) -> list[Lease]:
    """Lock bait jobs under a lease nobody runs (as if a bridge held them)."""
    leases = []
    with psycopg.connect(run.db_url, autocommit=True) as conn:
        for _ in bait:
            job = run.jobs_db.queue.get_job(conn, "bridge-victim-1", ["bait"], timedelta(hours=1))
            if job is not None:
                leases.append(Lease.of(job))
    return leases


def bait_rows(run: Run, bait: list[int]) -> list[tuple[Any, ...]]:
    return run.sql(
        "SELECT id, attempts, locked_by, locked_at, run_at, last_error FROM app_jobs.jobs "
        "WHERE id = ANY(%s) ORDER BY id",
        [bait],
    )


def forge_callbacks(
    run: Run, bait: list[int], victims: list[Lease], count: int, seed: int
) -> list[int]:
    """POST ``count`` forged callbacks; returns their status codes."""
    rng = random.Random(f"{seed}:R11")
    keys = tokens.CallbackKeys.parse(CALLBACK_KEYS)
    wrong_keys = tokens.CallbackKeys.parse("c1:" + "not-the-callback-signing-key-98765")
    base = f"http://127.0.0.1:{run.callback_port}/callback"
    expired = [
        tokens.sign(
            keys,
            Lease(v.job_id, v.worker_id, v.attempts, v.locked_at - timedelta(hours=2)),
            timedelta(seconds=30),
        )
        for v in victims
    ]
    leaked = [tokens.sign(keys, v, timedelta(hours=1)) for v in victims]
    statuses = []
    wait_until(lambda: _listening(run.callback_port), 30, "the callback service")
    with httpx.Client(timeout=10) as client:
        for i in range(count):
            victim = rng.choice(victims)
            other = rng.choice([b for b in bait if b != victim.job_id])
            headers = {"X-Job-Id": str(victim.job_id), "X-Worker-Id": victim.worker_id}
            body = b'{"status": "success"}'
            kind = i % 7
            url = base
            if kind == 0:  # a job id and no token at all
                headers["X-Job-Id"] = str(rng.choice([*bait, rng.randrange(10**6)]))
            elif kind == 1:  # a leaked token of job A, sent for job B
                url = tokens.callback_url(base, leaked[victims.index(victim)])
                headers["X-Job-Id"] = str(other)
            elif kind == 2:  # a token with one signature bit flipped
                token = leaked[victims.index(victim)]
                url = tokens.callback_url(base, flip_bit(token, rng))
            elif kind == 3:  # an expired token of the right lease
                url = tokens.callback_url(base, expired[victims.index(victim)])
            elif kind == 4:  # signed with the wrong key
                url = tokens.callback_url(base, tokens.sign(wrong_keys, victim, timedelta(hours=1)))
            elif kind == 5:  # an oversized body
                body = b'{"status": "success", "pad": "' + b"x" * (128 * 1024) + b'"}'
            else:  # not JSON, and a junk token
                body = b"\x00\xffnot json{"
                url = f"{base}?token=v1.c1.{rng.randbytes(12).hex()}.{rng.randbytes(8).hex()}"
            try:
                statuses.append(client.post(url, content=body, headers=headers).status_code)
            except httpx.HTTPError:
                statuses.append(599)
    return statuses


def flip_bit(token: str, rng: random.Random) -> str:
    """The token with one bit of its signature flipped (decoded, not in the base64
    text, whose last character carries padding bits a decoder ignores)."""
    head, mac = token.rsplit(".", 1)
    raw = bytearray(base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4)))
    bit = rng.randrange(len(raw) * 8)
    raw[bit // 8] ^= 1 << (bit % 8)
    return f"{head}.{base64.urlsafe_b64encode(bytes(raw)).decode().rstrip('=')}"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def r17(cluster: Cluster, scale: Scale) -> Row:
    n = scale.jobs(200, least=50)

    def once(protected: bool) -> Result:
        payloads = [
            {"drop_callback": True} if i % 10 == 0 else {"unreachable": True} if i % 10 == 1 else {}
            for i in range(n)
        ]
        with cluster.run(
            f"R17{'' if protected else '-negative'}", settings=ASYNC, least_privilege=protected
        ) as run:
            good = run.add_jobs("asyncfn", [p for p in payloads if not p])
            dropped = run.add_jobs(
                "asyncfn", [p for p in payloads if "drop_callback" in p], max_attempts=2
            )
            unreachable = run.add_jobs(
                "asyncfn", [p for p in payloads if "unreachable" in p], max_attempts=2
            )
            run.spawn("callback", **sabotage(protected, "unauthenticated_callbacks"))
            run.spawn("worker", **sabotage(protected, "no_callback_deadline"))
            run.spawn("bridge")
            ids = good + dropped + unreachable
            result = finish(
                run,
                ids,
                [],
                stall=25,  # a deadline, a back-off and a deadline pass without progress
                expect_parked=dropped + unreachable,
                genuine_failures=dict.fromkeys(dropped + unreachable, 1),
            )
            result.faults = len(dropped) + len(unreachable)
            errors = dict(
                run.sql(
                    "SELECT id, coalesce(last_error, '') FROM app_jobs.jobs WHERE id = ANY(%s)",
                    [dropped + unreachable],
                )
            )
            result.checks["unreachable: failed by the header-less 503 callback"] = all(
                "503" in errors.get(i, "") for i in unreachable
            )
            result.checks["dropped: failed by the callback deadline"] = all(
                "callback not received" in errors.get(i, "") for i in dropped
            )
            return result

    return Row(
        "R17",
        "F19 callbacks lost (10 %) or header-less 503 (10 %)",
        once(True),
        # a function whose callback was lost ran; at-least-once runs it again
        Bounds(duplicated=len(range(0, n, 10))),
        once(False),
        "upstream callback server, no deadline",
        ("check failed: unreachable", "check failed: dropped"),
    )
