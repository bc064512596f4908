"""Scenario results, their verdicts, and the scoreboard table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tests.chaos.oracle import Tally


@dataclass
class Result:
    """What one run of a scenario measured."""

    tally: Tally
    faults: int
    recovery: float | None  # seconds from the last fault to quiescence; None: never
    checks: dict[str, bool] = field(default_factory=dict)  # scenario-specific assertions
    # what must hold for the run to mean anything (faults really injected, ...): a
    # negative control that misses one proves nothing, whatever else failed
    preconditions: dict[str, bool] = field(default_factory=dict)
    notes: str = ""
    # per component, the exits that neither the suite nor an injected fault asked for
    # (a crash the supervisor hid by restarting it); None: not watched
    exits: dict[str, int] | None = None


@dataclass(frozen=True)
class Bounds:
    """What a row must meet besides lost 0, overlapping 0, stranded 0."""

    duplicated: int = 0
    attempts_burned: int | None = 0  # None: reported, not judged
    recovery: float | None = None  # seconds
    exits: int | None = None  # components exiting on their own; None: reported, not judged


def failures(result: Result, bounds: Bounds) -> list[str]:
    """Why ``result`` fails its bounds; empty when it passes."""
    t = result.tally
    why = [f"not shown: {name}" for name, ok in result.preconditions.items() if not ok]
    why += [f"check failed: {name}" for name, ok in result.checks.items() if not ok]
    if t.overlapping:
        why.append(f"overlapping {t.overlapping}")
    if t.duplicated > bounds.duplicated:
        why.append(f"duplicated {t.duplicated} > {bounds.duplicated}")
    if t.stranded:
        why.append(f"stranded {t.stranded}")
    if t.lost:
        why.append(f"lost {t.lost} {t.lost_ids[:5]}")
    if bounds.attempts_burned is not None and t.attempts_burned > bounds.attempts_burned:
        why.append(f"attempts burned {t.attempts_burned} > {bounds.attempts_burned}")
    why += exit_failures(result, bounds)
    if result.recovery is None:
        why.append("no quiescence")
    elif bounds.recovery is not None and result.recovery > bounds.recovery:
        why.append(f"recovery {result.recovery:.1f}s > {bounds.recovery:g}s")
    return why


def exit_failures(result: Result, bounds: Bounds) -> list[str]:
    if bounds.exits is None:
        return []
    if result.exits is None:
        return ["exits not watched"]
    if sum(result.exits.values()) > bounds.exits:
        return [f"exited on its own: {exit_cell(result.exits)} > {bounds.exits}"]
    return []


def exit_cell(exits: dict[str, int] | None) -> str:
    if exits is None:
        return "-"
    return ", ".join(f"{name} {n}" for name, n in sorted(exits.items()) if n) or "0"


@dataclass
class Row:
    id: str
    title: str
    result: Result
    bounds: Bounds
    negative: Result | None = None  # the same scenario with its protection off
    negative_label: str = ""
    # what the oracle must see in the negative run (prefixes of ``failures``): the bug
    # the protection prevents, not just any breakage
    negative_shows: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.negative is not None and not self.negative_shows:
            raise ValueError(f"{self.id}: a negative control must name the failure it shows")

    @property
    def failures(self) -> list[str]:
        return failures(self.result, self.bounds)

    @property
    def negative_caught(self) -> bool | None:
        """True when the oracle saw the bug with the protection off."""
        if self.negative is None:
            return None
        if not all(self.negative.preconditions.values()):
            return False
        seen = failures(self.negative, self.bounds)
        return bool(seen) and all(
            any(why.startswith(expected) for why in seen) for expected in self.negative_shows
        )

    @property
    def passed(self) -> bool:
        return not self.failures and self.negative_caught is not False


COLUMNS = (
    "ID",
    "Scenario",
    "Jobs",
    "Faults",
    "Completed",
    "Lost",
    "Dup (overlap)",
    "Stranded",
    "Burned",
    "Exits",
    "Recovery s",
    "Neg. control failed?",
    "Pass",
    "Notes",
)


def cells(row: Row) -> tuple[str, ...]:
    r, t = row.result, row.result.tally
    recovery = "never" if r.recovery is None else f"{r.recovery:.1f}"
    if row.negative is None:
        negative = "-"
    elif row.negative_caught:
        seen = failures(row.negative, row.bounds)
        why = next((w for w in seen if w.startswith(row.negative_shows)), seen[0])
        negative = f"yes: {row.negative_label}: {why}"
    else:
        negative = f"NO: {row.negative_label} went unnoticed"
    completed = f"{t.completed}" + (f" +{t.parked} parked" if t.parked else "")
    return (
        row.id,
        row.title,
        str(t.jobs),
        str(r.faults),
        completed,
        str(t.lost),
        f"{t.duplicated} ({t.overlapping})",
        str(t.stranded),
        str(t.attempts_burned),
        exit_cell(r.exits),
        recovery,
        negative,
        "pass" if row.passed else "FAIL: " + "; ".join(row.failures or ["negative control"]),
        r.notes,
    )


def table(rows: list[Row]) -> str:
    lines = [cells(row) for row in rows]
    widths = [max(len(c[i]) for c in (COLUMNS, *lines)) for i in range(len(COLUMNS))]

    def fmt(values: tuple[str, ...]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(COLUMNS), rule, *(fmt(c) for c in lines)])


def summary(rows: list[Row], seed: int) -> str:
    passed = sum(row.passed for row in rows)
    tallies = [row.result.tally for row in rows]
    dup = sum(t.duplicated for t in tallies)
    return (
        f"reliability: {passed}/{len(rows)} pass · {sum(t.jobs for t in tallies):,} jobs · "
        f"{sum(row.result.faults for row in rows):,} faults · "
        f"lost {sum(t.lost for t in tallies)} · dup {dup} "
        f"(overlap {sum(t.overlapping for t in tallies)}) · "
        f"stranded {sum(t.stranded for t in tallies)} · "
        f"exits {sum(sum((row.result.exits or {}).values()) for row in rows)} · seed {seed}"
    )


Scenario = Callable[..., Row]
