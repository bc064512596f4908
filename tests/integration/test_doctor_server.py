"""``lqjobs doctor`` on the server itself: its version, its JIT setting, and whether
notifications sent through DATABASE_URL reach a LISTEN on the listen URL (tried for
real, against the test Postgres)."""

from __future__ import annotations

import re
import time
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from lqjobs.ops import doctor
from lqjobs.ops.cli import main
from lqjobs.settings import Settings

pytestmark = pytest.mark.integration


def settings(db_url: str, **overrides: Any) -> Settings:
    return Settings(database_url=db_url, jobs_support_any=True, **overrides)


def findings(check: doctor.Check, db_url: str, **overrides: Any) -> list[doctor.Finding]:
    return doctor.diagnose(settings(db_url, **overrides), [check])


def server_says(url: str) -> tuple[str, bool, bool, str]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('jit')::bool, "
            "pg_jit_available(), current_setting('jit_above_cost')"
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


def test_server_version_and_jit_as_the_server_reports_them(db_url: str) -> None:
    version, jit, available, above_cost = server_says(db_url)
    server, jit_line = findings(doctor.check_server, db_url)
    assert (server.check, server.level) == ("server", doctor.Level.OK)
    assert server.detail.startswith(f"PostgreSQL {version} (")
    assert (jit_line.check, jit_line.level) == ("jit", doctor.Level.OK)
    # Both servers CI runs keep jit on; Debian's ships LLVM's JIT provider, the wheel not.
    expected = {
        (True, True): f"on, available (jit_above_cost {above_cost})",
        (True, False): "on, but no JIT provider is installed: never used",
    }.get((jit, available), "off")
    assert jit_line.detail == expected


def test_jit_off_for_the_session_is_reported_off(db_url: str) -> None:
    url = psycopg.conninfo.make_conninfo(db_url, options="-c jit=off")
    assert server_says(url)[1] is False
    [_, jit_line] = findings(doctor.check_server, url)
    assert (jit_line.level, jit_line.detail) == (doctor.Level.OK, "off")


def test_the_listener_hears_its_own_notify(db_url: str) -> None:
    [line] = findings(doctor.check_listener, db_url)
    assert (line.check, line.level) == ("listener", doctor.Level.OK), line
    heard = re.search(r"NOTIFY heard in (\d+) ms$", line.detail)
    assert heard and int(heard.group(1)) < doctor.NOTIFY_TIMEOUT * 1000
    assert line.detail.startswith("LISTEN on DATABASE_URL: ")  # its URL is on the database line


def test_transaction_mode_with_a_direct_listen_url_is_tried(db_url: str) -> None:
    [line] = findings(
        doctor.check_listener,
        db_url,
        database_pool_mode="transaction",
        listen_database_url=db_url,
    )
    assert line.level is doctor.Level.OK and "NOTIFY heard in" in line.detail


def test_a_listen_url_that_never_hears_the_notify_fails(db_url: str, empty_db_url: str) -> None:
    """NOTIFY is per database: a LISTEN on another database of the same server never
    hears it, deterministically, as a LISTEN behind a transaction pooler would not."""
    secret = psycopg.conninfo.conninfo_to_dict(empty_db_url).get("password") or "pw-CANARY-1"
    listen_url = psycopg.conninfo.make_conninfo(empty_db_url, password=secret)
    started = time.monotonic()
    [line] = findings(doctor.check_listener, db_url, listen_database_url=listen_url)
    waited = time.monotonic() - started
    assert (line.check, line.level) == ("listener", doctor.Level.FAIL)
    assert "did not hear a NOTIFY sent through DATABASE_URL within 2s" in line.detail
    listen_db = psycopg.conninfo.conninfo_to_dict(empty_db_url)["dbname"]
    sent_db = psycopg.conninfo.conninfo_to_dict(db_url)["dbname"]
    assert f"the listen URL is database {listen_db}, DATABASE_URL is {sent_db}" in line.detail
    assert secret not in line.detail
    assert doctor.NOTIFY_TIMEOUT <= waited < doctor.NOTIFY_TIMEOUT + 5  # waited, and not long


@pytest.mark.one_postgres
def test_an_unreachable_listen_url_fails_without_its_password(db_url: str) -> None:
    [line] = findings(
        doctor.check_listener,
        db_url,
        listen_database_url="postgresql://u:pw-CANARY-2@127.0.0.1:1/x",
    )
    assert line.level is doctor.Level.FAIL
    assert line.detail.startswith(
        "LISTEN on LQJOBS_LISTEN_DATABASE_URL (postgresql://u:***@127.0.0.1:1/x): "
        "database unavailable"
    )
    assert "CANARY" not in line.detail


def test_doctor_cli_fails_on_a_deaf_listen_url(
    db_url: str, empty_db_url: str, redis_url: str
) -> None:
    env = {"LQJOBS_BROKER_URL": redis_url, "JOBS_SUPPORT_ANY": "true"}
    healthy = CliRunner().invoke(main, ["--database-url", db_url, "doctor"], env=env)
    assert healthy.exit_code == 0, healthy.output
    lines = healthy.output.splitlines()
    assert any(re.match(r"ok +server +PostgreSQL \d+", line) for line in lines), lines
    assert any(re.match(r"ok +jit +(on|off)", line) for line in lines), lines
    assert any(re.match(r"ok +listener +.*NOTIFY heard in \d+ ms$", line) for line in lines)
    deaf = CliRunner().invoke(
        main,
        ["--database-url", db_url, "doctor"],
        env=env | {"LQJOBS_LISTEN_DATABASE_URL": empty_db_url},
    )
    assert deaf.exit_code == 1, deaf.output
    assert re.search(r"^FAIL +listener +.*did not hear a NOTIFY .* within 2s", deaf.output, re.M)
    poll_only = CliRunner().invoke(
        main,
        ["--database-url", db_url, "doctor"],
        env=env | {"LQJOBS_DATABASE_POOL_MODE": "transaction"},
    )
    assert poll_only.exit_code == 0, poll_only.output
    assert re.search(r"^warn +listener +poll only", poll_only.output, re.M)
