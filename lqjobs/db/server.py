"""What ``lqjobs doctor`` asks of the server itself, outside any jobs schema: its
version and JIT settings, and a NOTIFY round trip between two connections. All of
it works for any login (no superuser, no extension)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from lqjobs.db.base import Connection, translated_errors


@dataclass(frozen=True)
class ServerInfo:
    version: str  # server_version, e.g. "15.18 (Debian 15.18-0+deb12u1)"
    version_num: int  # server_version_num, e.g. 150018
    database: str  # current_database()
    jit: bool  # the jit setting
    jit_available: bool  # pg_jit_available(): a JIT provider could be loaded
    jit_above_cost: float

    @property
    def major(self) -> int:
        return self.version_num // 10000


def server_info(conn: Connection) -> ServerInfo:
    query = (
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int, "
        "current_database(), current_setting('jit')::bool, pg_jit_available(), "
        "current_setting('jit_above_cost')::float8"
    )
    with translated_errors():
        row = conn.execute(query).fetchone()
    assert row is not None
    version, version_num, database, jit, jit_available, jit_above_cost = row
    return ServerInfo(
        str(version),
        int(version_num),
        str(database),
        bool(jit),
        bool(jit_available),
        float(jit_above_cost),
    )


def database_name(conn: Connection) -> str:
    with translated_errors():
        row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def notify(conn: Connection, channel: str, payload: str) -> None:
    """Send one notification (delivered when the caller's transaction commits)."""
    with translated_errors():
        conn.execute("SELECT pg_notify(%s, %s)", [channel, payload])


def wait_for_notification(conn: Connection, channel: str, payload: str, timeout: float) -> bool:
    """Wait on a LISTENing connection until ``payload`` arrives on ``channel`` (True)
    or ``timeout`` seconds have passed (False); other notifications are skipped."""
    deadline = time.monotonic() + timeout
    with translated_errors():
        while (remaining := deadline - time.monotonic()) > 0:
            for note in conn.notifies(timeout=remaining, stop_after=1):
                if note.channel == channel and note.payload == payload:
                    return True
    return False
