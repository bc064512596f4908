"""The lease that fences every execution, and its one codec.

(job id, worker id, attempts, locked_at) identifies one attempt even across a
``release_jobs`` (which makes (id, attempts) repeat) or a lock that expired and
was re-taken. Every write on behalf of an attempt checks the row still holds it.

A lease travels in three forms, all made and read here: the Celery message's
arguments (:meth:`Lease.message_args` / :meth:`Lease.from_message`), the Celery
task id, and the compact ``job|worker|attempts|locked_at_us`` text that the
deferred-callback deadlines and the callback tokens carry (:meth:`Lease.encode` /
:meth:`Lease.decode`; worker ids never contain ``|``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from lqjobs.models import JobRow

TASK_NAME = "lqjobs.run_job"  # the Celery task every lease is published to
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(moment: datetime) -> int:
    """``moment`` as integer microseconds since the epoch (exact, unlike floats)."""
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@dataclass(frozen=True)
class Lease:
    job_id: int
    worker_id: str
    attempts: int
    locked_at: datetime

    @classmethod
    def of(cls, job: JobRow) -> Lease:
        if job.locked_by is None or job.locked_at is None:
            raise ValueError(f"job {job.id} is not locked")
        return cls(job.id, job.locked_by, job.attempts, job.locked_at)

    def held_by(self, job: JobRow) -> bool:
        return (
            job.id == self.job_id
            and job.locked_by == self.worker_id
            and job.attempts == self.attempts
            and job.locked_at == self.locked_at
        )

    @property
    def locked_at_us(self) -> int:
        """locked_at as integer microseconds since the epoch."""
        return to_micros(self.locked_at)

    def task_id(self) -> str:
        """The Celery task id: job id and attempt, plus the lock time that makes it unique."""
        return f"job-{self.job_id}-{self.attempts}-{self.locked_at_us:x}"

    def encode(self) -> str:
        """The compact text form: ``job|worker|attempts|locked_at_us``."""
        return f"{self.job_id}|{self.worker_id}|{self.attempts}|{self.locked_at_us}"

    @classmethod
    def decode(cls, text: bytes | str) -> Lease | None:
        """The lease :meth:`encode` wrote, or None for any other text."""
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        try:
            job_id, worker_id, attempts, locked_us = text.split("|")
            locked_at = EPOCH + timedelta(microseconds=int(locked_us))
            return cls(int(job_id), worker_id, int(attempts), locked_at)
        except ValueError:
            return None

    def message_args(self, task_identifier: str, database_id: str) -> list[object]:
        """The Celery message's positional arguments (see :meth:`from_message`)."""
        return [
            self.job_id,
            self.worker_id,
            self.attempts,
            self.locked_at.isoformat(),
            task_identifier,
            database_id,
        ]

    @classmethod
    def from_message(cls, job_id: int, worker_id: str, attempts: int, locked_at: str) -> Lease:
        """The lease of a message built by :meth:`message_args`."""
        return cls(job_id, worker_id, attempts, datetime.fromisoformat(locked_at))

    def describe(self, database_id: str) -> str:
        """How Flower shows the message's arguments."""
        return f"job_id={self.job_id} attempt={self.attempts} database_id={database_id}"
