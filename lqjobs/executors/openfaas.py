"""OpenFaaS through its gateway, synchronous or through the gateway's async queue."""

from __future__ import annotations

import re

from lqjobs.executors.base import Deferred, InvalidInvocation, Invocation, Outcome
from lqjobs.executors.http import FunctionClient, _body, _HttpExecutor, _Reply, _Request
from lqjobs.executors.validation import _Origin, build_headers, function_name

_CALL_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class OpenFaaSExecutor(_HttpExecutor):
    """OpenFaaS through its gateway: ``/function/<task>`` or ``/async-function/<task>``.

    Asynchronous calls pass ``X-Callback-Url`` and ``X-Call-Id``; the gateway
    answers 202 and its queue-worker posts the function's result to the
    callback URL later, so the outcome is :class:`Deferred`.
    """

    def __init__(
        self,
        client: FunctionClient,
        gateway_url: str,
        *,
        asynchronous: bool,
        retry_on_404: bool = True,
    ) -> None:
        super().__init__(client, retry_on_404)
        self.name = "openfaas-async" if asynchronous else "openfaas"
        self._gateway = _Origin.parse(gateway_url, "INTERNAL_GATEWAY_URL")
        self._asynchronous = asynchronous

    def _request(self, invocation: Invocation) -> _Request:
        task = function_name(invocation.task_identifier)
        headers = build_headers(invocation)
        if self._asynchronous:
            if invocation.callback_url is None:
                raise InvalidInvocation("openfaas-async needs a callback URL")
            if not _CALL_ID.fullmatch(invocation.call_id):
                raise InvalidInvocation("call id must match [A-Za-z0-9._:-]{1,128}")
            headers["X-Call-Id"] = invocation.call_id
        route = "async-function" if self._asynchronous else "function"
        return _Request(self._gateway.url(f"/{route}/{task}"), headers, _body(invocation))

    def _outcome(self, reply: _Reply, task: str) -> Outcome:
        if self._asynchronous and 200 <= reply.status < 300:
            return Deferred()
        return super()._outcome(reply, task)
