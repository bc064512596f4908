"""The short bench CI runs, ``python -m bench --quick --postgres both``, measures
every row on the stock server and on the embedded one: the table has a column for
each, with a number in every cell, and names each server's JIT and durability
settings at the top. How fast anything is is not checked here: the figures live
in the bench's table, not in timed tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lqjobs.ops.embedded import system_postgres_bin_dir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
NUMBER = re.compile(r"^\s*-?\d+\.\d+ ")
ROWS_THE_ISSUE_NEEDS = (
    "idle queue: add_job -> function called, p50",
    "idle queue: add_job -> function called, p99",
    "  idle queue: Postgres CPU per job",
    "  no-op e2e CPU per job: postgres",
)


def run_quick_bench() -> str:
    if system_postgres_bin_dir() is None and not os.environ.get("CI"):
        pytest.skip("no system PostgreSQL (apt-get install postgresql); CI runs this test")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--postgres", "both"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def table_cells(lines: list[str]) -> dict[str, list[str]]:
    """Each row's label (figure and unit) and its cells, one per server."""
    start = next(i for i, line in enumerate(lines) if line.startswith("figure "))
    rows = [line.split(" | ") for line in lines[start + 2 :]]
    return {row[0].rstrip(): row[1:] for row in rows}


def test_the_quick_bench_measures_every_row_on_both_servers() -> None:
    lines = run_quick_bench().splitlines()
    described = [line for line in lines if line.startswith(("stock ", "embedded "))]
    assert [line.split()[0] for line in described] == ["stock", "embedded"], lines[:4]
    for line in described:
        for setting in ("jit ", "pg_jit_available() ", "fsync on", "synchronous_commit "):
            assert setting in line, line
    header = next(line for line in lines if line.startswith("figure "))
    assert [cell.split()[0] for cell in header.split(" | ")[1:]] == ["stock", "embedded"]
    cells = table_cells(lines)
    for needed in ROWS_THE_ISSUE_NEEDS:
        assert any(label.startswith(f"{needed} ") for label in cells), f"no {needed!r}: {cells}"
    for label, row in cells.items():
        assert len(row) == 2 and all(NUMBER.match(cell) for cell in row), f"{label}: {row}"
