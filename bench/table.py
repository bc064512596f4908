"""The bench's table: one row per figure, one column per server measured.

A cell is the median of the runs, their min-max, and for a rate its ratio to the
SQL limit (8 connections) measured on the same server in the same run.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

LABEL_WIDTH = 44
UNIT_WIDTH = 7
CELL_WIDTH = 36
MISSING = "n/a"


@dataclass(frozen=True)
class Figure:
    """One row's measurements on one server: ``values`` holds one per run, or none
    when the server could not be measured (its CPU, on another machine)."""

    label: str
    unit: str
    values: Sequence[float]
    vs_limit: bool = False  # a rate, shown against the SQL limit
    note: str = ""  # shown instead of the min-max


@dataclass(frozen=True)
class Column:
    """A server's figures, under ``heading``; ``limit``: its SQL limit, jobs/s."""

    heading: str
    figures: Sequence[Figure]
    limit: float


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def cell(figure: Figure | None, limit: float) -> str:
    if figure is None or not figure.values:
        return f"{MISSING:>9}".ljust(CELL_WIDTH)
    med = median(figure.values)
    digits = 2 if abs(med) < 10 else 1  # CPU per job is a fraction of a millisecond
    spread = figure.note or (f"({min(figure.values):.{digits}f}-{max(figure.values):.{digits}f})")
    ratio = f"{med / limit:5.2f}x" if figure.vs_limit and limit else ""
    return f"{med:9.{digits}f} {spread:<16} {ratio:>9}"


def labels(columns: Sequence[Column]) -> list[tuple[str, str]]:
    """Every row's label and unit, in the order the first column to have it lists it."""
    seen: dict[str, str] = {}
    for column in columns:
        for figure in column.figures:
            seen.setdefault(figure.label, figure.unit)
    return list(seen.items())


def render(columns: Sequence[Column]) -> list[str]:
    """The table's lines, a header then one line per figure."""
    lead = f"{'figure':<{LABEL_WIDTH}} {'unit':<{UNIT_WIDTH}}"
    lines = [
        " | ".join([lead, *(f"{c.heading:^{CELL_WIDTH}}" for c in columns)]),
        " | ".join(
            [
                " " * len(lead),
                *(f"{'median':>9} {'(min-max)':<16} {'vs SQL x8':>9}" for _ in columns),
            ]
        ),
    ]
    by_label = [({figure.label: figure for figure in c.figures}, c.limit) for c in columns]
    for label, unit in labels(columns):
        cells = [cell(figures.get(label), limit) for figures, limit in by_label]
        lines.append(" | ".join([f"{label:<{LABEL_WIDTH}} {unit:<{UNIT_WIDTH}}", *cells]))
    return [line.rstrip() for line in lines]
