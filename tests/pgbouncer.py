"""A real PgBouncer (Debian's package) in front of a test server, for the pooler tests.

Set up as an operator would: ``pool_mode = transaction``, a few server connections
per database and user (so that clients share them), trust authentication (the test
servers trust loopback). PgBouncer refuses to run as root; the suite's Postgres
service user runs it then, so ``folder`` must be reachable by that user (under the
suite's services folder, not pytest's private tmp_path).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from lqjobs.ops.embedded import SERVICE_USER, free_port

CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


def pgbouncer_bin() -> str | None:
    found = shutil.which("pgbouncer")
    return found or next((path for path in CANDIDATES if os.access(path, os.X_OK)), None)


class PgBouncer:
    """``pgbouncer`` on 127.0.0.1 forwarding every database of ``server_url``'s server."""

    def __init__(
        self,
        folder: Path,
        server_url: str,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 4,
        users: tuple[str, ...] = ("postgres",),
    ) -> None:
        self.folder = folder
        self.server = conninfo_to_dict(server_url)
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.users = users
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / "pgbouncer.log"

    def url(self, direct_url: str) -> str:
        """``direct_url`` (a database of the server) reached through this PgBouncer."""
        return make_conninfo(direct_url, host="127.0.0.1", port=str(self.port))

    def start(self, timeout: float = 20.0) -> None:
        binary = pgbouncer_bin()
        if binary is None:
            raise RuntimeError("no pgbouncer: apt-get install pgbouncer (.ci/run does)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o755)
        config = self._write_config()
        owner = pwd.getpwnam(SERVICE_USER) if os.geteuid() == 0 else None
        if owner is not None:
            for path in (self.folder, *self.folder.iterdir()):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._proc = subprocess.Popen(
            [binary, str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
        )
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer not ready after {timeout}s; see {self.log_path}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)  # PgBouncer's immediate shutdown
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _write_config(self) -> Path:
        users = "".join(f'"{user}" ""\n' for user in self.users)
        (self.folder / "users.txt").write_text(users)
        config = self.folder / "pgbouncer.ini"
        host, port = self.server.get("host", "127.0.0.1"), self.server.get("port", 5432)
        config.write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.folder / 'users.txt'}\n"
            f"pool_mode = {self.pool_mode}\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 1000\n"
            f"logfile = {self.log_path}\n"
        )
        return config

    def _ready(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                return False
        try:
            probe = make_conninfo(
                "", host="127.0.0.1", port=str(self.port), user="postgres", dbname="postgres"
            )
            with psycopg.connect(probe, connect_timeout=2, prepare_threshold=None) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True
