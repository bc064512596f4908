"""S-ROLE, S-LOG: least-privilege roles, and no secret in any log."""

from __future__ import annotations

import psycopg

from tests.chaos.cluster import TENANT, WORKER_OPTIONS, Cluster
from tests.chaos.oracle import Tally
from tests.chaos.scenarios.common import (
    Scale,
    finish,
)
from tests.chaos.scoreboard import Bounds, Result, Row

# -- S-ROLE, S-LOG: least privilege and redaction -------------------------------------

DENIED = {
    "CREATE TABLE in app_jobs": "CREATE TABLE app_jobs.chaos_probe (id int)",
    "CREATE TABLE in public": "CREATE TABLE public.chaos_probe (id int)",
    "TRUNCATE jobs": "TRUNCATE app_jobs.jobs",
    "ALTER TABLE jobs": "ALTER TABLE app_jobs.jobs ADD COLUMN chaos_probe int",
    "DROP FUNCTION": "DROP FUNCTION app_jobs.add_job",
    "SELECT another schema": "SELECT * FROM private.secrets",
    "release_jobs": "SELECT app_jobs.release_jobs('bridge-x-1')",
}


def s_role(cluster: Cluster, scale: Scale) -> Row:
    """Every protected run above connected its components as ``lqjobs grant`` logins;
    here each login tries what none may do."""
    denied = allowed = 0
    with cluster.run("S-ROLE") as run:
        run.sql("CREATE SCHEMA private; CREATE TABLE private.secrets AS SELECT 1 AS s")
        for component, url in run.role_urls.items():
            for what, statement in DENIED.items():
                try:
                    with psycopg.connect(url, autocommit=True) as conn:
                        conn.execute(statement)  # type: ignore[arg-type]
                    allowed += 1
                    print(f"S-ROLE: {component} was allowed: {what}", flush=True)
                except psycopg.errors.InsufficientPrivilege:
                    denied += 1
        superusers = run.sql(
            "SELECT count(*) FROM pg_roles WHERE rolname = ANY(%s) AND (rolsuper OR rolcreaterole "
            "OR rolcreatedb OR rolbypassrls)",
            [[run.user(c) for c in run.role_urls]],
        )
    result = Result(Tally(), 0, 0.0, notes=f"denied x{denied}")
    result.checks["every forbidden statement denied (42501)"] = allowed == 0 and denied > 0
    result.checks["no login is superuser or may create roles"] = superusers[0][0] == 0
    result.checks["protected runs used least-privilege logins"] = cluster.least_privilege_runs > 0
    result.notes += f"; {cluster.least_privilege_runs} runs under least privilege"
    return Row("S-ROLE", "S6 least-privilege roles", result, Bounds(attempts_burned=None))


CANARY = "CANARY"


def s_log(cluster: Cluster, scale: Scale) -> Row:
    """A run at DEBUG with canaries in every payload, then a grep of every component
    log of the whole chaos run (the callback key and the database password of every
    run are canaries too)."""
    debug = {"LQJOBS_LOG_LEVEL": "DEBUG", "LQJOBS_TASK_EXECUTORS": '{"asyncfn": "openfaas-async"}'}
    with cluster.run("S-LOG", settings=debug) as run:
        secret = {"token": f"{CANARY}-3"}
        ids = run.add_jobs("noop", [secret] * 20)
        ids += run.add_jobs("asyncfn", [secret] * 10)
        ids += run.add_jobs("failing", [secret | {"status": 400}] * 5)
        with psycopg.connect(run.db_url, autocommit=True) as conn:
            run.jobs_db.scheduled.add_scheduled_job(
                conn, TENANT, "ticker", secret, {"rule": "*/1 * * * * *"}
            )
        worker_options = (*WORKER_OPTIONS, "--loglevel", "DEBUG", "--hostname", "worker@%h")
        run.spawn("worker", "worker", *worker_options)
        run.spawn("bridge")
        run.spawn("callback")
        run.spawn("scheduler", LQJOBS_SCHEDULER_ID="chaos-scheduler")
        result = finish(run, ids, [], stall=15, expect_parked=ids[30:])
        calls = (run.logs / "calls.jsonl").read_text()
    logs = [
        path
        for path in (cluster.root / "logs").rglob("*.log")
        if path.name.split(".")[0].split("-")[0] in ("bridge", "worker", "callback", "scheduler")
    ]
    leaks = [str(path.relative_to(cluster.root)) for path in logs if CANARY in path.read_text()]
    result.preconditions["payload canaries reached the functions (the grep can find them)"] = (
        f"{CANARY}-3" in calls and "token=" in calls
    )
    result.checks[f"no component log shows a canary ({len(logs)} logs)"] = not leaks
    result.notes = f"{len(logs)} logs, {len(leaks)} with a canary {leaks[:3]}"
    result.tally = Tally(
        jobs=len(ids), completed=result.tally.completed, parked=result.tally.parked
    )
    return Row(
        "S-LOG", "S4 canary grep over every log, DEBUG", result, Bounds(attempts_burned=None)
    )
