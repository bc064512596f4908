"""``lqjobs jobs``: list, show, retry, discard, unlock, cancel and purge jobs without
psql. The options and the output live here; what each command does is
:mod:`lqjobs.ops.jobs_admin`; the SQL is :mod:`lqjobs.db.admin`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import timedelta
from uuid import UUID

import click

from lqjobs import db
from lqjobs.db import Connection, JobsDB
from lqjobs.db.admin import STATES, JobFilter, Judgement
from lqjobs.errors import LqJobsError
from lqjobs.ops import jobs_admin as admin
from lqjobs.ops.cli_common import EXIT_FAILURE, Context, handles_errors, pass_context

Planner = Callable[[Connection, JobsDB, Judgement], admin.Plan]


def _age(ctx: click.Context, param: click.Parameter, value: str | None) -> timedelta | None:
    """An --older-than value (a callback, not a ParamType: that is generic from click 8.2)."""
    if value is None:
        return None
    try:
        return admin.parse_age(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


ids_argument = click.argument("ids", nargs=-1, type=click.IntRange(min=1), metavar="[ID]...")
dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Show what would change; change nothing."
)
yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
task_option = click.option("--task", help="Only jobs of this task identifier.")


def _connect(ctx: Context) -> Connection:
    settings = ctx.settings
    return db.connect(settings.conninfo(), autocommit=True, pool_mode=settings.database_pool_mode)


@click.group("jobs")
def jobs() -> None:
    """Look at jobs and fix them: list, show, retry, discard, unlock, cancel, purge
    (docs/operating.md). Run as a role that may update and delete app_jobs.jobs."""


@jobs.command("list")
@task_option
@click.option("--state", type=click.Choice(STATES), help="Only jobs in this state.")
@click.option("--database-id", type=click.UUID, help="Only jobs of this tenant.")
@click.option(
    "--older-than",
    callback=_age,
    metavar="AGE",
    help="Only jobs created longer ago (90s, 15m, 6h, 7d).",
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most this many."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
@handles_errors
def list_command(
    ctx: Context,
    task: str | None,
    state: str | None,
    database_id: UUID | None,
    older_than: timedelta | None,
    limit: int,
    as_json: bool,
) -> None:
    """Jobs by id, with their state: ready, delayed, locked, stranded or failed."""
    where = JobFilter(
        task=task,
        states=None if state is None else [state],
        database_id=database_id,
        created_longer_ago=older_than,
    )
    judged = admin.judgement(ctx.settings)
    with _connect(ctx) as conn:
        views = ctx.jobs_db().admin.jobs(conn, where, judged, limit=limit + 1)
    shown = views[:limit]
    if as_json:
        click.echo(json.dumps([admin.view_json(v) for v in shown]))
        return
    if not shown:
        click.echo("(no jobs)")
        return
    for line in admin.list_lines(shown):
        click.echo(line)
    if len(views) > limit:
        click.echo(f"(more jobs match: raise --limit above {limit})")


@jobs.command("show")
@click.argument("job_id", type=click.IntRange(min=1), metavar="ID")
@click.option("--payload", is_flag=True, help="Also print the payload (it may hold personal data).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
@handles_errors
def show_command(ctx: Context, job_id: int, payload: bool, as_json: bool) -> None:
    """One job: state, attempts, last_error, its lock and whether its holder is alive."""
    judged = admin.judgement(ctx.settings)
    with _connect(ctx) as conn:
        views = ctx.jobs_db().admin.jobs(conn, JobFilter(ids=[job_id]), judged, payload=payload)
    if not views:
        raise LqJobsError(f"no such job: {job_id}")
    if as_json:
        click.echo(json.dumps(admin.view_json(views[0])))
        return
    for line in admin.show_lines(views[0], judged):
        click.echo(line)


def _run(ctx: Context, planner: Planner, *, confirm: bool, dry_run: bool, yes: bool) -> None:
    """Plan, show, confirm, carry out, report; exit 1 if a planned job was left alone."""
    judged = admin.judgement(ctx.settings)
    jobs_db = ctx.jobs_db()
    with _connect(ctx) as conn:
        plan = planner(conn, jobs_db, judged)
        verb = plan.action.verb
        if not plan.jobs:
            click.echo(f"no jobs to {verb}")
            return
        count = f"{admin.jobs_word(len(plan.jobs))} ({admin.id_list(plan.ids)})"
        if dry_run or (confirm and not yes):
            _echo_some(plan)
        if dry_run:
            click.echo(f"would {verb} {count}; nothing changed (--dry-run)")
            return
        if confirm and not yes:
            click.confirm(f"{verb.capitalize()} {count}?", abort=True)
        outcome = admin.carry_out(conn, jobs_db, plan, judged)
    for line in admin.outcome_lines(plan, outcome):
        click.echo(line)
    if outcome.left:
        sys.exit(EXIT_FAILURE)


def _echo_some(plan: admin.Plan) -> None:
    for line in admin.list_lines(plan.jobs[: admin.SHOWN_IN_PROMPT]):
        click.echo(line)
    if len(plan.jobs) > admin.SHOWN_IN_PROMPT:
        click.echo(f"... and {len(plan.jobs) - admin.SHOWN_IN_PROMPT} more")


def _named_or_matching(
    action: admin.Action, ids: tuple[int, ...], where: JobFilter | None, usage: str
) -> Planner:
    if ids and where is not None:
        raise click.UsageError(f"give job ids or {usage}, not both")
    if not ids and where is None:
        raise click.UsageError(f"give job ids or {usage}")

    def planner(conn: Connection, jobs_db: JobsDB, judged: Judgement) -> admin.Plan:
        if where is None:
            return admin.plan_named(conn, jobs_db, action, ids, judged)
        return admin.plan_matching(conn, jobs_db, action, where, judged)

    return planner


def _failed(task: str | None, all_failed: bool) -> JobFilter | None:
    return JobFilter(task=task, states=["failed"]) if task or all_failed else None


@jobs.command("retry")
@ids_argument
@task_option
@click.option("--all-failed", is_flag=True, help="Every failed job (of --task, if given).")
@dry_run_option
@yes_option
@pass_context
@handles_errors
def retry_command(
    ctx: Context,
    ids: tuple[int, ...],
    task: str | None,
    all_failed: bool,
    dry_run: bool,
    yes: bool,
) -> None:
    """Make failed jobs runnable now, with all their attempts again: by id (a failed job,
    or one waiting out its back-off), or the failed jobs of --task, or --all-failed."""
    where = _failed(task, all_failed)
    planner = _named_or_matching(admin.retry(), ids, where, "--task / --all-failed")
    _run(ctx, planner, confirm=where is not None, dry_run=dry_run, yes=yes)


@jobs.command("discard")
@ids_argument
@task_option
@click.option("--all-failed", is_flag=True, help="Every failed job (of --task, if given).")
@dry_run_option
@yes_option
@pass_context
@handles_errors
def discard_command(
    ctx: Context,
    ids: tuple[int, ...],
    task: str | None,
    all_failed: bool,
    dry_run: bool,
    yes: bool,
) -> None:
    """Delete failed jobs: by id, the failed jobs of --task, or --all-failed."""
    where = _failed(task, all_failed)
    planner = _named_or_matching(admin.discard(), ids, where, "--task / --all-failed")
    _run(ctx, planner, confirm=True, dry_run=dry_run, yes=yes)


@jobs.command("unlock")
@ids_argument
@click.option("--all-stranded", is_flag=True, help="Every stranded job with no call running.")
@dry_run_option
@yes_option
@pass_context
@handles_errors
def unlock_command(
    ctx: Context, ids: tuple[int, ...], all_stranded: bool, dry_run: bool, yes: bool
) -> None:
    """Release stranded locks (held past LQJOBS_JOB_EXPIRY, or by a bridge that is gone):
    the attempt is given back and the job runs again now."""
    where = JobFilter(states=["stranded"]) if all_stranded else None
    planner = _named_or_matching(
        admin.unlock(admin.judgement(ctx.settings)), ids, where, "--all-stranded"
    )
    _run(ctx, planner, confirm=all_stranded, dry_run=dry_run, yes=yes)


@jobs.command("cancel")
@ids_argument
@click.option("--task", help="Every pending (ready or delayed) job of this task.")
@click.option(
    "--park", is_flag=True, help="Keep the rows, failed, with last_error saying so, instead."
)
@dry_run_option
@yes_option
@pass_context
@handles_errors
def cancel_command(
    ctx: Context, ids: tuple[int, ...], task: str | None, park: bool, dry_run: bool, yes: bool
) -> None:
    """Stop jobs for good: a pending job is removed; a running one too, and its worker's
    outcome is dropped when its call ends (the call itself is not interrupted)."""
    where = JobFilter(task=task, states=["ready", "delayed"]) if task else None
    planner = _named_or_matching(admin.cancel(park), ids, where, "--task")
    _run(ctx, planner, confirm=True, dry_run=dry_run, yes=yes)


@jobs.command("purge")
@click.option("--failed", is_flag=True, required=True, help="Purge failed jobs (required).")
@click.option(
    "--older-than",
    callback=_age,
    metavar="AGE",
    required=True,
    help="Failed longer ago than this (7d, 12h, ...).",
)
@task_option
@dry_run_option
@yes_option
@pass_context
@handles_errors
def purge_command(
    ctx: Context,
    failed: bool,
    older_than: timedelta,
    task: str | None,
    dry_run: bool,
    yes: bool,
) -> None:
    """Delete failed jobs whose last change (the failure that parked them) is older
    than --older-than."""
    where = JobFilter(task=task, states=["failed"], updated_longer_ago=older_than)

    def planner(conn: Connection, jobs_db: JobsDB, judged: Judgement) -> admin.Plan:
        return admin.plan_matching(conn, jobs_db, admin.purge(), where, judged)

    _run(ctx, planner, confirm=True, dry_run=dry_run, yes=yes)
