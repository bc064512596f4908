"""The chaos agent's patches still fit the code they replace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.agent import SABOTAGE, replace

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(SABOTAGE))
def test_each_sabotage_installs_against_the_current_code(name: str) -> None:
    # in a child process: the patches are process-wide and must not leak into this one
    script = (
        "from tests.chaos.agent import SABOTAGE, install_fault;"
        f"SABOTAGE[{name!r}]();"
        "install_fault('bridge.after_publish:0', '1')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]


class Settle:
    def fenced_fail(self, conn: object, lease: object, error_message: str) -> bool:
        return True


def test_a_patch_whose_parameters_drifted_is_refused() -> None:
    def drifted(self: object, conn: object, lease: object) -> bool:  # lost error_message
        return True

    with pytest.raises(TypeError, match="fenced_fail"):
        replace(Settle, "fenced_fail", drifted)

    def fits(self: object, conn: object, lease: object, error_message: str) -> bool:
        return False

    replace(Settle, "fenced_fail", fits)
    assert Settle().fenced_fail(None, None, "x") is False
