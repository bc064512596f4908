"""Install the shipped ``sql/`` schema, idempotently.

The files are plain SQL, applied in file-name order (``psql -v ON_ERROR_STOP=1
-f`` works too). lqjobs stamps a fingerprint of the files on the schema's
comment: a second ``migrate`` with the same files changes nothing. A schema
that lqjobs did not install (the LaunchQL extension) is left alone.
"""

from __future__ import annotations

import enum
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from lqjobs import db
from lqjobs.db import schema as schema_sql
from lqjobs.errors import ConfigurationError

SCHEMA = "app_jobs"  # the shipped files create this schema by name
MARKER_PREFIX = "lqjobs-sql:"


class Outcome(enum.Enum):
    INSTALLED = "installed"
    UPGRADED = "upgraded"
    UP_TO_DATE = "up to date"
    FOREIGN = "left alone (installed by something other than lqjobs)"


@dataclass(frozen=True)
class MigrationResult:
    outcome: Outcome
    schema: str
    files: tuple[str, ...]
    fingerprint: str


def sql_dir() -> Path:
    """The shipped sql/: beside the package in a checkout, under share/ when installed."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "sql",
        Path(sys.prefix) / "share" / "lqjobs" / "sql",
    ):
        if candidate.is_dir() and any(candidate.glob("*.sql")):
            return candidate
    raise ConfigurationError("the lqjobs sql/ directory was not found")


def sql_files(folder: Path | None = None) -> list[Path]:
    return sorted((folder or sql_dir()).glob("*.sql"))


def fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def migrate(conninfo: str, schema: str = SCHEMA, *, adopt: bool = False) -> MigrationResult:
    """Install or upgrade the schema. ``adopt`` re-applies over a foreign install."""
    if schema != SCHEMA:
        raise ConfigurationError(
            f"lqjobs migrate installs schema {SCHEMA!r}; JOBS_SCHEMA={schema!r} must be "
            "installed by other means"
        )
    files = sql_files()
    marker = MARKER_PREFIX + fingerprint(files)
    names = tuple(path.name for path in files)
    with db.connect(conninfo) as conn, conn.transaction():
        schema_sql.lock_for_migration(conn)
        current = schema_sql.schema_marker(conn, schema)
        if current == marker:
            outcome = Outcome.UP_TO_DATE
        elif current is not None and not current.startswith(MARKER_PREFIX) and not adopt:
            outcome = Outcome.FOREIGN
        else:
            scripts = [path.read_text() for path in files]
            schema_sql.apply_schema(conn, scripts, schema, marker)
            outcome = Outcome.INSTALLED if current is None else Outcome.UPGRADED
    return MigrationResult(outcome, schema, names, marker)
