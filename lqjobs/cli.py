"""The ``lqjobs`` command: one subcommand per role.

Options never read the environment themselves (Settings does); each option's
help names the variable it overrides.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import click

from lqjobs import db, migrate
from lqjobs.errors import ConfigurationError, DatabaseError, LqJobsError
from lqjobs.settings import Settings, load_settings, redact_url

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 3
EXIT_DATABASE = 4
NIL_UUID = "00000000-0000-0000-0000-000000000000"

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> None:
    click.echo(f"lqjobs: {message}", err=True)
    sys.exit(code)


def handles_errors(command: F) -> F:
    """Turn lqjobs errors into one clear line and a named exit code."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ConfigurationError as exc:
            _fail(str(exc), EXIT_CONFIG)
        except DatabaseError as exc:
            _fail(f"database error: {exc}", EXIT_DATABASE)
        except LqJobsError as exc:
            _fail(str(exc), EXIT_FAILURE)

    return wrapper  # type: ignore[return-value]


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    help="Postgres URL (env: DATABASE_URL, else PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE).",
)
@click.option(
    "--schema", "jobs_schema", help="Jobs schema name (env: JOBS_SCHEMA; default app_jobs)."
)
@click.version_option(package_name="lqjobs")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, jobs_schema: str | None) -> None:
    """Run the LaunchQL / Constructive app_jobs queue on Celery."""
    ctx.obj = Context({"database_url": database_url, "jobs_schema": jobs_schema})


@main.command("migrate")
@click.option(
    "--adopt",
    is_flag=True,
    help="Re-apply lqjobs' SQL over an app_jobs schema that something else installed.",
)
@pass_context
@handles_errors
def migrate_command(ctx: Context, adopt: bool) -> None:
    """Install the app_jobs schema from sql/ (a second run is a no-op)."""
    result = migrate.migrate(ctx.settings.conninfo(), ctx.settings.jobs_schema, adopt=adopt)
    click.echo(
        f"schema {result.schema}: {result.outcome.value} "
        f"({len(result.files)} files, {result.fingerprint})"
    )


@main.command("add-job")
@click.argument("task")
@click.option("--payload", default="{}", show_default=True, help="Job payload as JSON.")
@click.option(
    "--database-id", default=NIL_UUID, show_default=True, help="Tenant uuid (x-database-id)."
)
@click.option("--key", help="Job key: an existing unlocked job with this key is replaced.")
@click.option("--queue", help="Serial queue name: its jobs run one at a time.")
@click.option(
    "--run-at",
    type=click.DateTime(
        formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S%z"]
    ),
    help="Not runnable before this time (ISO 8601).",
)
@click.option("--priority", type=int, help="Lower runs first (default 0).")
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    help="Attempts before the job is parked as failed (default 25).",
)
@pass_context
@handles_errors
def add_job_command(
    ctx: Context,
    task: str,
    payload: str,
    database_id: str,
    key: str | None,
    queue: str | None,
    run_at: datetime | None,
    priority: int | None,
    max_attempts: int | None,
) -> None:
    """Enqueue one job through app_jobs.add_job."""
    try:
        value = json.loads(payload)
        tenant = UUID(database_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    with db.connect(ctx.settings.conninfo(), autocommit=True) as conn:
        job = ctx.jobs_db().add_job(
            conn,
            tenant,
            task,
            db.RawJson(json.dumps(value)),
            job_key=key,
            queue_name=queue,
            run_at=run_at,
            max_attempts=max_attempts,
            priority=priority,
        )
    click.echo(f"job {job.id} added: task={job.task_identifier} run_at={job.run_at.isoformat()}")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
@handles_errors
def status_command(ctx: Context, as_json: bool) -> None:
    """Per task identifier: ready, delayed, locked, failed permanently, oldest ready age."""
    with db.connect(ctx.settings.conninfo(), autocommit=True) as conn:
        rows = ctx.jobs_db().task_status(conn)
    if as_json:
        click.echo(json.dumps([row.model_dump() for row in rows]))
        return
    header = ("task", "ready", "delayed", "locked", "failed", "oldest ready")
    table = [header] + [
        (
            r.task_identifier,
            str(r.ready),
            str(r.delayed),
            str(r.locked),
            str(r.failed_permanently),
            _age(r.oldest_ready_age_seconds),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    if not rows:
        click.echo("(no jobs)")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if seconds < 7200 else f"{seconds / 3600:.1f}h"


@main.command("check")
@pass_context
def check_command(ctx: Context) -> None:
    """Exit 0 when the database is reachable and the schema is installed, else 1."""
    try:
        settings = ctx.settings
        with db.connect(settings.conninfo(), autocommit=True) as conn:
            installed = ctx.jobs_db().schema_installed(conn)
    except LqJobsError as exc:
        _fail(f"check failed: {exc}", EXIT_FAILURE)
        return
    if not installed:
        _fail(
            f"check failed: schema {settings.jobs_schema} is not installed "
            f"in {redact_url(settings.conninfo())}",
            EXIT_FAILURE,
        )
    click.echo(f"ok: {redact_url(settings.conninfo())} has schema {settings.jobs_schema}")


@main.command("bridge")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 1000),
    default=50,
    show_default=True,
    help="Jobs locked and published per transaction.",
)
@pass_context
@handles_errors
def bridge_command(ctx: Context, batch_size: int) -> None:
    """Lock app_jobs jobs and hand them to Celery (env: JOBS_SUPPORTED or JOBS_SUPPORT_ANY,
    LQJOBS_BROKER_URL, LQJOBS_MAX_IN_FLIGHT, LQJOBS_JOB_EXPIRY)."""
    import signal

    from bridge import Bridge, CeleryPublisher
    from lqjobs.logs import configure_logging
    from tasks.app import create_app

    settings = ctx.settings
    configure_logging(settings.log_level)
    if not settings.jobs_support_any and not settings.jobs_supported:
        raise ConfigurationError(
            "set JOBS_SUPPORTED (comma list of tasks) or JOBS_SUPPORT_ANY=true"
        )
    app = create_app(settings)
    bridge = Bridge(settings, CeleryPublisher(app, settings.max_queue_wait), batch_size=batch_size)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: bridge.stop())
    bridge.run_forever()
