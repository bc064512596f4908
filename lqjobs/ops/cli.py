"""The ``lqjobs`` command: one subcommand per role.

Options never read the environment themselves (Settings does); each option's
help names the variable it overrides.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import click

from lqjobs import db
from lqjobs.errors import ConfigurationError, LqJobsError
from lqjobs.logs import escaped
from lqjobs.metrics import Sample, serve
from lqjobs.ops import migrate, roles
from lqjobs.ops.cli_common import (
    EXIT_CONFIG,
    EXIT_DATABASE,
    EXIT_FAILURE,
    EXIT_OK,
    Context,
    fail,
    format_age,
    handles_errors,
    pass_context,
)
from lqjobs.ops.jobs_cli import jobs
from lqjobs.settings import Settings, redact_url

__all__ = ["EXIT_CONFIG", "EXIT_DATABASE", "EXIT_FAILURE", "EXIT_OK", "main"]

NIL_UUID = "00000000-0000-0000-0000-000000000000"


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


main.add_command(jobs)  # lqjobs jobs ...: lqjobs/ops/jobs_cli.py


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
    with db.connect(
        ctx.settings.conninfo(), autocommit=True, pool_mode=ctx.settings.database_pool_mode
    ) as conn:
        job = ctx.jobs_db().queue.add_job(
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


@main.command("grant")
@click.option(
    "--apply",
    "apply_now",
    is_flag=True,
    help="Run the SQL (one transaction) instead of printing it; needs the schema owner "
    "with CREATEROLE, or a superuser.",
)
@click.option(
    "--prefix",
    default=roles.DEFAULT_PREFIX,
    show_default=True,
    help="Role names are <prefix>bridge, <prefix>worker, <prefix>callback, <prefix>scheduler "
    "(roles are cluster-wide: give each database its own prefix).",
)
@click.option(
    "--keep-public-execute",
    is_flag=True,
    help="Leave the queue functions executable by PUBLIC (default: revoke; add_job and "
    "add_scheduled_job stay PUBLIC either way).",
)
@pass_context
@handles_errors
def grant_command(ctx: Context, apply_now: bool, prefix: str, keep_public_execute: bool) -> None:
    """Create NOLOGIN roles for the bridge, worker, callback service and scheduler with
    least privilege on the jobs schema (printed; --apply runs it). Re-running is a no-op.
    Log in as users that are members of them (docs/roles.md)."""
    names = roles.RoleNames.with_prefix(prefix)
    schema = ctx.settings.jobs_schema
    revoke_public = not keep_public_execute
    if not apply_now:
        click.echo(roles.grant_sql(schema, names, revoke_public=revoke_public), nl=False)
        return
    with db.connect(ctx.settings.conninfo(), pool_mode=ctx.settings.database_pool_mode) as conn:
        roles.apply_grants(conn, schema, names, revoke_public=revoke_public)
    created = ", ".join(names.by_component().values())
    click.echo(f"schema {schema}: roles {created} granted")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
@handles_errors
def status_command(ctx: Context, as_json: bool) -> None:
    """Per task identifier: ready, delayed, locked (of those, on the last attempt),
    failed permanently, oldest ready age."""
    with db.connect(
        ctx.settings.conninfo(), autocommit=True, pool_mode=ctx.settings.database_pool_mode
    ) as conn:
        rows = ctx.jobs_db().reads.task_status(conn)
    if as_json:
        click.echo(json.dumps([row.model_dump() for row in rows]))
        return
    header = ("task", "ready", "delayed", "locked", "last-try", "failed", "oldest ready")
    table = [header] + [
        (
            escaped(r.task_identifier),  # chosen by any add_job caller: one table line
            str(r.ready),
            str(r.delayed),
            str(r.locked),
            str(r.locked_last_attempt),
            str(r.failed_permanently),
            format_age(r.oldest_ready_age_seconds),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    if not rows:
        click.echo("(no jobs)")


@main.command("check")
@pass_context
def check_command(ctx: Context) -> None:
    """Exit 0 when the database is reachable and the schema is installed, else 1."""
    try:
        settings = ctx.settings
        with db.connect(
            settings.conninfo(), autocommit=True, pool_mode=settings.database_pool_mode
        ) as conn:
            installed = ctx.jobs_db().reads.schema_installed(conn)
    except LqJobsError as exc:
        fail(f"check failed: {exc}", EXIT_FAILURE)
        return
    if not installed:
        fail(
            f"check failed: schema {settings.jobs_schema} is not installed "
            f"in {redact_url(settings.conninfo())}",
            EXIT_FAILURE,
        )
    click.echo(f"ok: {redact_url(settings.conninfo())} has schema {settings.jobs_schema}")


def _require_tasks(settings: Settings) -> None:
    if not settings.jobs_support_any and not settings.jobs_supported:
        raise ConfigurationError(
            "set JOBS_SUPPORTED (comma list of tasks) or JOBS_SUPPORT_ANY=true"
        )


def _run_role(
    settings: Settings,
    run_forever: Callable[[], None],
    stop: Callable[[], None],
    collect: Callable[[], list[Sample]] | None = None,
) -> None:
    """Run one process role until SIGTERM / SIGINT, serving its metrics meanwhile."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop())
    metrics = serve(settings.metrics_port, collect) if collect else None  # LQJOBS_METRICS_PORT
    try:
        run_forever()
    finally:
        if metrics is not None:
            metrics.stop()


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
    from lqjobs.bridge import Bridge, CeleryPublisher
    from lqjobs.celery import create_app
    from lqjobs.logs import configure_logging

    settings = ctx.settings
    configure_logging(settings.log_level)
    _require_tasks(settings)
    app = create_app(settings)
    bridge = Bridge(settings, CeleryPublisher(app), batch_size=batch_size)
    _run_role(settings, bridge.run_forever, bridge.stop, bridge.metrics)


@main.command("scheduler")
@pass_context
@handles_errors
def scheduler_command(ctx: Context) -> None:
    """Turn app_jobs.scheduled_jobs into jobs on their schedules (env: LQJOBS_SCHEDULER_ID,
    default scheduler-<HOSTNAME>; JOBS_SUPPORTED or JOBS_SUPPORT_ANY; LQJOBS_POLL_INTERVAL;
    LQJOBS_JOB_EXPIRY)."""
    from lqjobs.logs import configure_logging
    from lqjobs.scheduler.service import Scheduler

    settings = ctx.settings
    configure_logging(settings.log_level)
    _require_tasks(settings)
    scheduler = Scheduler(settings)
    _run_role(settings, scheduler.run_forever, scheduler.stop)


@main.command("schedules")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds a scheduled job may be held with no connected holder before it is "
    "flagged holder-gone.",
)
@pass_context
@handles_errors
def schedules_command(ctx: Context, as_json: bool, grace: float) -> None:
    """List scheduled jobs: rule, next fire time, holder, and flags for those that may
    never fire again (invalid, finished, blocked, holder-gone)."""
    from datetime import UTC

    from lqjobs.scheduler import report as schedule_report
    from lqjobs.scheduler.service import APPLICATION_NAME_PREFIX

    with db.connect(
        ctx.settings.conninfo(), autocommit=True, pool_mode=ctx.settings.database_pool_mode
    ) as conn:
        statuses = ctx.jobs_db().reads.scheduled_job_overview(conn, APPLICATION_NAME_PREFIX)
    items = schedule_report.reports(statuses, datetime.now(UTC), grace)
    if as_json:
        click.echo(json.dumps(schedule_report.as_json(items)))
        return
    table = [schedule_report.HEADER, *(item.row() for item in items)]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        cells = (cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        click.echo("  ".join(cells).rstrip())
    if not items:
        click.echo("(no scheduled jobs)")


@main.command("callback")
@click.option("--host", help="Bind address (env: LQJOBS_CALLBACK_HOST; default 0.0.0.0).")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Port (env: INTERNAL_JOBS_CALLBACK_PORT; default 12345).",
)
@pass_context
@handles_errors
def callback_command(ctx: Context, host: str | None, port: int | None) -> None:
    """Settle asynchronous functions' jobs from their callbacks, and fail those whose
    callback is overdue (env: LQJOBS_CALLBACK_KEYS, LQJOBS_CALLBACK_DEADLINE,
    LQJOBS_BROKER_URL)."""
    from lqjobs.callback.server import build_server
    from lqjobs.logs import configure_logging

    settings = ctx.settings
    configure_logging(settings.log_level)
    server = build_server(settings, host=host, port=port)
    _run_role(settings, server.run_forever, server.request_stop, server.metrics)


@main.command("dev")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path(".lqjobs"),
    show_default=True,
    help="Where the embedded Postgres and Redis keep their data.",
)
@click.option("--no-demo", is_flag=True, help="Start the stack without enqueuing the demo jobs.")
@click.option("--flower-port", type=int, default=5555, show_default=True)
@pass_context
@handles_errors
def dev_command(ctx: Context, data_dir: Path, no_demo: bool, flower_port: int) -> None:
    """The whole stack on this machine: embedded Postgres and Redis (unless DATABASE_URL /
    PG* and LQJOBS_BROKER_URL are set), bridge, worker, callback, scheduler, Flower and
    example functions, with a demo. Ctrl-C stops everything."""
    from lqjobs.ops import dev

    sys.exit(dev.run(ctx.settings, data_dir, demo=not no_demo, flower_port=flower_port))


def load_celery_app(name: str) -> Any:
    """The app ``celery -A name`` would load, from the current directory first."""
    from celery.app.utils import find_app

    try:
        return find_app(name)
    except Exception as exc:  # an import error of the host's module, or no app in it
        raise ConfigurationError(f"--app {name}: {type(exc).__name__}: {exc}") from None


@main.command("doctor")
@click.option(
    "--app",
    "app_name",
    metavar="MODULE[:APP]",
    help="A Celery app lqjobs is registered on (as celery -A takes it): check what its "
    "settings do to lqjobs' guarantees.",
)
@pass_context
@handles_errors
def doctor_command(ctx: Context, app_name: str | None) -> None:
    """Check the settings and timeout ladder, the broker, the schema and the queue,
    the server's version and JIT, that notifications reach the listener, and (with
    --app) what a host app's settings do to lqjobs' guarantees; exit 1 when
    something will stop jobs from running as they should."""
    from lqjobs.ops import doctor

    settings = ctx.settings
    app = load_celery_app(app_name) if app_name else None
    findings = doctor.diagnose(settings, app=app)
    click.echo(doctor.render(findings))
    if any(f.level is doctor.Level.FAIL for f in findings):
        sys.exit(EXIT_FAILURE)
