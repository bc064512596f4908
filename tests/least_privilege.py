"""Least-privilege logins for tests: ``lqjobs.roles`` group roles under a unique prefix
(roles are cluster-wide) plus one LOGIN member per component, dropped afterwards."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from psycopg import sql

from lqjobs.ops import roles

_counter = itertools.count()


@dataclass(frozen=True)
class Logins:
    names: roles.RoleNames
    users: dict[str, str]  # component -> login user
    urls: dict[str, str]  # component -> conninfo of that login user

    @property
    def groups(self) -> dict[str, str]:
        return self.names.by_component()


def unique_prefix() -> str:
    return f"t{os.getpid()}_{next(_counter)}_"


@contextlib.contextmanager
def granted_logins(admin_url: str, password: str = "not-checked") -> Iterator[Logins]:
    """Apply the grants to ``admin_url``'s database and create ``<group>_login`` users."""
    names = roles.RoleNames.with_prefix(unique_prefix())
    with psycopg.connect(admin_url) as conn:
        roles.apply_grants(conn, roles=names)
    logins = create_logins(admin_url, names, password)
    try:
        yield logins
    finally:
        drop_roles(admin_url, [*logins.users.values(), *names.by_component().values()])


def create_logins(admin_url: str, names: roles.RoleNames, password: str = "not-checked") -> Logins:
    """One ``<group>_login`` LOGIN user in each group role, created as ``admin_url``'s
    user (a superuser, or one with CREATEROLE and ADMIN on the groups)."""
    users = {component: f"{group}_login" for component, group in names.by_component().items()}
    with psycopg.connect(admin_url, autocommit=True) as admin:
        for component, user in users.items():
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                    sql.Identifier(user),
                    sql.Literal(password),
                    sql.Identifier(names.by_component()[component]),
                )
            )
    urls = {
        component: psycopg.conninfo.make_conninfo(admin_url, user=user, password=password)
        for component, user in users.items()
    }
    return Logins(names, users, urls)


def drop_roles(admin_url: str, role_names: list[str]) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)",
            [role_names],
        )
        present = [
            row[0]
            for row in admin.execute(
                "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [role_names]
            ).fetchall()
        ]
        if not present:
            return
        listed = sql.SQL(", ").join(sql.Identifier(name) for name in present)
        admin.execute(sql.SQL("DROP OWNED BY {}").format(listed))  # this database's grants
        for name in present:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
