"""The chaos suite's judges: an overlap is an overlap, and a negative control counts
only when the bug itself was seen."""

from __future__ import annotations

from lqjobs.ops.function_calls import CallRecord
from tests.chaos.oracle import Tally, _overlaps
from tests.chaos.scoreboard import COLUMNS, Bounds, Result, Row, cells, failures


def call(started: float, ended: float, status: int = 200) -> CallRecord:
    return CallRecord("knative", "t", 1, 1, started, ended, status, {}, b"")


def test_overlapping_calls_are_found_even_behind_a_short_one() -> None:
    assert _overlaps([call(0, 1), call(2, 3)]) == 0
    assert _overlaps([call(0, 2), call(1, 3)]) == 1
    # the third call overlaps the first, not the second
    assert _overlaps([call(0, 10), call(1, 2), call(5, 6)]) == 1
    # a hang (status 0) was given up by its caller
    assert _overlaps([call(0, 0, status=0), call(1, 2)]) == 0


def test_bounds_fail_a_row_on_loss_overlap_stranding_and_excess_duplicates() -> None:
    clean = Result(Tally(jobs=10, completed=10), faults=1, recovery=1.0)
    assert failures(clean, Bounds()) == []
    for tally, why in (
        (Tally(lost=1), "lost"),
        (Tally(overlapping=1), "overlapping"),
        (Tally(stranded=1), "stranded"),
        (Tally(duplicated=3), "duplicated 3 > 2"),
    ):
        assert why in failures(Result(tally, 1, 1.0), Bounds(duplicated=2))[0]
    assert failures(Result(Tally(), 1, None), Bounds()) == ["no quiescence"]


def test_a_negative_control_counts_only_when_its_preconditions_held() -> None:
    ok = Result(Tally(jobs=1, completed=1), 1, 1.0)
    buggy = Result(Tally(jobs=1, overlapping=1), 1, 1.0)
    row = Row("R", "t", ok, Bounds(), buggy, "off", ("overlapping",))
    assert row.negative_caught is True and row.passed
    buggy.preconditions["faults injected"] = False
    assert row.negative_caught is False and not row.passed
    clean = Result(Tally(jobs=1, completed=1), 1, 1.0)
    unnoticed = Row("R", "t", ok, Bounds(), clean, "off", ("overlapping",))
    assert unnoticed.negative_caught is False and not unnoticed.passed


def test_a_negative_control_counts_only_when_it_shows_the_bug_it_names() -> None:
    # a control that breaks the run some other way (here: every job stranded by a
    # crash) proves nothing about the protection it switched off
    ok = Result(Tally(jobs=2, completed=2), 1, 1.0)
    crashed = Result(Tally(jobs=2, stranded=2), 1, None)
    row = Row("R", "t", ok, Bounds(), crashed, "no lease check", ("overlapping",))
    assert row.negative_caught is False and not row.passed
    overlapped = Result(Tally(jobs=2, completed=2, overlapping=1), 1, 1.0)
    row = Row("R", "t", ok, Bounds(), overlapped, "no lease check", ("overlapping",))
    assert row.negative_caught is True and row.passed
    both = ("check failed: a", "check failed: b")
    half = Result(Tally(jobs=1, completed=1), 1, 1.0, checks={"a": False, "b": True})
    assert Row("R", "t", ok, Bounds(), half, "off", both).negative_caught is False
    half.checks["b"] = False
    assert Row("R", "t", ok, Bounds(), half, "off", both).negative_caught is True


def test_a_component_exiting_on_its_own_fails_a_row_that_watches_exits() -> None:
    crashed = Result(Tally(jobs=1, completed=1), 1, 1.0, exits={"worker": 3})
    assert failures(crashed, Bounds()) == []  # reported, not judged
    assert failures(crashed, Bounds(exits=0)) == ["exited on its own: worker 3 > 0"]
    steady = Result(Tally(jobs=1, completed=1), 1, 1.0, exits={})
    assert failures(steady, Bounds(exits=0)) == []
    unwatched = Result(Tally(jobs=1, completed=1), 1, 1.0)
    assert failures(unwatched, Bounds(exits=0)) == ["exits not watched"]
    row = Row("R", "t", steady, Bounds(exits=0), crashed, "off", ("exited on its own",))
    assert row.negative_caught is True and row.passed
    assert cells(row)[COLUMNS.index("Exits")] == "0"
    assert cells(Row("R", "t", crashed, Bounds(), None))[COLUMNS.index("Exits")] == "worker 3"
