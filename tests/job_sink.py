"""A job sink for scheduler tests: jobs of tasks named ``sink...`` are recorded and
deleted the moment they are inserted, as if a worker completed each one at once. So
the next tick never meets a pending job (ALREADY_SCHEDULED), and a duplicate tick
shows up as a second job in the same second."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

SINK_SQL = """
CREATE TABLE public.sunk_jobs (
  job_id     bigint PRIMARY KEY,
  task       text NOT NULL,
  created_at timestamptz NOT NULL
);
-- SECURITY DEFINER: the inserting role (a least-privilege scheduler) needs no grants here
CREATE FUNCTION public.sink_job() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
  INSERT INTO public.sunk_jobs VALUES (NEW.id, NEW.task_identifier, NEW.created_at);
  DELETE FROM app_jobs.jobs WHERE id = NEW.id;
  RETURN NULL;
END $$;
-- named to run after app_jobs' own AFTER INSERT triggers (queue count, NOTIFY)
CREATE TRIGGER zzz_sink_job AFTER INSERT ON app_jobs.jobs
  FOR EACH ROW WHEN (NEW.task_identifier LIKE 'sink%') EXECUTE FUNCTION public.sink_job();
"""


def install_sink(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SINK_SQL)


def sunk(conn: psycopg.Connection[Any], task: str) -> list[datetime]:
    """Creation times of the task's jobs, oldest first."""
    rows = conn.execute(
        "SELECT created_at FROM public.sunk_jobs WHERE task = %s ORDER BY created_at", [task]
    ).fetchall()
    return [row[0] for row in rows]


def whole_seconds(times: list[datetime]) -> list[int]:
    return [int(t.timestamp()) for t in times]
