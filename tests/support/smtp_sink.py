"""Postfix's smtp-sink, a fast C SMTP server that discards mail, as an MX for benchmarks.

It only counts: with ``-c`` it writes ``sess=N quit=N mesg=N`` to stdout, each update ending
in a carriage return, whenever a session ends, QUIT is run or a message's "." arrives. A reader
thread parses that stream so :meth:`PostfixSmtpSink.wait_for` needs no polling. For exact,
per-message assertions use :class:`tests.support.sink.RecordingSink` instead.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from .ports import free_port
from .started import Started, end_process

SMTP_SINK = Path("/usr/sbin/smtp-sink")

_COUNTERS = re.compile(rb"sess=(\d+) quit=(\d+) mesg=(\d+)")
_TCP_LISTEN = "0A"


def _listening_inodes(host: str, port: int) -> set[str]:
    """Socket inodes listening on IPv4 ``host:port``, read from /proc/net/tcp."""
    # /proc prints the address as the in-memory 32-bit word, i.e. in host byte order.
    (word,) = struct.unpack("=I", socket.inet_aton(host))
    local = f"{word:08X}:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == _TCP_LISTEN:
            inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


class PostfixSmtpSink(Started):
    """``smtp-sink -c`` listening on an IPv4 loopback ``host:port`` (``port=0`` picks one).

    ``options`` are extra smtp-sink flags, e.g. ``["-w", "1"]`` to delay DATA replies or
    ``["-r", "RCPT"]`` for soft rejects (see ``man smtp-sink``). As root smtp-sink refuses to
    run without ``-u``, so it is given ``-u user`` then (``nobody`` unless told otherwise).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        options: Sequence[str] = (),
        *,
        backlog: int = 256,
        user: str = "nobody",
        start_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.options = list(options)
        self.backlog = backlog
        self.user = user
        self.start_timeout = start_timeout
        self._cond = threading.Condition()
        self._sessions = 0
        self._quits = 0
        self._messages = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def messages(self) -> int:
        """Messages received (smtp-sink's ``mesg`` counter)."""
        with self._cond:
            return self._messages

    @property
    def sessions(self) -> int:
        """Sessions that have ended (smtp-sink's ``sess`` counter)."""
        with self._cond:
            return self._sessions

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` messages were received; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._messages >= count, timeout)

    def _read_counters(self, stream: IO[bytes]) -> None:
        # Updates end in "\r", so read raw chunks rather than lines.
        buffer = b""
        while chunk := os.read(stream.fileno(), 4096):
            buffer += chunk
            *updates, buffer = buffer.split(b"\r")
            for update in reversed(updates):
                match = _COUNTERS.search(update)
                if match:
                    with self._cond:
                        self._sessions, self._quits, self._messages = map(int, match.groups())
                        self._cond.notify_all()
                    break

    def start(self) -> None:
        """Start smtp-sink and return once its socket is listening."""
        if self._proc is not None:
            raise RuntimeError("PostfixSmtpSink already started")
        if self.port == 0:
            self.port = free_port(self.host)
        argv = [str(SMTP_SINK), "-c"]
        if os.geteuid() == 0:
            argv += ["-u", self.user]
        argv += [*self.options, f"{self.host}:{self.port}", str(self.backlog)]
        with self._cond:
            self._sessions = self._quits = self._messages = 0
        # Kept open while the process runs and closed in stop().
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
        )
        assert self._proc.stdout is not None
        self._reader = threading.Thread(
            target=self._read_counters,
            args=(self._proc.stdout,),
            daemon=True,
            name=f"smtp-sink-{self.port}",
        )
        self._reader.start()
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        # smtp-sink prints nothing when ready, and a probe connection would show up in its
        # counters, so look for a listening socket that belongs to this very process.
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                listening = _listening_inodes(self.host, self.port)
                if listening and listening & _socket_inodes(self._proc.pid):
                    return
            except FileNotFoundError:
                pass  # the process is gone; reported below
            try:
                # Doubles as the pause between checks and the check that it has not died.
                code = self._proc.wait(timeout=0.01)
            except subprocess.TimeoutExpired:
                pass
            else:
                raise RuntimeError(f"smtp-sink exited with {code}: {self._stderr_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"smtp-sink not listening after {self.start_timeout}s")

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def stop(self) -> None:
        """Terminate the smtp-sink this object started (by its pid) and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None:
            end_process(proc, 5)
            if self._reader is not None:
                self._reader.join(timeout=5)
                self._reader = None
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
