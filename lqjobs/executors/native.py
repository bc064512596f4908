"""Python handlers that run jobs in the Celery worker itself, with no function platform.

``@job_handler("send-email")`` registers ``fn(payload, job)`` in the default registry;
:class:`NativeExecutor` runs it with the payload parsed from JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

from lqjobs.errors import ConfigurationError
from lqjobs.executors.base import (
    EXCERPT_CHARS,
    Done,
    Failed,
    Invocation,
    Outcome,
    PermanentJobError,
    _label,
    log_outcome,
)
from lqjobs.logs import one_line

Handler: TypeAlias = Callable[[Any, Invocation], None]
_H = TypeVar("_H", bound=Handler)


class HandlerRegistry:
    """Python functions that run jobs in the Celery worker itself."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def handler(self, task: str) -> Callable[[_H], _H]:
        """Decorator: ``@registry.handler("send-email")`` on ``fn(payload, job)``."""

        def register(fn: _H) -> _H:
            self.register(task, fn)
            return fn

        return register

    def register(self, task: str, fn: Handler) -> None:
        known = self._handlers.get(task)
        if known is not None and _qualified_name(known) != _qualified_name(fn):
            raise ConfigurationError(f"task {_label(task)} already has a handler")
        self._handlers[task] = fn

    def unregister(self, task: str) -> None:
        self._handlers.pop(task, None)

    def get(self, task: str) -> Handler | None:
        return self._handlers.get(task)

    def tasks(self) -> frozenset[str]:
        return frozenset(self._handlers)


def _qualified_name(fn: Handler) -> str:
    # A module reload registers a new function object under the same name.
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"


handlers = HandlerRegistry()
job_handler = handlers.handler


class NativeExecutor:
    """Runs the handler registered for the task, with the payload parsed from JSON.

    Celery's ``SoftTimeLimitExceeded`` is re-raised for the task to record as a
    timeout; every other exception from a handler becomes :class:`Failed`.
    """

    name = "native"

    def __init__(self, registry: HandlerRegistry) -> None:
        self._registry = registry

    def invoke(self, invocation: Invocation) -> Outcome:
        started = time.monotonic()
        outcome = self._run(invocation)
        log_outcome(self.name, invocation, outcome, None, time.monotonic() - started)
        return outcome

    def _run(self, invocation: Invocation) -> Outcome:
        fn = self._registry.get(invocation.task_identifier)
        if fn is None:
            message = f"no handler registered for task {_label(invocation.task_identifier)}"
            return Failed(message, permanent=True)
        try:
            payload = json.loads(invocation.payload)
        except (ValueError, TypeError, RecursionError):
            return Failed("payload is not valid JSON", permanent=True)
        try:
            fn(payload, invocation)
        except PermanentJobError as exc:
            return Failed(one_line(str(exc), EXCERPT_CHARS) or "permanent failure", permanent=True)
        except Exception as exc:
            if type(exc).__name__ == "SoftTimeLimitExceeded":
                raise  # Celery's soft time limit is the task's to handle (without importing it)
            detail = one_line(str(exc), EXCERPT_CHARS)
            return Failed(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)
        return Done()
