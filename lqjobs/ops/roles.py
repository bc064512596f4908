"""Least-privilege database roles for the four runtime components (docs/design.md, S6).

``lqjobs grant`` prints (or, with ``--apply``, runs) the SQL built here. It creates
one NOLOGIN group role per component and grants it exactly what that component's
queries need; operators then create login users that are members of these roles.
This module builds SQL, like :mod:`lqjobs.db`, on purpose: it is the one other place
where lqjobs writes SQL, and every name in it is quoted as an identifier.

Derivation: :data:`STATEMENTS` names every statement each component runs (the
methods of the :mod:`lqjobs.db` role classes it calls; a test holds that list
against the code and runs each statement under the component's role). The queue
functions other than ``add_job`` / ``add_scheduled_job`` are not SECURITY DEFINER:
they run with the caller's table privileges, and so do the row triggers on
``jobs`` (timestamps, ``job_queues`` bookkeeping, NOTIFY). ``SELECT ... FOR
UPDATE / FOR SHARE`` needs UPDATE on the table as well as SELECT. So:

- bridge: ``get_job`` (SELECT/UPDATE jobs and job_queues), ``fail_job`` and
  ``permanently_fail_jobs`` for oversized payloads and abandoned leases, and reads
  of jobs; it never deletes;
- worker: the preflight (jobs FOR SHARE) and the fenced ``complete_job`` (DELETE
  jobs; the delete trigger updates / deletes job_queues), ``fail_job``, and
  ``reschedule_jobs`` to give back a lease it could not start;
  advisory locks and ``pg_notify`` need nothing;
- callback: the lease state (jobs FOR UPDATE) and the same fenced writes;
- scheduler: SELECT/UPDATE scheduled_jobs and ``run_scheduled_job``, which INSERTs
  into jobs (``jobs_id_seq``; RETURNING needs SELECT) while the insert trigger
  upserts job_queues (SELECT, INSERT, UPDATE).

Nothing here is superuser, owns an object, or gets CREATE, TRUNCATE, REFERENCES or
TRIGGER. Re-running converges on exactly this matrix: each role's privileges on
the schema's objects are revoked and granted again in one transaction.

EXECUTE to PUBLIC: Postgres lets everyone execute a new function. The queue
functions above are revoked from PUBLIC (``revoke_public``), so a role can call
only the ones granted to it; the schema owner and LaunchQL's ``administrator``
(granted explicitly by sql/050_grants.sql) keep them. ``add_job`` and
``add_scheduled_job`` keep PUBLIC EXECUTE: applications (and the trigger helpers)
enqueue through them, with only USAGE on the schema, as the SQL contract expects.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from psycopg import sql

from lqjobs import db
from lqjobs.errors import ConfigurationError
from lqjobs.logs import clean_text

COMPONENTS = ("bridge", "worker", "callback", "scheduler")
DEFAULT_PREFIX = "jobs_"
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

# The queue API's argument types (sql/030_functions.sql): GRANT / REVOKE name a function
# by its signature.
FUNCTION_SIGNATURES: dict[str, str] = {
    "get_job": "text, text[], interval",
    "complete_job": "text, bigint",
    "complete_jobs": "bigint[]",
    "fail_job": "text, bigint, text",
    "release_jobs": "text",
    "reschedule_jobs": "bigint[], timestamptz, integer, integer, integer",
    "permanently_fail_jobs": "bigint[], text",
    "get_scheduled_job": "text, text[]",
    "release_scheduled_jobs": "text, bigint[]",
    "run_scheduled_job": "bigint, interval",
}
# Not SECURITY DEFINER: run with the caller's rights, granted per role, revoked from PUBLIC.
WORKER_SIDE_FUNCTIONS = tuple(FUNCTION_SIGNATURES)
# SECURITY DEFINER and called by applications: left executable by PUBLIC.
PUBLIC_FUNCTIONS = ("add_job", "add_scheduled_job")


@dataclass(frozen=True)
class Privileges:
    """What one component's role is granted in the jobs schema (besides USAGE)."""

    functions: tuple[str, ...]
    tables: dict[str, tuple[str, ...]]
    sequences: tuple[str, ...] = ()


# The statements each component runs: "<lqjobs.db role class>.<method>".
STATEMENTS: dict[str, tuple[str, ...]] = {
    "bridge": (
        "Queue.get_jobs_under_cap",
        "Queue.fail_job_permanently",
        "Queue.fail_abandoned_leases",
        "Reads.count_locked_by",
        "Reads.jobs_locked_by",
        "Reads.queue_gauges",
        "Reads.seconds_until_next_job",
    ),
    "worker": (
        "Fence.preflight",
        "Fence.release_advisory",
        "Fence.fenced_complete",
        "Fence.fenced_fail",
        "Fence.fenced_fail_permanently",
        "Fence.fenced_give_back",
    ),
    "callback": (
        "Fence.lock_lease_state",
        "Fence.fenced_complete",
        "Fence.fenced_fail",
        "Fence.fenced_fail_permanently",
    ),
    "scheduler": (
        "Scheduled.get_scheduled_job",
        "Scheduled.release_scheduled_jobs",
        "Scheduled.run_scheduled_job",
        "Scheduled.scheduled_jobs_locked_by",
    ),
}
_SETTLE = ("SELECT", "UPDATE", "DELETE")
MATRIX: dict[str, Privileges] = {
    "bridge": Privileges(
        functions=("get_job", "fail_job", "permanently_fail_jobs"),
        tables={"jobs": ("SELECT", "UPDATE"), "job_queues": ("SELECT", "UPDATE")},
    ),
    "worker": Privileges(
        functions=("complete_job", "fail_job", "permanently_fail_jobs", "reschedule_jobs"),
        tables={"jobs": _SETTLE, "job_queues": _SETTLE},
    ),
    "callback": Privileges(
        functions=("complete_job", "fail_job"),
        tables={"jobs": _SETTLE, "job_queues": _SETTLE},
    ),
    "scheduler": Privileges(
        functions=("get_scheduled_job", "release_scheduled_jobs", "run_scheduled_job"),
        tables={
            "scheduled_jobs": ("SELECT", "UPDATE"),
            "jobs": ("SELECT", "INSERT"),
            "job_queues": ("SELECT", "INSERT", "UPDATE"),
        },
        sequences=("jobs_id_seq",),
    ),
}


@dataclass(frozen=True)
class RoleNames:
    """The group role of each component."""

    bridge: str = DEFAULT_PREFIX + "bridge"
    worker: str = DEFAULT_PREFIX + "worker"
    callback: str = DEFAULT_PREFIX + "callback"
    scheduler: str = DEFAULT_PREFIX + "scheduler"

    def __post_init__(self) -> None:
        for name in self.by_component().values():
            if not _ROLE_NAME.fullmatch(name):
                raise ConfigurationError(
                    f"invalid role name {name!r}: 1 to 63 letters, digits or '_', "
                    "not starting with a digit"
                )

    @classmethod
    def with_prefix(cls, prefix: str = DEFAULT_PREFIX) -> RoleNames:
        """``<prefix>bridge``, ``<prefix>worker``, ... (default ``jobs_``)."""
        return cls(*(prefix + component for component in COMPONENTS))

    def by_component(self) -> dict[str, str]:
        return {component: getattr(self, component) for component in COMPONENTS}


def grant_statements(
    schema: str = "app_jobs",
    roles: RoleNames | None = None,
    *,
    revoke_public: bool = True,
) -> list[sql.Composed]:
    """The statements, in order, that create the roles and grant them ``MATRIX``.
    Run them in one transaction (:func:`apply_grants` does)."""
    return [
        statement
        for _, statements in _sections(schema, roles or RoleNames(), revoke_public)
        for statement in statements
    ]


def grant_sql(
    schema: str = "app_jobs", roles: RoleNames | None = None, *, revoke_public: bool = True
) -> str:
    """:func:`grant_statements` as one psql-ready script, wrapped in a transaction."""
    parts = [
        "-- lqjobs least-privilege roles (docs/design.md, S6); re-running is a no-op.",
        f"-- Schema: {clean_text(schema, 100)}. "
        "Run as the schema owner with CREATEROLE (or a superuser).",
        "BEGIN;",
    ]
    for comment, statements in _sections(schema, roles or RoleNames(), revoke_public):
        parts.append(f"\n-- {comment}")
        parts += [statement.as_string() + ";" for statement in statements]
    parts.append("\nCOMMIT;")
    return "\n".join(parts) + "\n"


def _sections(
    schema: str, roles: RoleNames, revoke_public: bool
) -> list[tuple[str, list[sql.Composed]]]:
    ident = sql.Identifier(schema)
    sections = [
        (
            "Group roles: NOLOGIN, created unless they exist",
            [_create_role(name) for name in roles.by_component().values()],
        )
    ]
    if revoke_public:
        revoke = sql.SQL("REVOKE EXECUTE ON FUNCTION\n  {}\nFROM PUBLIC").format(
            _functions(ident, WORKER_SIDE_FUNCTIONS, ",\n  ")
        )
        sections.append(
            ("Queue functions: only the roles granted below (add_job stays PUBLIC)", [revoke])
        )
    for component, role_name in roles.by_component().items():
        privileges = MATRIX[component]
        sections.append(
            (
                f"{component}: {role_name}",
                _role_grants(ident, sql.Identifier(role_name), privileges),
            )
        )
    return sections


def apply_grants(
    conn: db.Connection,
    schema: str = "app_jobs",
    roles: RoleNames | None = None,
    *,
    revoke_public: bool = True,
) -> None:
    """Run :func:`grant_statements` in one transaction (all or nothing). Needs the
    schema's owner (or a superuser) with CREATEROLE when a role does not exist yet."""
    statements = grant_statements(schema, roles, revoke_public=revoke_public)
    with db.translated_errors(), conn.transaction():
        for statement in statements:
            conn.execute(statement)


# -- the pieces -------------------------------------------------------------------------


def _create_role(name: str) -> sql.Composed:
    """Create the NOLOGIN role unless it exists; refuse one that exists with powers
    this module would never give it."""
    return sql.SQL(
        """DO $lqjobs_roles$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {name}) THEN
    CREATE ROLE {role} NOLOGIN;
  ELSIF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {name}
                   AND (rolsuper OR rolcreaterole OR rolcreatedb OR rolreplication
                        OR rolbypassrls)) THEN
    RAISE EXCEPTION 'role % exists with SUPERUSER, CREATEROLE, CREATEDB, REPLICATION '
                    'or BYPASSRLS; lqjobs grants least privilege only', {name};
  END IF;
END
$lqjobs_roles$"""
    ).format(name=sql.Literal(name), role=sql.Identifier(name))


def _functions(schema: sql.Identifier, names: Sequence[str], separator: str = ", ") -> sql.Composed:
    return sql.SQL(separator).join(
        sql.SQL("{}.{}({})").format(
            schema, sql.Identifier(name), sql.SQL(FUNCTION_SIGNATURES[name])
        )
        for name in names
    )


def _role_grants(
    schema: sql.Identifier, role: sql.Identifier, privileges: Privileges
) -> list[sql.Composed]:
    # Start from nothing on the schema's objects, so a re-run converges on MATRIX.
    statements = [
        sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(schema, role),
        sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(schema, role),
        sql.SQL("REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {} FROM {}").format(schema, role),
        sql.SQL("REVOKE ALL ON SCHEMA {} FROM {}").format(schema, role),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, role),
        sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(
            _functions(schema, privileges.functions), role
        ),
    ]
    for table, table_privileges in privileges.tables.items():
        statements.append(
            sql.SQL("GRANT {} ON TABLE {}.{} TO {}").format(
                sql.SQL(", ").join(sql.SQL(p) for p in table_privileges),
                schema,
                sql.Identifier(table),
                role,
            )
        )
    for sequence in privileges.sequences:
        statements.append(
            sql.SQL("GRANT USAGE ON SEQUENCE {}.{} TO {}").format(
                schema, sql.Identifier(sequence), role
            )
        )
    return statements
