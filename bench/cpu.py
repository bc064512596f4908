"""Where the CPU went: seconds of CPU per component, read from /proc.

A component is a process tree (Postgres is its postmaster plus every backend,
live or already reaped), so the figures add up to what the machine spent.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # Fields after the command name, which may itself hold spaces or parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children.setdefault(parent, []).append(int(entry.name))
    return children


def tree_seconds(
    pid: int, children: Mapping[int, list[int]] | None = None, skip: Collection[int] = ()
) -> float:
    """CPU seconds of a process, its reaped children and its live descendants but
    those in ``skip`` (and theirs)."""
    children = _children_by_parent() if children is None else children
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime (fields 14-17 of proc(5), 0-based 11-14 here)
    total = sum(int(value) for value in fields[11:15]) / TICKS
    kept = [child for child in children.get(pid, []) if child not in skip]
    return total + sum(tree_seconds(child, children, skip) for child in kept)


def snapshot(
    pids: Mapping[str, list[int]], client_backends: Collection[int] = ()
) -> dict[str, float]:
    """CPU seconds so far of each named group of process trees, plus this process's:
    the bench client, with ``client_backends`` (the Postgres backends serving its
    polls, counted as the client's, not as Postgres')."""
    children = _children_by_parent()
    seconds = {
        name: sum(tree_seconds(pid, children, client_backends) for pid in group)
        for name, group in pids.items()
    }
    own = os.times()
    polls = sum(tree_seconds(pid, children) for pid in client_backends)
    seconds["bench client"] = own.user + own.system + polls
    return seconds


def per_job_ms(
    before: Mapping[str, float], after: Mapping[str, float], jobs: int
) -> dict[str, float]:
    return {name: (after[name] - before[name]) / jobs * 1000 for name in before}
