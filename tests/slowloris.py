"""Slow clients for the callback service's tests and the chaos suite's R19.

:class:`SlowClients` holds many connections to one port from one thread, each sending
a request that never ends one byte per ``interval``, and records when the server
closed each. Bounded in count and time: it stops by itself after ``lifetime``.
:func:`server_connections` and :func:`thread_count` read what the kernel says the
server holds.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_PREFIX = b"POST /callback?token=CANARY-slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # never logged
_BODY_LENGTH = 60_000  # under the 64 KiB cap: the server waits for it
_HELD_STATES = ("01", "08")  # ESTABLISHED, CLOSE_WAIT (the client closed, the server not)


def request_chunks(head_ticks: int | None) -> Iterator[bytes]:
    """What one slow client sends, a chunk per tick. ``None``: a head that never ends;
    else the head ends after ``head_ticks`` ticks and the body trickles after it."""
    yield _PREFIX + f"Content-Length: {_BODY_LENGTH}\r\nX-Pad: ".encode()
    ticks = 0
    while head_ticks is None or ticks < head_ticks:
        ticks += 1
        yield b"a"
    yield b"\r\n\r\n"
    for _ in range(_BODY_LENGTH):
        yield b"x"


@dataclass
class SlowConnection:
    sock: socket.socket
    chunks: Iterator[bytes]
    opened: float
    next_at: float
    closed: float | None = None  # when the server closed it (end of stream or reset)
    sent: int = 0  # chunks sent
    in_body: bool = False  # its head is complete: it trickles the body
    reply: bytes = b""

    @property
    def lifetime(self) -> float:
        return (self.closed or time.monotonic()) - self.opened


@dataclass
class SlowClients:
    """``count`` slow connections to ``host:port``; ``reconnect`` replaces each one the
    server closes (after ``interval``), as a persistent attacker would."""

    host: str
    port: int
    count: int
    interval: float = 1.0
    lifetime: float = 60.0
    reconnect: bool = False
    head_ticks: tuple[int | None, ...] = (None,)  # cycled over the connections
    connections: list[SlowConnection] = field(default_factory=list)
    refused: int = 0  # connection attempts the listening socket refused

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, name="slow-clients", daemon=True)
        self._opened = 0

    def __enter__(self) -> SlowClients:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> SlowClients:
        """Connect every client (each has sent its first chunk on return), then trickle."""
        self._until = time.monotonic() + self.lifetime
        for _ in range(self.count):
            self._connect()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with self._lock:
            for conn in self.connections:
                conn.sock.close()
        self._selector.close()

    def snapshot(self) -> list[SlowConnection]:
        with self._lock:
            return list(self.connections)

    def open_count(self) -> int:
        return sum(c.closed is None for c in self.snapshot())

    def _connect(self) -> None:
        ticks = self.head_ticks[self._opened % len(self.head_ticks)]
        self._opened += 1
        try:
            sock = socket.create_connection((self.host, self.port), timeout=5)
        except OSError:
            with self._lock:
                self.refused += 1
            return
        sock.setblocking(False)
        now = time.monotonic()
        conn = SlowConnection(sock, request_chunks(ticks), now, now)
        with self._lock:
            self.connections.append(conn)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._send(conn, now)

    def _run(self) -> None:
        while not self._stop.is_set() and (now := time.monotonic()) < self._until:
            for conn in self.snapshot():
                if conn.closed is None and conn.next_at <= now:
                    self._send(conn, now)
            due = [c.next_at for c in self.snapshot() if c.closed is None]
            timeout = max(0.0, min(due, default=now + self.interval) - time.monotonic())
            for key, _ in self._selector.select(min(timeout, self.interval)):
                self._read(key.data)
            self._replace_closed()

    def _send(self, conn: SlowConnection, now: float) -> None:
        try:
            chunk = next(conn.chunks)
            conn.sock.send(chunk)
        except (OSError, StopIteration):
            self._closed(conn)
            return
        conn.sent += 1
        conn.in_body |= chunk.endswith(b"\r\n\r\n")
        conn.next_at = now + self.interval

    def _read(self, conn: SlowConnection) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            conn.reply += data
        else:
            self._closed(conn)

    def _closed(self, conn: SlowConnection) -> None:
        if conn.closed is None:
            conn.closed = time.monotonic()
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
            conn.sock.close()

    def _replace_closed(self) -> None:
        if not self.reconnect or self._stop.is_set():
            return
        now = time.monotonic()
        missing = self.count - self.open_count()
        recent = [c for c in self.snapshot() if c.closed and now - c.closed < self.interval]
        for _ in range(max(0, missing - len(recent))):
            self._connect()


def server_connections(port: int, pid: int | None = None) -> int:
    """TCP sockets of process ``pid`` (this one by default) whose local port is ``port``
    (the server's side), established or closed by the client but not yet by the
    server, as the kernel counts them."""
    return len(server_sockets(port, pid))


def server_sockets(port: int, pid: int | None = None) -> list[tuple[str, str]]:
    """(remote address, TCP state) of each socket :func:`server_connections` counts."""
    held = set()
    for fd in Path(f"/proc/{pid or os.getpid()}/fd").iterdir():
        with contextlib.suppress(OSError):
            held.add(os.readlink(fd))
    found = {}  # by inode: a table read while it changes may show an entry twice
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                ours = f"socket:[{fields[9]}]" in held
                if local_port == port and ours and fields[3] in _HELD_STATES:
                    found[fields[9]] = (fields[2], fields[3])
    return list(found.values())


def thread_count(pid: int | None = None) -> int:
    """The threads of process ``pid`` (this one by default), as the kernel counts them."""
    return len(os.listdir(f"/proc/{pid or os.getpid()}/task"))
