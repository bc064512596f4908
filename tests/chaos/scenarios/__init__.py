"""The chaos scenarios (docs/chaos.md; each row shows a failure mode of
docs/design.md): each runs once protected and, where a protection can be switched
off, once more without it (the negative control)."""

from __future__ import annotations

from collections.abc import Callable

from tests.chaos.cluster import Cluster
from tests.chaos.scenarios.callbacks import r09, r10, r11, r17
from tests.chaos.scenarios.clock import r14
from tests.chaos.scenarios.common import Scale
from tests.chaos.scenarios.field import r20, r21, r22, r23
from tests.chaos.scenarios.inputs import r12, r13
from tests.chaos.scenarios.processes import r01, r02, r03, r04, r05, r06, r07, r08, r15, r16
from tests.chaos.scenarios.rows import r24, r25
from tests.chaos.scenarios.security import s_log, s_role
from tests.chaos.scenarios.slowloris import r19
from tests.chaos.scenarios.trickle import r18
from tests.chaos.scoreboard import Row

SCENARIOS: dict[str, Callable[[Cluster, Scale], Row]] = {
    "R01": r01,
    "R02": r02,
    "R03": r03,
    "R04": r04,
    "R05": r05,
    "R06": r06,
    "R07": r07,
    "R08": r08,
    "R09": r09,
    "R10": r10,
    "R11": r11,
    "R12": r12,
    "R13": r13,
    "R14": r14,
    "R15": r15,
    "R16": r16,
    "R17": r17,
    "R18": r18,
    "R19": r19,
    "R20": r20,
    "R21": r21,
    "R22": r22,
    "R23": r23,
    "R24": r24,
    "R25": r25,
    "S-ROLE": s_role,
    "S-LOG": s_log,  # last: it greps the logs of every run before it
}
QUICK = ("R02", "R04", "R06", "R11", "R13")

__all__ = ["QUICK", "SCENARIOS", "Scale"]
