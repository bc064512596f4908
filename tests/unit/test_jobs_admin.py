"""The pure parts of ``lqjobs jobs``: ages, id lists, and the settle window."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from lqjobs.bridge.loop import APPLICATION_NAME_PREFIX, WORKER_ID_PATTERN, new_worker_id
from lqjobs.ops.jobs_admin import id_list, judgement, parse_age
from lqjobs.settings import Settings


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("6h", 21600), ("7d", 604800), ("2w", 1209600)],
)
def test_ages(text: str, seconds: float) -> None:
    assert parse_age(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "soon", "-1d", "7 days", "1y", "d"])
def test_what_is_not_an_age(text: str) -> None:
    with pytest.raises(ValueError, match="not an age"):
        parse_age(text)


def test_ids_as_ranges() -> None:
    assert id_list([]) == "-"
    assert id_list([7]) == "7"
    assert id_list([3, 1, 2, 7, 9, 10, 2]) == "1-3, 7, 9-10"


def test_the_settle_window_covers_a_live_delivery_and_never_passes_the_expiry() -> None:
    defaults = judgement(Settings())
    assert defaults.job_expiry == timedelta(seconds=600)
    # start window (180 + 120) + call bound (60 + 1): past it no delivery can settle.
    assert defaults.settle_window == timedelta(seconds=361)
    slow_callbacks = judgement(Settings(callback_deadline=500))
    assert slow_callbacks.settle_window == timedelta(seconds=500)
    assert judgement(Settings(job_expiry=300)).settle_window == timedelta(seconds=300)
    assert defaults.holder_prefix == APPLICATION_NAME_PREFIX


def test_every_bridge_id_is_one_the_judgement_reads_sessions_for() -> None:
    for host in ("h", "web-1", "x" * 40, "a.b_c-d"):
        assert re.fullmatch(WORKER_ID_PATTERN, new_worker_id(host))
    assert not re.fullmatch(WORKER_ID_PATTERN, "worker-0")
