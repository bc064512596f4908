"""The callback service: asynchronous functions report their outcome here.

Routes (served by :mod:`lqjobs.callback.server`): ``POST /callback?token=...`` and
``GET /healthz`` (200 while the database answers); anything else is 404. The
token (:mod:`lqjobs.callback.tokens`) names the lease the callback speaks for, so
even a callback without any job header is attributed to the right attempt.

The three shapes a callback comes in, and which outcome it reports, are read by
:mod:`lqjobs.callback.parsing`.

Checks run in this order (docs/design.md, S1), and nothing reaches the database
before the third:

1. body at most 64 KiB (413 unread), a token in the query (401);
2. the token's HMAC, in constant time (401), and any ``x-job-id`` /
   ``x-worker-id`` header equal to the token's lease (401; 400 if unparsable);
   then the body's shape (400);
3. one transaction: the job row locked, the token's expiry compared with the
   database's ``now()``, and the fenced ``complete_job`` / ``fail_job``.

=====================================  ======  =========================
situation                              status  body ``result`` / ``error``
=====================================  ======  =========================
first valid callback: completed         200    ``completed``
first valid callback: failed (back-off) 200    ``failed``
job already settled (duplicate)         200    ``already_settled``
intermediate OpenFaaS retry             200    ``ignored_retry``
job re-leased or released since         409    ``stale_lease``
token expired (database clock)          401    ``token_expired``
no / bad token, foreign job headers     401    ``unauthorized``
malformed body or headers               400    ``bad_request``
body over 64 KiB                        413    ``too_large``
database unreachable                    503    ``unavailable``
=====================================  ======  =========================

Only the first two rows write; every other answer leaves the database as it was.
"Already settled" means the row is gone (completed) or unlocked at the token's own
attempt (its failure was recorded); "stale" means the row is locked under another
lease, or unlocked at another attempt (``release_jobs`` since). An expired token is
refused whatever the row's state: its lock may be re-taken at any moment.
Logs carry the job id, worker id, action and status; never the token, the query
string or a body. The stored ``last_error`` is cut to 4 KiB and stripped of
control characters.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from lqjobs import db
from lqjobs.broker_state import DeferredDeadlines
from lqjobs.callback import tokens
from lqjobs.callback.parsing import CallbackRequest, Rejected, Report, authenticate, parse_report
from lqjobs.db.fence import Fence, LeaseState
from lqjobs.errors import DatabaseError
from lqjobs.lease import Lease
from lqjobs.metrics import Sample, counter_samples

POOL_TIMEOUT = 5.0
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reply:
    status: int
    result: str

    def body(self) -> bytes:
        key = "result" if self.status < 300 else "error"
        return json.dumps({key: self.result}).encode()


# -- settling ---------------------------------------------------------------------------


class CallbackService:
    """Authenticates callbacks and settles their jobs; also fails overdue deferred jobs."""

    def __init__(
        self,
        keys: tokens.CallbackKeys,
        pool: ConnectionPool[db.Connection],
        fence: Fence,
        deadlines: DeferredDeadlines | None = None,
        deadline_seconds: float = 300.0,
        retry_on_404: bool = True,
    ) -> None:
        self.keys = keys
        self.pool = pool
        self.fence = fence
        self.deadlines = deadlines
        self.deadline_seconds = deadline_seconds
        self.retry_on_404 = retry_on_404
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle(self, request: CallbackRequest) -> Reply:
        try:
            claims = authenticate(self.keys, request)
            report = parse_report(request.headers, request.body, retry_on_404=self.retry_on_404)
        except Rejected as exc:
            return self.refused(Reply(exc.status, exc.result))
        if not report.final:
            return self._reply(claims.lease, Reply(200, "ignored_retry"))
        return self.settle(claims, report)

    def settle(self, claims: tokens.TokenClaims, report: Report) -> Reply:
        lease = claims.lease
        try:
            state, written = self._settle(claims, report)
        except DatabaseError:
            return self._reply(lease, Reply(503, "unavailable"))
        if state is LeaseState.EXPIRED:
            return self._reply(lease, Reply(401, "token_expired"))
        if state is LeaseState.SETTLED:
            reply = Reply(200, "already_settled")
        elif written:
            reply = Reply(200, "completed" if report.success else "failed")
        else:
            reply = Reply(409, "stale_lease")
        if reply.status == 200 and self.deadlines is not None:
            self.deadlines.forget(lease)
        return self._reply(lease, reply)

    def _settle(self, claims: tokens.TokenClaims, report: Report) -> tuple[LeaseState, bool]:
        lease = claims.lease
        with (
            db.translated_errors(),
            self.pool.connection(timeout=POOL_TIMEOUT) as conn,
            conn.transaction(),
        ):
            state = self.fence.lock_lease_state(conn, lease, claims.expires_at)
            if state is not LeaseState.HELD:
                return state, False
            if report.success:
                return state, self.fence.fenced_complete(conn, lease)
            if report.permanent:
                return state, self.fence.fenced_fail_permanently(conn, lease, report.message)
            return state, self.fence.fenced_fail(conn, lease, report.message)

    def refused(self, reply: Reply) -> Reply:
        """Count and log a callback refused before its job was known."""
        self._count(reply.result)
        extra = {"action": f"callback_{reply.result}", "status": reply.status}
        log.warning("callback refused", extra=extra)
        return reply

    def fail_overdue(self, lease: Lease) -> None:
        """The deadline reaper's action: fenced fail_job (a no-op once settled)."""
        message = f"callback not received within {self.deadline_seconds:g}s"
        with db.translated_errors(), self.pool.connection(timeout=POOL_TIMEOUT) as conn:
            failed = self.fence.fenced_fail(conn, lease, message)
        self._reply(lease, Reply(200, "deadline_failed" if failed else "deadline_moot"))

    def healthy(self) -> bool:
        try:
            with db.translated_errors(), self.pool.connection(timeout=2.0) as conn:
                db.ping(conn)
        except DatabaseError:
            return False
        return True

    def close(self) -> None:
        self.pool.close()
        if self.deadlines is not None:
            self.deadlines.client.close()

    def metrics(self) -> list[Sample]:
        with self._lock:
            counts = dict(self.counters)
        return counter_samples("callbacks_total", "Callbacks by outcome.", counts)

    def _count(self, result: str) -> None:
        with self._lock:
            self.counters[result] += 1

    def _reply(self, lease: Lease, reply: Reply) -> Reply:
        self._count(reply.result)
        log.log(
            logging.INFO if reply.status < 500 else logging.WARNING,
            "callback handled",
            extra={
                "action": f"callback_{reply.result}",
                "job_id": lease.job_id,
                "worker_id": lease.worker_id,
                "attempt": lease.attempts,
                "status": reply.status,
            },
        )
        return reply
