"""The lease that fences every execution: what get_job handed out, exactly.

(job id, worker id, attempts, locked_at) identifies one attempt even across a
``release_jobs`` (which makes (id, attempts) repeat) or a lock that expired and
was re-taken. Every write on behalf of an attempt checks the row still holds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from lqjobs.models import JobRow


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
        """locked_at as integer microseconds since the epoch (exact, unlike floats)."""
        delta = self.locked_at - datetime.fromtimestamp(0, self.locked_at.tzinfo)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds

    def task_id(self) -> str:
        """The Celery task id: job id and attempt, plus the lock time that makes it unique."""
        return f"job-{self.job_id}-{self.attempts}-{self.locked_at_us:x}"

    def message_args(self, task_identifier: str, database_id: str) -> list[object]:
        return [
            self.job_id,
            self.worker_id,
            self.attempts,
            self.locked_at.isoformat(),
            task_identifier,
            database_id,
        ]

    def describe(self, database_id: str) -> str:
        """How Flower shows the message's arguments."""
        return f"job_id={self.job_id} attempt={self.attempts} database_id={database_id}"
