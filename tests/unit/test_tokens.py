from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

from lqjobs.callback import tokens
from lqjobs.errors import ConfigurationError
from lqjobs.lease import Lease

KEY_A = "a" * 32
KEY_B = "b" * 40
LEASE = Lease(42, "bridge-host-0123456789ab", 3, datetime(2026, 1, 2, 3, 4, 5, 678901, UTC))


def keys(text: str = f"k1:{KEY_A},k2:{KEY_B}") -> tokens.CallbackKeys:
    return tokens.CallbackKeys.parse(text)


def test_a_signed_token_verifies_to_its_exact_lease() -> None:
    token = tokens.sign(keys(), LEASE, timedelta(minutes=10))
    claims = tokens.verify(keys(), token)
    assert claims is not None
    assert claims.lease == LEASE  # microseconds survive the round trip
    assert claims.expires_at == datetime(2026, 1, 2, 3, 14, 5, tzinfo=UTC)


def test_rotation_old_key_still_verifies_new_key_signs() -> None:
    old = tokens.sign(keys(f"k2:{KEY_B}"), LEASE, timedelta(minutes=1))
    assert tokens.verify(keys(f"k1:{KEY_A},k2:{KEY_B}"), old) is not None
    assert tokens.sign(keys(), LEASE, timedelta(minutes=1)).startswith("v1.k1.")
    assert tokens.verify(keys(f"k1:{KEY_A}"), old) is None  # k2 retired


def test_tampering_is_rejected() -> None:
    token = tokens.sign(keys(), LEASE, timedelta(minutes=10))
    version, kid, body, mac = token.split(".")
    other = tokens.sign(keys(), Lease(43, LEASE.worker_id, 3, LEASE.locked_at), timedelta(1))
    flipped = mac[:-2] + ("A" if mac[-2] != "A" else "B") + mac[-1]
    for forged in (
        f"{version}.{kid}.{other.split('.')[2]}.{mac}",  # body of another job, our mac
        f"{version}.{kid}.{body}.{flipped}",  # bit flipped
        f"{version}.k2.{body}.{mac}",  # claims the other key
        f"v2.{kid}.{body}.{mac}",
        "",
        "v1",
        "v1.k1..",
        "v1.k9.x.y",
        token + "x" * 600,
    ):
        assert tokens.verify(keys(), forged) is None, forged


@pytest.mark.parametrize("text", ["", "k1", "k1:short", "k-1:" + KEY_A, ":" + KEY_A])
def test_bad_keys_are_refused(text: str) -> None:
    with pytest.raises(ConfigurationError, match="LQJOBS_CALLBACK_KEYS"):
        tokens.CallbackKeys.parse(text)


def test_short_key_error_does_not_echo_the_key() -> None:
    with pytest.raises(ConfigurationError) as caught:
        tokens.CallbackKeys.parse("k1:CANARY-2")
    assert "CANARY-2" not in str(caught.value)


def test_callback_url_carries_the_token() -> None:
    url = tokens.callback_url("http://callback:12345/callback?x=1", "v1.k1.abc.def")
    parts = urlsplit(url)
    assert parts.path == "/callback"
    assert parse_qs(parts.query) == {"x": ["1"], "token": ["v1.k1.abc.def"]}
