"""What every ``lqjobs`` subcommand shares: the named exit codes, the lazily loaded
settings, and the one place lqjobs errors become a line on stderr and an exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from lqjobs import db
from lqjobs.errors import ConfigurationError, DatabaseError, DatabaseUnavailable, LqJobsError
from lqjobs.settings import Settings, load_settings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 3
EXIT_DATABASE = 4

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"lqjobs: {message}", err=True)
    sys.exit(code)


def handles_errors(command: F) -> F:
    """Turn lqjobs errors into one clear line and a named exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigurationError as exc:
            fail(str(exc), EXIT_CONFIG)
        except DatabaseUnavailable as exc:
            fail(f"database error: {exc}\n{_where_to_point()}", EXIT_DATABASE)
        except DatabaseError as exc:
            fail(f"database error: {exc}", EXIT_DATABASE)
        except LqJobsError as exc:
            fail(str(exc), EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]


def _where_to_point() -> str:
    """What to set after a failed connection; names a `lqjobs dev` stack running here."""
    from lqjobs.ops.dev import DEFAULT_DATA_DIR, EXPORTS_FILE

    exports = DEFAULT_DATA_DIR / EXPORTS_FILE
    if exports.exists():
        return f"lqjobs: `lqjobs dev` runs from this directory: run `. {exports}` first"
    return (
        "lqjobs: set DATABASE_URL (or PGHOST, PGPORT, PGUSER, PGDATABASE); for the stack of "
        f"a running `lqjobs dev`: `. {exports}` in its directory"
    )


class Context:
    """Settings are loaded lazily, so `--help` works with a broken environment."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        self.overrides = {k: v for k, v in overrides.items() if v is not None}
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(**self.overrides)
        return self._settings

    def jobs_db(self) -> db.JobsDB:
        return db.JobsDB(self.settings.jobs_schema)


pass_context = click.make_pass_decorator(Context)


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows (the header first) as lines of left-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
