"""Installing the jobs schema (used by ``lqjobs migrate``): the marker lqjobs stamps
on the schema, the install scripts, and one migration at a time per database."""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

from lqjobs.db.base import Connection, translated_errors

MIGRATION_LOCK_KEY = 0x6C716A6F62  # 'lqjob': one migration at a time per database


def schema_marker(conn: Connection, schema: str) -> str | None:
    """The schema's comment (lqjobs stamps its SQL fingerprint there), or None when
    the schema does not exist. '' means it exists without a comment."""
    query = "SELECT coalesce(obj_description(oid, 'pg_namespace'), '') FROM pg_namespace WHERE nspname = %s"  # noqa: E501
    with translated_errors():
        row = conn.execute(query, [schema]).fetchone()
    return None if row is None else str(row[0])


def apply_schema(conn: Connection, scripts: Sequence[str], schema: str, marker: str) -> None:
    """Run the install scripts and stamp the marker, in the caller's transaction."""
    with translated_errors():
        for script in scripts:
            conn.execute(script.encode())  # our own files: no parameters, many statements
        conn.execute(
            sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                sql.Identifier(schema), sql.Literal(marker)
            )
        )


def lock_for_migration(conn: Connection) -> None:
    with translated_errors():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_KEY])
