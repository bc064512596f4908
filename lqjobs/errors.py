"""Every error lqjobs raises has one root, so callers can catch ``LqJobsError``."""

from __future__ import annotations


class LqJobsError(Exception):
    """Base of every lqjobs error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigurationError(LqJobsError):
    """The configuration is invalid."""


class DatabaseError(LqJobsError):
    """The database call failed."""

    def __init__(self, message: str | None = None, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class DatabaseUnavailable(DatabaseError):
    """The database could not be reached."""


class SchemaMissing(DatabaseError):
    """The app_jobs schema (or one of its functions) is not installed in this database."""


class InvalidWorkerId(DatabaseError):
    """get_job / get_scheduled_job was called without a worker id (INVALID_WORKER_ID)."""


class ExecutorError(LqJobsError):
    """Invoking the job's function failed."""

    def __init__(self, message: str | None = None, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable
