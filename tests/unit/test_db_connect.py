"""A connection that fails says where it tried and why, never with what password."""

from __future__ import annotations

import pytest

from lqjobs import db
from lqjobs.errors import DatabaseUnavailable
from lqjobs.ops.embedded import free_port

CANARY = "pw-CANARY-7"


def test_a_refused_connection_names_the_address_and_the_reason() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(DatabaseUnavailable) as caught:
        db.connect(f"postgresql://jobs:{CANARY}@127.0.0.1:{port}/app")
    message = str(caught.value)
    assert message == f"database unavailable: cannot connect to 127.0.0.1 port {port}: " + (
        "Connection refused"
    )
    assert CANARY not in message and "jobs" not in message


def test_the_address_fills_in_libpq_s_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    assert db.base.server_address("dbname=app") == "the local socket port 5432"
    monkeypatch.setenv("PGHOST", "db.internal")
    assert db.base.server_address("port=6432") == "db.internal port 6432"
    assert db.base.server_address("host='bad") == "an unreadable connection string"
