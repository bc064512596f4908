"""Local development: ``INTERNAL_GATEWAY_DEVELOPMENT_MAP``, a fixed URL per task."""

from __future__ import annotations

from collections.abc import Mapping

from lqjobs.executors.base import InvalidInvocation, Invocation, _label
from lqjobs.executors.http import FunctionClient, _body, _HttpExecutor, _Request
from lqjobs.executors.validation import _Origin, build_headers


class DevMapExecutor(_HttpExecutor):
    """``INTERNAL_GATEWAY_DEVELOPMENT_MAP``: a fixed URL per task.

    An unknown task fails permanently. It never falls back to the callback URL
    (the Node runtime does, so such a job "completes" itself).
    """

    name = "devmap"

    def __init__(
        self, client: FunctionClient, mapping: Mapping[str, str], retry_on_404: bool = True
    ) -> None:
        super().__init__(client, retry_on_404)
        self._origins = {
            task: _Origin.parse(url, f"development URL for task {_label(task)}")
            for task, url in mapping.items()
        }

    def _request(self, invocation: Invocation) -> _Request:
        origin = self._origins.get(invocation.task_identifier)
        if origin is None:
            raise InvalidInvocation(
                f"no development URL for task {_label(invocation.task_identifier)}"
            )
        return _Request(origin.url(), build_headers(invocation), _body(invocation))
