"""What a job may put on the wire, checked before anything touches the network.

A task name is never formatted into a URL unchecked (docs/design.md, S2): it must be a
DNS-1035 label, and every URL built from it is parsed again as the HTTP client will
send it and refused unless it is exactly the intended origin and path. Only integers,
a checked worker id, UUIDs and a printable http(s) callback URL go into headers
(docs/design.md, S3).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx

from lqjobs.errors import ConfigurationError
from lqjobs.executors.base import InvalidInvocation, Invocation, _label

# Knative service and OpenFaaS function names are DNS-1035 labels.
_DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_WORKER_ID = re.compile(r"[A-Za-z0-9._:-]{4,64}")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,4096}")
_PLAIN_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)*/?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


# -- task names and headers -------------------------------------------------------


def function_name(task: str) -> str:
    """``task`` if it is a valid OpenFaaS / Knative name (a DNS-1035 label)."""
    if not isinstance(task, str) or not _DNS_1035_LABEL.fullmatch(task):
        raise InvalidInvocation(
            f"task name {_label(task)} is not a valid function name (DNS-1035 label)"
        )
    return task


def build_headers(invocation: Invocation) -> dict[str, str]:
    """The standard headers of every HTTP invocation: the Node runtime's, plus
    ``X-Job-Attempt`` and ``Idempotency-Key`` (docs/migrating-from-node.md)."""
    job_id = _count(invocation.job_id, "job id", minimum=1)
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": str(job_id),
        "X-Job-Id": str(job_id),
        "X-Job-Attempt": str(_count(invocation.attempt, "attempt", minimum=0)),
        "X-Worker-Id": _worker_id(invocation.worker_id),
        "X-Database-Id": _uuid(invocation.database_id, "database id"),
    }
    if invocation.callback_url is not None:
        headers["X-Callback-Url"] = _http_url(invocation.callback_url, "callback URL")
    if invocation.current_user_id is not None:
        headers["X-Current-User-Id"] = _uuid(invocation.current_user_id, "current user id")
    return headers


def _count(value: object, what: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInvocation(f"{what} must be an integer >= {minimum}")
    return value


def _worker_id(value: object) -> str:
    if not isinstance(value, str) or not _WORKER_ID.fullmatch(value):
        raise InvalidInvocation("worker id must match [A-Za-z0-9._:-]{4,64}")
    return value


def _uuid(value: object, what: str) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidInvocation(f"{what} is not a UUID") from None


def _http_url(value: object, what: str) -> str:
    if not isinstance(value, str) or not _VISIBLE_ASCII.fullmatch(value):
        raise InvalidInvocation(f"{what} must be printable ASCII without spaces")
    parts = urlsplit(value)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise InvalidInvocation(f"{what} must be an http(s) URL")
    return value


# -- URLs -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Origin:
    """A configured base URL, parsed once; builds URLs below it and checks them."""

    scheme: str
    host: str
    port: int | None
    path: str

    @classmethod
    def parse(cls, url: str, what: str) -> _Origin:
        parts = urlsplit(url.strip())
        try:
            port = parts.port
        except ValueError:
            raise ConfigurationError(f"{what} has an invalid port") from None
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ConfigurationError(f"{what} must be an http(s) URL with a host")
        if parts.username is not None or parts.query or parts.fragment:
            raise ConfigurationError(f"{what} must not carry credentials, a query or a fragment")
        if not _PLAIN_PATH.fullmatch(parts.path):
            raise ConfigurationError(f"{what} has a path lqjobs cannot extend safely")
        if port == _DEFAULT_PORTS[parts.scheme]:
            port = None
        return cls(parts.scheme, parts.hostname, port, parts.path)

    def url(self, path: str = "") -> httpx.URL:
        """This origin's URL with ``path`` appended below its own path, checked."""
        full_path = (self.path.rstrip("/") + path if path else self.path) or "/"
        host = f"[{self.host}]" if ":" in self.host else self.host
        netloc = host if self.port is None else f"{host}:{self.port}"
        url = urlunsplit((self.scheme, netloc, full_path, "", ""))
        return _check_url(url, self.scheme, self.host, self.port, full_path)


def _check_url(url: str, scheme: str, host: str, port: int | None, path: str) -> httpx.URL:
    """``url`` parsed as the HTTP client will send it; refused unless that is exactly
    the intended origin and path."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise InvalidInvocation("refusing to call a URL that does not parse") from None
    intended = (scheme, host, port, path, b"", "", b"")
    actual = (
        parsed.scheme,
        parsed.host,
        parsed.port,
        parsed.path,
        parsed.query,
        parsed.fragment,
        parsed.userinfo,
    )
    if actual != intended or scheme not in _DEFAULT_PORTS:
        raise InvalidInvocation("refusing to call a URL outside the intended origin")
    return parsed
