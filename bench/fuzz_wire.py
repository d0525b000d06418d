"""Running one fuzz session on a raw socket: exact bytes out, every reply read, a transcript kept.

The client follows the server the way an SMTP server reads its input, so it knows when a reply is
due: in command mode every LF ends a line and each line gets one reply (a multi-line reply is one);
a 354 switches to data mode, where lines end at CRLF and the line ``.`` gets the one reply; a 220
to STARTTLS starts TLS. A reply that does not come within the deadline is a session that hangs
(``no_reply``); the server closing the connection ends the session (not a fault: 421, 221 and the
bogus-command limit all close). Writes and reads are interleaved through ``select`` so that a long
pipelined burst never deadlocks against the server's replies.

Every reply is also checked for text that must never reach a client: an exception's name
(``Error: (``), a traceback, a source path. Text the client itself sent is not counted, so an
echoed argument cannot make a false alarm.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from fuzz_grammar import Step

#: A transcript entry's data is cut to this many bytes (a 70 KB line is noted, not kept).
TRANSCRIPT_BYTES: Final = 2048
_LEAK: Final = re.compile(
    rb"Error: \(|Traceback|File \"|site-packages|\.py\b|\b(?:usr|home|tmp|var|opt|work|root|srv)/"
)

Outcome = Literal["done", "closed", "no_reply", "refused", "tls_failed"]


class _NoReplyError(Exception):
    """The deadline passed without the reply that was due."""


class _ClosedError(Exception):
    """The server closed the connection (or reset it)."""


@dataclass
class SessionResult:
    """What one session did and saw."""

    seed: int
    mutations: list[str]
    outcome: Outcome = "done"
    commands: int = 0
    replies: int = 0
    #: (seconds since the start, "C" or "S" or "-", bytes): what went each way, in order.
    transcript: list[tuple[float, str, bytes]] = field(default_factory=list)
    #: (line sent, reply) where the reply leaks internals (exception names, tracebacks, paths).
    leaks: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: (line sent, reply, rule): replies that break the protocol without leaking anything.
    violations: list[tuple[bytes, bytes, str]] = field(default_factory=list)
    #: For no_reply: the line whose reply never came.
    waiting_for: bytes = b""
    started: float = field(default_factory=time.monotonic)

    def note(self, direction: str, data: bytes) -> None:
        cut = data if len(data) <= TRANSCRIPT_BYTES else data[:TRANSCRIPT_BYTES]
        suffix = b"" if cut is data else b"... (%d bytes)" % len(data)
        self.transcript.append((round(time.monotonic() - self.started, 3), direction, cut + suffix))

    def text(self) -> str:
        """The transcript as lines of Python bytes literals (exact, replayable by eye)."""
        head = [
            f"# session {self.seed} ({self.seed:#x}) mutations={self.mutations}",
            f"# outcome={self.outcome} commands={self.commands} replies={self.replies}",
        ]
        if self.waiting_for:
            head.append(f"# no reply to: {self.waiting_for!r}")
        return "\n".join(head + [f"{at:8.3f} {d} {data!r}" for at, d, data in self.transcript])


def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the harness's self-signed certificate
    return context


class _Connection:
    """A non-blocking socket (plain or TLS) with an input buffer of what the server sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.inbuf = bytearray()
        self.closed: str | None = None  # why the server's side of the stream ended

    def _pump(self) -> None:
        """Read whatever is there now; note the end of the stream (replies before it count)."""
        while self.closed is None:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (ConnectionError, ssl.SSLError) as exc:
                self.closed = str(exc)
                return
            if not data:
                self.closed = "EOF"
                return
            self.inbuf += data

    def send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _NoReplyError(f"the server stopped reading, {len(view)} bytes unsent")
            readable, writable, _ = select.select([self.sock], [self.sock], [], remaining)
            if readable:
                self._pump()  # replies read now stay in the buffer, even if the server closed
            if writable:
                try:
                    sent = self.sock.send(view[:65536])
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                except (ConnectionError, ssl.SSLError) as exc:
                    raise _ClosedError(str(exc)) from exc
                view = view[sent:]

    def reply(self, deadline: float) -> bytes:
        """One whole reply (all its lines), waiting until ``deadline`` for it."""
        while True:
            end = self._reply_end()
            if end:
                reply = bytes(self.inbuf[:end])
                del self.inbuf[:end]
                return reply
            if self.closed is not None:
                raise _ClosedError(self.closed)
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if not pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _NoReplyError()
                readable, _, _ = select.select([self.sock], [], [], remaining)
                if not readable:
                    raise _NoReplyError()
            self._pump()

    def _reply_end(self) -> int:
        """The end of the first whole reply in the buffer, 0 when there is none yet."""
        start = 0
        while True:
            newline = self.inbuf.find(b"\n", start)
            if newline < 0:
                return 0
            line = self.inbuf[start:newline]
            start = newline + 1
            # "250-..." continues; anything else (also garbage) ends the reply.
            if not (len(line) >= 4 and line[:3].isdigit() and line[3:4] == b"-"):
                return start


class Session:
    """Runs steps against ``host:port`` and fills a :class:`SessionResult`."""

    def __init__(
        self,
        host: str,
        port: int,
        result: SessionResult,
        *,
        deadline: float,
        wait: Callable[[float], bool],
    ) -> None:
        self.host = host
        self.port = port
        self.result = result
        self.deadline = deadline
        # Pauses of a slow-drip write; returns True when the run is being stopped.
        self.wait = wait
        self.mode: Literal["command", "data"] = "command"
        self.partial = b""  # sent bytes of a line not yet ended
        self.sent = bytearray()  # everything sent, to tell an echo from a leak

    def run(self, steps: list[Step]) -> SessionResult:
        result = self.result
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.deadline)
        except OSError as exc:
            result.outcome = "refused"
            result.note("-", f"connect failed: {exc}".encode())
            return result
        conn = _Connection(sock)
        try:
            self._expect(conn, b"<greeting>")
            for step in steps:
                if step.kind in ("close", "reset"):
                    if step.kind == "reset":
                        # SO_LINGER 0: close() sends an RST, the abrupt end of a dying client.
                        conn.sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    result.note("-", step.kind.encode())
                    break
                if not self._send(conn, step):
                    break
                conn = self._lines(conn, step)
        except _NoReplyError as exc:
            result.outcome = "no_reply"
            if not result.waiting_for:  # a write that could not finish, not a reply
                result.waiting_for = f"<{exc}>".encode()
        except _ClosedError as exc:
            result.outcome = "done" if str(exc).startswith("221") else "closed"
            result.note("-", f"closed: {exc}".encode())
        except (ssl.SSLError, OSError) as exc:
            result.outcome = "tls_failed" if isinstance(exc, ssl.SSLError) else "closed"
            result.note("-", f"{type(exc).__name__}: {exc}".encode())
        finally:
            conn.sock.close()
        return result

    def _send(self, conn: _Connection, step: Step) -> bool:
        """Send a step's bytes (dripped when asked); False when the run is being stopped."""
        data = step.data
        if step.drip <= 0:
            self.result.note("C", data)
            conn.send(data, time.monotonic() + self.deadline)
        else:
            for at in range(0, len(data), step.chunk):
                piece = data[at : at + step.chunk]
                self.result.note("C", piece)
                conn.send(piece, time.monotonic() + self.deadline)
                if self.wait(step.drip):
                    return False
        self.sent += data
        return True

    def _lines(self, conn: _Connection, step: Step) -> _Connection:
        """Read the replies the step's complete lines are due, switching mode as the server does."""
        buffer = self.partial + step.data
        while True:
            if self.mode == "command":
                end = buffer.find(b"\n")
                if end < 0:
                    break
                line, buffer = buffer[: end + 1], buffer[end + 1 :]
                self.result.commands += 1
                reply = self._expect(conn, line)
                verb = line.rstrip(b"\r\n").upper()
                if reply.startswith(b"354"):
                    self.mode = "data"
                elif reply.startswith(b"220") and verb == b"STARTTLS" and step.kind == "starttls":
                    if isinstance(conn.sock, ssl.SSLSocket):
                        rule = "220 to STARTTLS within TLS (RFC 3207 4.2: 503)"
                        self.result.violations.append((line, reply, rule))
                    if conn.inbuf:
                        rule = "plain-text replies after STARTTLS's 220 (RFC 3207 4: discard)"
                        self.result.violations.append((line, bytes(conn.inbuf[:200]), rule))
                    # What was pipelined after STARTTLS was plain text; RFC 3207 says the server
                    # must throw it away, so no reply is due for it.
                    buffer = b""
                    conn = self._starttls(conn)
            else:
                end = buffer.find(b"\r\n")
                if end < 0:
                    break
                line, buffer = buffer[: end + 2], buffer[end + 2 :]
                if line == b".\r\n":
                    self.mode = "command"
                    self._expect(conn, b"<end of data>")
        self.partial = buffer
        return conn

    def _expect(self, conn: _Connection, line: bytes) -> bytes:
        try:
            reply = conn.reply(time.monotonic() + self.deadline)
        except _NoReplyError:
            self.result.waiting_for = line[:200]
            self.result.note("-", f"no reply within {self.deadline}s".encode())
            raise
        self.result.replies += 1
        self.result.note("S", reply)
        for match in _LEAK.finditer(reply):
            if match.group(0) not in self.sent:
                self.result.leaks.append((line, reply))
                break
        if reply.startswith((b"221", b"421")):
            raise _ClosedError(reply.decode("ascii", "replace").strip())
        return reply

    def _starttls(self, conn: _Connection) -> _Connection:
        raw = conn.sock
        raw.setblocking(True)
        raw.settimeout(self.deadline)
        tls = _tls_context().wrap_socket(raw, server_hostname=None)
        self.result.note("-", b"TLS started")
        self.mode = "command"
        return _Connection(tls)
