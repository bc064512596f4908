"""The doctor's server findings that need no server: versions outside the tested
ones, and the poll-only listener, which must not even try to connect."""

from __future__ import annotations

import pytest

from lqjobs.db.server import ServerInfo
from lqjobs.ops import doctor
from lqjobs.settings import Settings

UNREACHABLE = "postgresql://u:pw-CANARY-1@127.0.0.1:1/x"


def info(version_num: int) -> ServerInfo:
    major, minor = divmod(version_num, 10000)
    return ServerInfo(f"{major}.{minor}", version_num, "app", True, False, 100000.0)


@pytest.mark.parametrize(
    ("version_num", "level", "detail"),
    [
        (150018, doctor.Level.OK, "PostgreSQL 15.18 (tested: 15, 18)"),
        (180006, doctor.Level.OK, "PostgreSQL 18.6 (tested: 15, 18)"),
        (140013, doctor.Level.OK, "PostgreSQL 14.13 (expected to work; tested: 15, 18)"),
        (130020, doctor.Level.OK, "PostgreSQL 13.20 (expected to work; tested: 15, 18)"),
        (
            120022,
            doctor.Level.WARN,
            "PostgreSQL 12.22: older than 13, the oldest lqjobs is expected to work on",
        ),
    ],
)
def test_version_findings(version_num: int, level: doctor.Level, detail: str) -> None:
    assert doctor._version_finding(info(version_num)) == doctor.Finding("server", level, detail)


def test_transaction_mode_without_a_listen_url_is_poll_only_untried() -> None:
    settings = Settings(database_url=UNREACHABLE, database_pool_mode="transaction")
    [line] = doctor.diagnose(settings, [doctor.check_listener])
    assert line.level is doctor.Level.WARN  # not FAIL: nothing was tried against port 1
    assert line.detail.startswith("poll only (LQJOBS_DATABASE_POOL_MODE=transaction")
    assert (
        "new jobs wait up to 1s" in line.detail
    )  # the short poll of a component that cannot LISTEN
