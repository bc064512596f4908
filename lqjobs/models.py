"""Rows of the app_jobs tables, as the typed DB boundary returns them."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict


class JobRow(BaseModel):
    """One row of ``app_jobs.jobs``.

    ``payload`` is the JSON text exactly as stored (the column is ``json``, not
    ``jsonb``): it is forwarded to functions byte for byte and never re-encoded.
    """

    model_config = ConfigDict(frozen=True)

    id: int
    database_id: UUID
    queue_name: str | None
    task_identifier: str
    payload: str
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    key: str | None
    last_error: str | None
    locked_at: datetime | None
    locked_by: str | None
    # NULL in rows queued before the upstream extension added these columns.
    created_at: datetime | None
    updated_at: datetime | None

    def payload_value(self) -> Any:
        return json.loads(self.payload)


class JobView(BaseModel):
    """One job as ``lqjobs jobs`` shows it: the row (the payload only when asked for),
    its state, and what the database knows of its lock's holder."""

    model_config = ConfigDict(frozen=True)

    id: int
    database_id: UUID
    queue_name: str | None
    task_identifier: str
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    key: str | None
    last_error: str | None
    locked_at: datetime | None
    locked_by: str | None
    created_at: datetime | None
    updated_at: datetime | None
    state: str  # ready | delayed | locked | stranded | failed (docs/operating.md)
    lease_age_seconds: float | None  # by the database's clock; None when unlocked
    holder_connected: bool | None  # a session announces the holder; None when unlocked
    call_running: bool | None  # a session holds the job's advisory lock; None when unlocked
    payload: str | None = None


class ScheduledJobRow(BaseModel):
    """One row of ``app_jobs.scheduled_jobs``; ``payload`` and ``schedule_info`` as JSON text."""

    model_config = ConfigDict(frozen=True)

    id: int
    database_id: UUID
    queue_name: str | None
    task_identifier: str
    payload: str
    priority: int
    max_attempts: int
    key: str | None
    locked_at: datetime | None
    locked_by: str | None
    schedule_info: str
    last_scheduled: datetime | None
    last_scheduled_id: int | None

    def schedule_value(self) -> Any:
        return json.loads(self.schedule_info)


class ScheduledJobStatus(BaseModel):
    """One scheduled job as ``lqjobs schedules`` judges it (no payload)."""

    model_config = ConfigDict(frozen=True)

    id: int
    task_identifier: str
    schedule_info: str
    locked_by: str | None
    locked_at: datetime | None
    last_scheduled: datetime | None
    last_scheduled_id: int | None
    last_job_failed_permanently: bool  # the last job exists with attempts used up, unlocked
    holder_connected: bool | None  # None when not held
    held_seconds: float | None


class TaskStatus(BaseModel):
    """Counts of one task identifier's jobs, for ``lqjobs status``."""

    task_identifier: str
    ready: int
    delayed: int
    locked: int
    locked_last_attempt: int  # of the locked: a failure (or an expired lease) parks them
    failed_permanently: int
    oldest_ready_age_seconds: float | None


class AlreadyScheduled:
    """run_scheduled_job raised ALREADY_SCHEDULED: the previous job is still pending."""

    def __repr__(self) -> str:
        return "ALREADY_SCHEDULED"


ALREADY_SCHEDULED = AlreadyScheduled()
