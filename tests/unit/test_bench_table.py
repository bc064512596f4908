"""The bench's table and its server axis, without starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import servers
from bench.__main__ import QUICK, Plan, parse_args, plan_from
from bench.table import Column, Figure, render


def two_servers() -> list[Column]:
    stock = Column(
        "stock 15",
        [
            Figure("SQL limit", "jobs/s", [900.0, 1000.0, 1100.0], vs_limit=True),
            Figure("postgres CPU per job", "ms", [1.5]),
        ],
        limit=1000.0,
    )
    remote = Column(
        "url 16",
        [
            Figure("SQL limit", "jobs/s", [400.0], vs_limit=True),
            Figure("postgres CPU per job", "ms", []),  # on another machine: not measured
        ],
        limit=400.0,
    )
    return [stock, remote]


def test_each_server_has_a_column_and_its_rates_are_against_its_own_limit() -> None:
    header, _, limit_row, cpu_row = render(two_servers())
    assert "stock 15" in header and "url 16" in header
    stock_cell, remote_cell = limit_row.split(" | ")[1:]
    assert stock_cell.split() == ["1000.0", "(900.0-1100.0)", "1.00x"]
    assert remote_cell.split() == ["400.0", "(400.0-400.0)", "1.00x"]
    stock_cpu, remote_cpu = cpu_row.split(" | ")[1:]
    assert stock_cpu.split() == ["1.50", "(1.50-1.50)"]  # no ratio: not a rate
    assert remote_cpu.strip() == "n/a"


def test_quick_sizes_give_way_to_the_ones_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.argv", ["bench", "--quick", "--jobs", "1234"])
    plan = plan_from(parse_args())
    assert plan.jobs == 1234 and plan.runs == QUICK.runs == 1
    monkeypatch.setattr("sys.argv", ["bench"])
    assert plan_from(parse_args()) == Plan()


def test_no_choice_falls_back_to_embedded_only_where_no_system_postgres_is_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(servers, "system_postgres_bin_dir", lambda: None)
    assert servers.chosen(None) == ["embedded"]
    assert "no system PostgreSQL" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no system PostgreSQL"):
        servers.chosen("both")  # asked for by name: an error, not a fallback
    monkeypatch.setattr(servers, "system_postgres_bin_dir", lambda: Path("/usr/lib/pg/15/bin"))
    assert servers.chosen(None) == ["stock"]
    assert servers.chosen("both") == ["stock", "embedded"]
    assert servers.chosen("postgresql://u@db/x") == ["postgresql://u@db/x"]
