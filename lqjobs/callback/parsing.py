"""Reading an asynchronous function's callback: pure functions, no I/O.

A callback comes in one of three shapes:

* neutral: headers ``x-job-id``, ``x-worker-id``, body
  ``{"status": "success"|"error", "error"?: str}``;
* legacy (the Node runtime): any POST carrying ``X-Job-Id``; it failed when
  ``X-Job-Error: true``, with the message in ``body.message``;
* the OpenFaaS queue-worker's: the function's own reply (body and headers) plus
  ``X-Function-Status`` (non-2xx = failure, permanent for the codes a synchronous
  call fails permanently on), ``X-Call-Id``, ``X-Function-Name``,
  ``X-Duration-Seconds``. When the function was unreachable it is a 503 without
  any of the function's headers. The Pro queue-worker posts once the retries are
  over (``X-Retry`` = ``X-Retry-Max``); a failure still marked ``X-Retry`` <
  ``X-Retry-Max`` is an intermediate attempt and is ignored (the job keeps its lock
  and its deadline).

A relayed reply (``X-Function-Status``) is judged as the same reply to a
synchronous call is: by its status and ``X-Job-Error``; what its body says does not
count. Any other callback's outcome is taken from, in this order: the body's
``status``, ``X-Job-Error``, and finally the bare legacy POST (success). Every
refusal is a :class:`Rejected` carrying the HTTP status to answer with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from lqjobs.callback import tokens
from lqjobs.errors import LqJobsError
from lqjobs.executors.base import is_permanent_status
from lqjobs.lease import Lease
from lqjobs.logs import clean_text

MAX_BODY_BYTES = 64 * 1024
MAX_ERROR_CHARS = 4096

_NUMBER = re.compile(r"[0-9]{1,19}")
_HTTP_STATUS = re.compile(r"[1-5][0-9][0-9]")


class Rejected(LqJobsError):
    """The callback was refused."""

    def __init__(self, status: int, result: str) -> None:
        super().__init__(result)
        self.status = status
        self.result = result


@dataclass(frozen=True)
class Report:
    """What a callback says about its job."""

    success: bool
    message: str = ""
    final: bool = True  # False: an intermediate attempt the platform will retry itself
    permanent: bool = False  # the function's status says a retry cannot help


@dataclass(frozen=True)
class CallbackRequest:
    query: str
    headers: Mapping[str, str]  # names lower-cased
    body: bytes


def error_text(text: str) -> str:
    """A message fit for ``last_error`` and logs: one line, no control characters, 4 KiB."""
    return clean_text(text, MAX_ERROR_CHARS).strip()


def token_of(query: str) -> str:
    """The single ``token`` query parameter."""
    try:
        values = parse_qs(query, keep_blank_values=True, max_num_fields=16).get("token", [])
    except ValueError:
        raise Rejected(401, "unauthorized") from None
    if len(values) != 1 or not values[0]:
        raise Rejected(401, "unauthorized")
    return values[0]


def authenticate(keys: tokens.CallbackKeys, request: CallbackRequest) -> tokens.TokenClaims:
    """The token's claims, once its signature and the job headers agree with it."""
    claims = tokens.verify(keys, token_of(request.query))
    if claims is None:
        raise Rejected(401, "unauthorized")
    check_job_headers(request.headers, claims.lease)
    return claims


def check_job_headers(headers: Mapping[str, str], lease: Lease) -> None:
    """A job header, when present, must name the token's own lease."""
    job_id = headers.get("x-job-id")
    if job_id is not None:
        if not _NUMBER.fullmatch(job_id.strip()):
            raise Rejected(400, "bad_request")
        if int(job_id) != lease.job_id:
            raise Rejected(401, "unauthorized")
    worker_id = headers.get("x-worker-id")
    if worker_id is not None and worker_id.strip() != lease.worker_id:
        raise Rejected(401, "unauthorized")


def parse_report(headers: Mapping[str, str], body: bytes, *, retry_on_404: bool = True) -> Report:
    """The outcome a callback reports. A reply relayed by the OpenFaaS queue-worker
    (``X-Function-Status``) is judged as the same reply to a synchronous call is: by
    its status (and ``X-Job-Error``), never by what its body says. Otherwise: the
    body's ``status``, then ``X-Job-Error``, then the bare legacy POST (success)."""
    if "x-function-status" in headers:
        return _relayed_report(headers, body, retry_on_404)
    fields = _json_object(body, strict=True)
    status = fields.get("status")
    if status == "success":
        return Report(True)
    if status == "error":
        return Report(False, _message(fields, body, ("error", "message"), "function failed"))
    if status is not None:
        raise Rejected(400, "bad_request")
    if _job_error(headers):
        return Report(False, _message(fields, body, ("message", "error"), "function failed"))
    if "x-job-id" in headers:
        return Report(True)
    raise Rejected(400, "bad_request")


def _job_error(headers: Mapping[str, str]) -> bool:
    """The Node wrapper's failure: a 2xx with ``X-Job-Error: true``."""
    return headers.get("x-job-error", "").strip().lower() == "true"


def _json_object(body: bytes, *, strict: bool) -> dict[str, Any]:
    """The body as a JSON object; ``{}`` when empty. A body the function sent itself
    must be an object (400 otherwise); a relayed reply may be anything."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        return value
    if strict:
        raise Rejected(400, "bad_request")
    return {}


def _message(fields: Mapping[str, Any], body: bytes, keys: tuple[str, ...], default: str) -> str:
    for key in keys:
        value = fields.get(key)
        if isinstance(value, str) and value.strip():
            return error_text(value)
    if not fields and body.strip():
        return error_text(body.decode("utf-8", "replace"))
    return default


def _relayed_report(headers: Mapping[str, str], body: bytes, retry_on_404: bool) -> Report:
    raw = headers["x-function-status"].strip()
    if not _HTTP_STATUS.fullmatch(raw):
        raise Rejected(400, "bad_request")
    code = int(raw)
    fields = _json_object(body, strict=False)  # the function's own reply: anything goes
    if 200 <= code < 300:
        if _job_error(headers):
            return Report(False, _message(fields, body, ("message", "error"), "function failed"))
        return Report(True)
    detail = _message(fields, body, ("message", "error"), "")
    message = f"function failed with status {code}" + (f": {detail}" if detail else "")
    permanent = is_permanent_status(code, retry_on_404)
    return Report(
        False, error_text(message), final=not _retried_later(headers), permanent=permanent
    )


def _retried_later(headers: Mapping[str, str]) -> bool:
    retry, most = headers.get("x-retry", "").strip(), headers.get("x-retry-max", "").strip()
    return bool(_NUMBER.fullmatch(retry) and _NUMBER.fullmatch(most)) and int(retry) < int(most)
