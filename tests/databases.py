"""Databases for tests, made from an admin connection: fresh, or copied from a
template that already holds the migrated schema."""

from __future__ import annotations

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
