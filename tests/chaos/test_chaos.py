"""The chaos suite's quick subset, inside the normal test command: each scenario at a
quarter of its full size, with its negative control. ``python -m tests.chaos`` runs
them all at full size and prints the scoreboard."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lqjobs.ops.embedded import system_postgres_bin_dir
from tests.chaos.cluster import Cluster
from tests.chaos.scenarios import QUICK, SCENARIOS, Scale
from tests.chaos.scoreboard import summary, table
from tests.databases import PostgresServer

pytestmark = pytest.mark.integration
SEED = int(os.environ.get("LQJOBS_CHAOS_SEED") or random.randrange(10_000))


@pytest.fixture(scope="module")
def cluster(postgres_server: PostgresServer) -> Iterator[Cluster]:
    """A cluster of its own (scenarios kill and restart its servers), built from the
    binaries of the session's server: embedded, or the system install."""
    # not under pytest's tmp dir: postgres runs as a non-root user who must reach it
    root = Path(tempfile.mkdtemp(prefix="lqjobs-chaos-"))
    bin_dir = system_postgres_bin_dir() if postgres_server.kind == "system" else None
    running = Cluster(root, SEED, postgres_bin_dir=bin_dir).start()
    yield running
    running.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenario", QUICK)
def test_scenario_passes_and_its_negative_control_fails(cluster: Cluster, scenario: str) -> None:
    row = SCENARIOS[scenario](cluster, Scale(0.25))
    report = f"{table([row])}\n{summary([row], SEED)} (LQJOBS_CHAOS_SEED={SEED} replays it)"
    assert not row.failures, report
    assert row.negative_caught is not False, report
