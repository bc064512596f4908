"""``python -m tests.chaos``: every scenario, the scoreboard, one summary line.

Options: ``--seed N`` (default: random, printed), ``--quick`` (the pytest subset at
a quarter of the size), ``--only R01,R04``, ``--scale F``, ``--keep DIR`` (keep logs).
Exit status 0 only when every row passes and every negative control failed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.chaos.cluster import LADDER, ROOT, Cluster
from tests.chaos.scenarios import QUICK, SCENARIOS, Scale
from tests.chaos.scoreboard import Row, summary, table


def run_scenarios(
    ids: list[str], seed: int, scale: Scale, workdir: Path, report: bool = True
) -> list[Row]:
    cluster = Cluster(workdir, seed).start()
    rows = []
    try:
        for scenario_id in ids:
            started = time.monotonic()
            row = SCENARIOS[scenario_id](cluster, scale)
            rows.append(row)
            if report:
                verdict = "pass" if row.passed else "FAIL " + "; ".join(row.failures)
                print(
                    f"{row.id} {row.title}: {verdict} ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
    finally:
        cluster.stop()
    return rows


def header(seed: int) -> str:
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    ladder = ", ".join(f"{k.removeprefix('LQJOBS_')}={v}" for k, v in LADDER.items())
    return f"chaos run: git {sha or '?'} · seed {seed} · {ladder}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="")
    parser.add_argument("--scale", type=float, default=None)
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(10_000)
    ids = [i.strip() for i in args.only.split(",") if i.strip()] or (
        list(QUICK) if args.quick else list(SCENARIOS)
    )
    unknown = [i for i in ids if i not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    scale = Scale(args.scale if args.scale is not None else (0.25 if args.quick else 1.0))
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="lqjobs-chaos-"))
    print(header(seed), flush=True)
    rows = run_scenarios(ids, seed, scale, workdir)
    print()
    print(table(rows))
    print()
    print(summary(rows, seed))
    if args.keep is None:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs: {workdir / 'logs'}")
    return 0 if all(row.passed for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
