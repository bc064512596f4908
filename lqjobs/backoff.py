"""The retry delay every long-running lqjobs loop uses after a failed pass."""

from __future__ import annotations

import logging
import random
import threading
from typing import Any


def jittered_backoff(failures: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Exponential in consecutive failures, capped, with jitter so that many
    processes that lost the same database do not come back in lockstep."""
    return min(cap, base * 2.0 ** min(failures, 6)) * random.uniform(0.5, 1.0)


def pause_after_failure(
    stopping: threading.Event, failures: int, log: logging.Logger, message: str, **extra: Any
) -> None:
    """Log the failure with the delay, then wait it out (or until ``stopping`` is set)."""
    delay = jittered_backoff(failures)
    log.warning(message, extra={**extra, "retry_in": round(delay, 2)})
    stopping.wait(delay)
