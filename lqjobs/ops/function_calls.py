"""What a stand-in function does for one call (:class:`Behaviour`, read from the job
payload) and what the stand-in platform records of each call (:class:`CallLog`);
the options are listed in :mod:`lqjobs.ops.example_functions`."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Behaviour:
    """What a function does for one call; see the module docstring."""

    sleep: float = 0.0
    fast_calls: int = 0
    status: int = 200
    error: str | None = None
    fail_times: int = 0
    legacy: bool = False
    redirect: str | None = None
    hang: bool = False
    unreachable: bool = False
    drop_callback: bool = False
    callback_copies: int = 1
    callback_delay: float = 0.0
    late_calls: int = 0
    trickle: float = 0.0
    trickle_headers: bool = False
    trickle_calls: int = 0
    gate: str | None = None

    @classmethod
    def from_options(cls, *layers: Mapping[str, Any]) -> Behaviour:
        known = {f.name for f in fields(cls)}
        options: dict[str, Any] = {}
        for layer in layers:
            options.update((k, v) for k, v in layer.items() if k in known)
        return cls(**options)


@dataclass(frozen=True)
class CallRecord:
    """One call of a function. ``status`` 0: it never answered (``hang``); 499: the
    caller hung up before the reply was complete (``trickle``).

    Async calls are recorded once the callback was posted (``callback_status``)
    or deliberately dropped (``callback_status`` None).
    """

    route: str  # "knative" | "openfaas" | "openfaas-async" | "plain"
    task: str
    job_id: int | None
    attempt: int | None
    started: float  # time.monotonic()
    ended: float
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes
    callback_status: int | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["body"] = self.body.decode("utf-8", "replace")
        return data


class CallLog:
    """Thread-safe list of calls, optionally mirrored to a JSON-lines file."""

    def __init__(self, path: Path | None = None) -> None:
        self._calls: list[CallRecord] = []
        self._changed = threading.Condition()
        self._path = path

    def append(self, call: CallRecord) -> None:
        with self._changed:
            self._calls.append(call)
            if self._path is not None:
                with self._path.open("a", encoding="utf-8") as log:
                    log.write(json.dumps(call.to_json()) + "\n")
            self._changed.notify_all()

    def all(self) -> list[CallRecord]:
        with self._changed:
            return list(self._calls)

    def calls_for(self, job_id: int) -> list[CallRecord]:
        return [call for call in self.all() if call.job_id == job_id]

    def wait_for(
        self, predicate: Callable[[list[CallRecord]], bool], timeout: float = 5.0
    ) -> list[CallRecord]:
        """Block until ``predicate(calls)`` holds; TimeoutError after ``timeout`` seconds."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self._calls), timeout):
                raise TimeoutError(
                    f"condition not met within {timeout}s ({len(self._calls)} calls)"
                )
            return list(self._calls)

    def wait_for_calls(
        self, n: int, timeout: float = 5.0, *, job_id: int | None = None
    ) -> list[CallRecord]:
        """Block until ``n`` calls (for ``job_id``, if given) are recorded; return them."""

        def matching(calls: list[CallRecord]) -> list[CallRecord]:
            return [c for c in calls if job_id is None or c.job_id == job_id]

        return matching(self.wait_for(lambda calls: len(matching(calls)) >= n, timeout))

    def __len__(self) -> int:
        with self._changed:
            return len(self._calls)
