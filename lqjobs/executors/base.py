"""What crosses the executor boundary: an :class:`Invocation` in, an :data:`Outcome` out.

Also the errors a job can end with, the mapping of an HTTP status to an outcome
(shared with the callback, which classifies a relayed status the same way) and the
executors' two log lines.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from lqjobs.errors import ExecutorError
from lqjobs.logs import escaped, one_line

# One logger for the whole package, under the name it has always had.
logger = logging.getLogger("lqjobs.executors")

EXCERPT_CHARS = 200


# -- what an executor is given and returns --------------------------------------


@dataclass(frozen=True)
class Invocation:
    """One attempt of one job, as the Celery task hands it to an executor."""

    job_id: int
    task_identifier: str
    database_id: str
    worker_id: str
    attempt: int
    payload: str  # the job's JSON text, sent byte for byte, never re-encoded
    call_id: str  # the Celery task id
    callback_url: str | None = None
    current_user_id: str | None = None


@dataclass(frozen=True)
class Done:
    """The function finished successfully."""


@dataclass(frozen=True)
class Failed:
    """The function failed; ``permanent`` means retrying cannot help. ``never_ran``:
    the request never reached the function (refused, unresolvable, a gateway's or an
    activator's 502/503/504, a 429), so the attempt may be returned (docs/design.md,
    F25); ``retry_after``: seconds the platform asked to wait, when it said."""

    message: str
    permanent: bool = False
    never_ran: bool = False
    retry_after: float | None = None


@dataclass(frozen=True)
class Deferred:
    """The function was accepted and will report through the callback URL."""


Outcome: TypeAlias = Done | Failed | Deferred


class JobExecutor(Protocol):
    """Runs a job's function on one platform."""

    name: str

    def invoke(self, invocation: Invocation) -> Outcome:
        """Call the function once and report how it went.

        Never raises for a failure of the function, the network or the job's
        data: those become :class:`Failed` (``permanent=True`` when a retry
        cannot help). An asynchronous platform that accepted the job returns
        :class:`Deferred`.
        """
        ...


class InvalidInvocation(ExecutorError):
    """The job cannot be sent: a task name or header value failed validation."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, retryable=False)


class PermanentJobError(ExecutorError):
    """Raised by a native handler when retrying the job cannot help."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, retryable=False)


# -- status codes -----------------------------------------------------------------

_RETRYABLE_4XX = frozenset({408, 425, 429})
_PERMANENT_4XX = frozenset({400, 401, 403, 405, 410, 413, 415, 422})
# What a gateway, an activator or a rate limiter answers for a function it did not
# call: a Knative service scaling from zero, an OpenFaaS gateway with no replica.
NEVER_RAN_STATUSES = frozenset({429, 502, 503, 504})


def classify_status(
    status: int,
    *,
    retry_on_404: bool,
    task: str = "function",
    detail: str = "",
    retry_after: float | None = None,
) -> Outcome:
    """Map an HTTP status to an outcome (docs/design.md, F13 and F25).

    ``detail`` (usually the response body) is cut to a short, clean excerpt.
    """
    if 200 <= status < 300:
        return Done()
    message = f"HTTP {status} from {task}"
    if 300 <= status < 400:
        message += " (redirects are not followed)"
    excerpt = one_line(detail, EXCERPT_CHARS)
    if excerpt:
        message += f": {excerpt}"
    if status in NEVER_RAN_STATUSES:
        return Failed(message, never_ran=True, retry_after=retry_after)
    return Failed(message, permanent=is_permanent_status(status, retry_on_404))


def is_permanent_status(status: int, retry_on_404: bool) -> bool:
    """Whether a function's non-2xx status means retrying cannot help (docs/design.md, F13)."""
    if status == 404:
        return not retry_on_404
    if status in _PERMANENT_4XX:
        return True
    return 400 <= status < 500 and status not in _RETRYABLE_4XX


def _label(task: object) -> str:
    """A task name fit for a message or a log line, whatever it contains."""
    return one_line(repr(task), 80)


# -- logs (job id, task, status, duration; never payloads) -------------------------


def log_outcome(
    executor: str, invocation: Invocation, outcome: Outcome, status: int | None, seconds: float
) -> None:
    failed = isinstance(outcome, Failed)
    level = logging.WARNING if failed else logging.INFO
    if not logger.isEnabledFor(level):  # the fields cost more than the call to log
        return
    permanent = isinstance(outcome, Failed) and outcome.permanent
    logger.log(
        level,
        "function invoked",
        extra={
            "action": "function_failed" if failed else "function_invoked",
            "executor": executor,
            "job_id": invocation.job_id,
            "task": escaped(str(invocation.task_identifier)),
            "attempt": invocation.attempt,
            "outcome": type(outcome).__name__.lower(),
            "permanent": permanent,
            "status": status,
            "duration": round(seconds, 4),
        },
    )


def log_refused(executor: str, invocation: Invocation, reason: str) -> None:
    logger.warning(
        "invocation refused",
        extra={
            "action": "invocation_refused",
            "executor": executor,
            "job_id": invocation.job_id,
            "task": escaped(str(invocation.task_identifier)),
            "reason": reason,
        },
    )
