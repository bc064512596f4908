"""Callback capabilities: an HMAC token bound to one lease, carried in the callback URL.

OpenFaaS' queue-worker builds the callback request itself, so the only thing
lqjobs controls end to end is the URL. The token names the lease and an expiry
(``locked_at + job_expiry``); the callback service checks the signature in
constant time before touching the database, then re-checks the lease there.
Format: ``v1.<kid>.<b64url(lease|exp_unix)>.<b64url(mac)>``, the lease in
:meth:`Lease.encode`'s form (``job_id|worker_id|attempts|locked_at_us``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlencode, urlsplit, urlunsplit

from lqjobs.errors import ConfigurationError
from lqjobs.lease import Lease

MIN_KEY_BYTES = 32


@dataclass(frozen=True)
class CallbackKeys:
    """Signing keys by id; the first signs, all verify (rotation)."""

    keys: dict[str, bytes]
    signing_kid: str

    @classmethod
    def parse(cls, text: str) -> CallbackKeys:
        """``kid:secret,kid2:secret2`` — the LQJOBS_CALLBACK_KEYS format."""
        keys: dict[str, bytes] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            kid, sep, secret = item.partition(":")
            if not sep or not kid.isalnum():
                raise ConfigurationError(
                    "invalid LQJOBS_CALLBACK_KEYS: expected kid:secret pairs, kid alphanumeric"
                )
            if len(secret.encode()) < MIN_KEY_BYTES:
                raise ConfigurationError(
                    f"invalid LQJOBS_CALLBACK_KEYS: key {kid!r} is shorter than "
                    f"{MIN_KEY_BYTES} bytes"
                )
            keys[kid] = secret.encode()
        if not keys:
            raise ConfigurationError("invalid LQJOBS_CALLBACK_KEYS: no key given")
        return cls(keys, next(iter(keys)))


@dataclass(frozen=True)
class TokenClaims:
    lease: Lease
    expires_at: datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, kid: str, body: str) -> bytes:
    return hmac.new(key, f"v1.{kid}.{body}".encode(), hashlib.sha256).digest()


def sign(keys: CallbackKeys, lease: Lease, job_expiry: timedelta) -> str:
    expires = int((lease.locked_at + job_expiry).timestamp())
    claims = f"{lease.encode()}|{expires}"
    body = _b64(claims.encode())
    mac = _mac(keys.keys[keys.signing_kid], keys.signing_kid, body)
    return f"v1.{keys.signing_kid}.{body}.{_b64(mac)}"


def verify(keys: CallbackKeys, token: str) -> TokenClaims | None:
    """The claims of a genuine token, else None. Expiry is left to the caller, who
    compares it with the database clock, not this host's."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != "v1" or parts[1] not in keys.keys or len(token) > 512:
        return None
    _, kid, body, mac = parts
    try:
        given = _unb64(mac)
    except ValueError:
        return None
    if not hmac.compare_digest(given, _mac(keys.keys[kid], kid, body)):
        return None
    return _claims(body)


def _claims(body: str) -> TokenClaims | None:
    try:
        encoded, _, expires = _unb64(body).decode().rpartition("|")
        expires_at = datetime.fromtimestamp(int(expires), UTC)
    except ValueError:
        return None
    lease = Lease.decode(encoded)
    return None if lease is None else TokenClaims(lease, expires_at)


def callback_url(base_url: str, token: str) -> str:
    """``base_url`` with the token as its ``token`` query parameter."""
    parts = urlsplit(base_url)
    query = urlencode({"token": token})
    if parts.query:
        query = f"{parts.query}&{query}"
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/callback", query, ""))
