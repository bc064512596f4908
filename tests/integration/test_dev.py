"""`lqjobs dev` as a newcomer runs it: in a terminal, on a machine with no servers,
until the demo is done, then Ctrl-C."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest

from tests.processes import ROOT, environment

# Its subject does not depend on the Postgres server: it runs on the first one only.
pytestmark = [pytest.mark.integration, pytest.mark.one_postgres]


class Terminal:
    """A child process on a pseudo-terminal, its screen collected as text."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        # A session of its own with the pty as its controlling terminal, so that
        # Ctrl-C typed into the terminal becomes SIGINT, as it does for a person.
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.screen = ""

    def read_until(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            remaining = deadline - time.monotonic()
            exited = self.proc.poll() is not None
            if not self._read(min(max(remaining, 0), 0.5)) and (exited or remaining <= 0):
                raise AssertionError(f"{text!r} not shown within {timeout}s:\n{self.screen}")
        return self.screen

    def _read(self, timeout: float) -> bool:
        """Append what the terminal shows; False when nothing came within ``timeout``."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # the child closed the terminal and everything was read
            return False
        self.screen += chunk.decode(errors="replace")
        return bool(chunk)

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")  # the terminal turns it into SIGINT for the group

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        os.close(self.master)


def children_of(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-s", str(os.getsid(pid))], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def test_lqjobs_dev_runs_the_demo_and_stops_on_ctrl_c() -> None:
    # Reachable by the unprivileged Postgres user (pytest's tmp_path is not, as root).
    data_dir = Path(tempfile.mkdtemp(prefix="lqjobs-dev-test-")) / ".lqjobs"  # the default name
    data_dir.parent.chmod(0o755)
    env = {
        k: v
        for k, v in environment("", "").items()
        if k not in ("DATABASE_URL", "LQJOBS_BROKER_URL", "JOBS_SUPPORT_ANY")
    }
    terminal = Terminal(
        [sys.executable, "-m", "lqjobs", "dev", "--data-dir", str(data_dir), "--flower-port", "0"],
        env,
    )
    try:
        screen = terminal.read_until("all demo jobs done", timeout=90)
        assert "schema installed" in screen
        assert "Flower http://127.0.0.1:" in screen
        exports = data_dir / "env.sh"
        assert f"other terminals: . {exports}" in screen
        assert exports.stat().st_mode & 0o777 == 0o600  # it holds the callback keys
        second_terminal(env, data_dir.parent, exports)
        session = os.getsid(terminal.proc.pid)
        terminal.ctrl_c()
        assert terminal.proc.wait(60) == 0, terminal.screen
        terminal.read_until("stopped", timeout=5)
        leftovers = subprocess.run(
            ["pgrep", "-s", str(session)], capture_output=True, text=True
        ).stdout.split()
        assert leftovers == [], f"processes left behind: {leftovers}"
        assert not exports.exists()  # its addresses died with the stack
    finally:
        terminal.close()
    # A second run reuses the data: the schema is already there.
    again = Terminal(
        [
            sys.executable,
            "-m",
            "lqjobs",
            "dev",
            "--data-dir",
            str(data_dir),
            "--no-demo",
            "--flower-port",
            "0",
        ],
        env,
    )
    try:
        again.read_until("schema up to date", timeout=60)
        again.ctrl_c()
        assert again.proc.wait(60) == 0
    finally:
        again.close()


def second_terminal(env: dict[str, str], folder: Path, exports: Path) -> None:
    """`lqjobs status` from another terminal: without the exports, one error that names
    the address it tried and the file to source; with them, the demo's tasks."""
    status = [sys.executable, "-m", "lqjobs", "status"]
    bare = subprocess.run(status, env=env, cwd=folder, capture_output=True, text=True, timeout=60)
    assert bare.returncode == 4
    assert "cannot connect to" in bare.stderr and "port 5432" in bare.stderr, bare.stderr
    assert "run `. .lqjobs/env.sh` first" in bare.stderr
    exported = dict(
        shlex.split(line)[1].split("=", 1)
        for line in exports.read_text().splitlines()
        if line.startswith("export ")
    )
    assert set(exported) >= {"DATABASE_URL", "LQJOBS_BROKER_URL"}
    for command in ("status", "check"):
        pointed = subprocess.run(
            [sys.executable, "-m", "lqjobs", command],
            env=env | exported,
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert pointed.returncode == 0, pointed.stderr
    assert "has schema app_jobs" in pointed.stdout  # the dev stack's database
