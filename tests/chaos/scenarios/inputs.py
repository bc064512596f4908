"""R12, R13: functions that hang or fail with every status, hostile payloads and
task names."""

from __future__ import annotations

import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lqjobs.db import RawJson
from tests.chaos.cluster import Cluster
from tests.chaos.scenarios.common import (
    Scale,
    finish,
    sabotage,
)
from tests.chaos.scoreboard import Bounds, Result, Row

# -- R12: hanging functions and the status-code matrix ----------------------------------

RETRYABLE = (408, 425, 429, 500, 502, 503, 504, 404, 302)
PERMANENT = (400, 401, 403, 405, 410, 413, 415, 422)


def r12(cluster: Cluster, scale: Scale) -> Row:
    per = scale.jobs(8, least=3)
    with cluster.run("R12") as run:
        healthy = run.add_jobs("noop", [{"i": i} for i in range(scale.jobs(300, least=60))])
        by_code = {
            code: run.add_jobs(
                "status",
                [{"redirect": "http://127.0.0.1:9/"} if code == 302 else {"status": code}] * per,
                max_attempts=3,
            )
            for code in RETRYABLE + PERMANENT
        }
        hangs = run.add_jobs("hang", [{"hang": True}] * per, max_attempts=2)
        run.spawn("worker")
        run.spawn("bridge")
        failing = [i for ids in by_code.values() for i in ids] + hangs
        ids = healthy + failing
        genuine = {i: 2 for i in failing}
        result = finish(run, ids, [], stall=25, expect_parked=failing, genuine_failures=genuine)
        calls = Counter(c.job_id for c in run.functions.calls.all())
        result.faults = len(failing)
        result.checks["retryable codes: called max_attempts (3) times"] = all(
            calls[i] == 3 for code in RETRYABLE for i in by_code[code]
        )
        result.checks["permanent codes: called once"] = all(
            calls[i] == 1 for code in PERMANENT for i in by_code[code]
        )
        errors = dict(
            run.sql(
                "SELECT id, coalesce(last_error, '') FROM app_jobs.jobs WHERE id = ANY(%s)", [hangs]
            )
        )
        result.checks["hangs fail with a timeout"] = all(
            errors.get(i, "").startswith("timeout") for i in hangs
        )
    return Row(
        "R12",
        f"F12/F13 hangs + {len(RETRYABLE) + len(PERMANENT)} status codes",
        result,
        Bounds(attempts_burned=None),
    )


# -- R13: bad payloads and hostile task names --------------------------------------------


def r13(cluster: Cluster, scale: Scale) -> Row:
    def once(protected: bool) -> Result:
        with (
            Canary("127.0.0.2") as canary,
            cluster.run(
                f"R13{'' if protected else '-negative'}",
                settings={"KNATIVE_SERVICE_URL": "svc.local"} if not protected else {},
                least_privilege=protected,
            ) as run,
        ):
            hostile_names = [
                "evil.com/x",
                "../admin",
                "a b",
                "UPPER",
                "x" * 126,
                f"127.0.0.2:{canary.port}/x?",
                f"127.0.0.2:{canary.port}#",
                f"user@127.0.0.2:{canary.port}",
                "169.254.169.254/latest/meta-data#",
            ]
            hostile = [run.add_jobs(name, [{}], max_attempts=2)[0] for name in hostile_names]
            oversized = run.add_jobs("noop", [{"pad": "x" * (2 * 1024 * 1024)}] * 3)
            odd = run.add_jobs("noop", [RawJson("[" * 3000 + "]" * 3000), {"nul": "\u0000"}])
            good = run.add_jobs("noop", [{"i": i} for i in range(40)]) if protected else []
            bridge = run.spawn("bridge")
            run.spawn("worker", **sabotage(protected, "task_name_in_url"))
            ids = hostile + oversized + odd + good
            result = finish(run, ids, [], stall=10, expect_parked=hostile + oversized)
            result.faults = len(hostile) + len(oversized) + len(odd)
            result.checks["the canary on 127.0.0.2 got no request"] = canary.hits == 0
            result.checks["the bridge never crashed"] = not bridge.unplanned_exits
            errors = dict(
                run.sql(
                    "SELECT id, coalesce(last_error, '') FROM app_jobs.jobs WHERE id = ANY(%s)",
                    [oversized],
                )
            )
            result.checks["oversized: failed by the bridge, never published"] = all(
                errors.get(i, "").startswith("payload too large") for i in oversized
            )
            return result

    return Row(
        "R13",
        "F14/F15 bad payloads + hostile task names",
        once(True),
        Bounds(attempts_burned=None),
        once(False),
        "task name in the URL",
        ("check failed: the canary",),
    )


class Canary:
    """An attacker's listener: counts every request, whatever its method or path."""

    def __init__(self, host: str) -> None:
        self.hits = 0
        canary = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one_request(self) -> None:
                self.raw_requestline = self.rfile.readline(65537)
                if self.raw_requestline:
                    canary.hits += 1
                    self.wfile.write(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                self.close_connection = True

        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> Canary:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
