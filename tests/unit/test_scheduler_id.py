"""The scheduler's stable id: LQJOBS_SCHEDULER_ID or scheduler-<HOSTNAME>, validated."""

from __future__ import annotations

import pytest

from lqjobs.errors import ConfigurationError
from lqjobs.scheduler.service import application_name, scheduler_id
from lqjobs.settings import Settings


def test_the_default_id_comes_from_the_hostname() -> None:
    assert scheduler_id(Settings(hostname="pod-7")) == "scheduler-pod-7"


def test_an_explicit_id_wins() -> None:
    settings = Settings(hostname="pod-7", scheduler_id="sched:a.b_c-1")
    assert scheduler_id(settings) == "sched:a.b_c-1"


@pytest.mark.parametrize("bad", ["abc", "with space", "crlf\r\nX-Injected: 1", "x" * 129, ""])
def test_a_bad_id_is_refused_naming_the_variable(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid LQJOBS_SCHEDULER_ID"):
        scheduler_id(Settings(hostname="pod-7", scheduler_id=bad))


def test_a_bad_hostname_is_refused_naming_it() -> None:
    with pytest.raises(ConfigurationError, match="invalid HOSTNAME"):
        scheduler_id(Settings(hostname="pod\nx"))


def test_the_application_name_fits_postgres_limit() -> None:
    assert application_name("scheduler-pod-7") == "lqjobs-scheduler:scheduler-pod-7"
    assert len(application_name("x" * 128)) == 63
