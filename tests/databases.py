"""Databases for tests, made from an admin connection: fresh, or copied from a
template that already holds the migrated schema."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql


def database_url(base_url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(base_url, dbname=dbname)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def recreate_database(admin_url: str, name: str, template: str | None = None) -> None:
    drop_database(admin_url, name)
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(create)


@dataclass(frozen=True)
class PostgresServer:
    """The server a test runs on: ``kind`` is embedded, system or url."""

    kind: str
    url: str  # a superuser's, to the maintenance database
    bin_dir: Path | None  # its client programs (psql, pg_dump); None: those on PATH
    log_path: Path | None = None  # the server's log, when the suite started the server

    def bin(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir else name
