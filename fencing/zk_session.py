"""End a ZooKeeper session from outside its client: the watchdog closes a dead agent's session.

After a kill of the agent alone, its session would live on the server until it expires (the
session timeout), and with it the agent's ephemeral member and leader znodes: the peer waits
for nothing. The watchdog, once it has stopped the relay and dropped the virtual IP, reopens
that session with the id and password the agent handed it and closes it, as the agent would
have at a clean stop: the znodes vanish at once.

Only the few messages needed, in ZooKeeper's jute encoding (``zookeeper.jute``; every frame
is a big-endian int32 length, then the record):

- ``ConnectRequest {int protocolVersion; long lastZxidSeen; int timeOut; long sessionId;
  buffer passwd; boolean readOnly}`` -> ``ConnectResponse {int protocolVersion; int timeOut;
  long sessionId; buffer passwd; [boolean readOnly]}``. A server that does not know the
  session with that password answers a timeout of 0: the session ended already, or the
  password is wrong; ZooKeeper derives the password from the id and answers both alike.
- ``RequestHeader {int xid; int type}`` + ``AuthPacket {int type; ustring scheme; buffer
  auth}`` (xid -4, type 100), for an ensemble that enforces authentication; its reply is a
  ``ReplyHeader {int xid; long zxid; int err}``, err -115 when refused.
- ``RequestHeader`` with type -11 (closeSession), no body; its reply a ``ReplyHeader``.

Standard library only, like the rest of ``fencing``. The password and the credentials are
secrets: they appear in no repr, log line or error message.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

#: How long the watchdog spends at most ending a session, over all servers.
CLOSE_LIMIT: Final = 3.0
#: At most this per server, so that one silent server leaves time for the others.
PER_SERVER: Final = 1.0
DEFAULT_PORT: Final = 2181

_AUTH_XID: Final = -4
_CLOSE_XID: Final = 1
_OP_AUTH: Final = 100
_OP_CLOSE: Final = -11
_AUTH_FAILED: Final = -115
_SESSION_EXPIRED: Final = -112
_MAX_FRAME: Final = 1 << 20
_HEADER: Final = struct.Struct("!ii")
_REPLY: Final = struct.Struct("!iqi")
_INT: Final = struct.Struct("!i")


@dataclass(frozen=True)
class ZkSession:
    """A session to end: where, its id and password, and the auth its connection needs.

    ``servers`` as kazoo takes them (``"10.0.0.1:2181,zk2:2181"``, IPv6 in brackets), without a
    chroot; ``auth`` as (scheme, credential) pairs, e.g. ``("digest", "user:password")``.
    Raises ``ValueError`` for values that could not name a session.
    """

    servers: tuple[tuple[str, int], ...]
    session_id: int
    password: bytes = field(repr=False)
    auth: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("servers: none given")
        sid = self.session_id
        if isinstance(sid, bool) or not isinstance(sid, int) or not 0 < sid < 1 << 63:
            raise ValueError("session_id must be a positive 64-bit integer")
        if not isinstance(self.password, bytes) or not 0 < len(self.password) <= 64:
            raise ValueError("password must be 1 to 64 bytes")
        for pair in self.auth:
            if len(pair) != 2 or not all(isinstance(part, str) and part for part in pair):
                raise ValueError("auth must be [scheme, credential] pairs of non-empty strings")

    @property
    def label(self) -> str:
        """The session id as ZooKeeper's logs write it (not a secret)."""
        return f"0x{self.session_id:x}"


def parse_servers(text: str) -> tuple[tuple[str, int], ...]:
    """``"h1:2181,[::1]:2182,h3"`` -> ((host, port), ...); ``ValueError`` for a bad entry."""
    if not isinstance(text, str):
        raise ValueError("servers must be a string 'host:port,host:port'")
    servers = []
    for raw in text.split(","):
        entry = raw.strip()
        if entry.startswith("["):
            host, bracket, rest = entry[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError(f"servers: bad address {entry!r}")
            port_text = rest[1:]
        elif entry.count(":") == 1:
            host, _, port_text = entry.partition(":")
        else:
            host, port_text = entry, ""
        if not host or any(c in host for c in " /\t"):
            raise ValueError(f"servers: bad address {entry!r}")
        if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
            raise ValueError(f"servers: bad port in {entry!r}")
        servers.append((host, int(port_text) if port_text else DEFAULT_PORT))
    return tuple(servers)


@dataclass(frozen=True)
class Closed:
    """What became of the session: ``outcome`` is

    - ``closed``: a server acknowledged closeSession; its ephemeral znodes are gone;
    - ``not_open``: a server does not know the session with that password (ended already, or
      the password is wrong: ZooKeeper answers both alike);
    - ``auth_failed``: a server refused the credentials, the session was not closed;
    - ``unreachable``: no server answered within the limit (``detail`` says what each did);
    - ``skipped``: not tried (the watchdog's fencing failed: the session is left to expire).
    """

    outcome: str
    server: str | None
    detail: str
    seconds: float


class _ServerError(Exception):
    """This server gave no answer: try the next."""


class _Conn:
    """One connection with a deadline: every read and write fails once it has passed."""

    def __init__(self, host: str, port: int, deadline: float, clock: Callable[[], float]):
        self.deadline = deadline
        self.clock = clock
        self.sock = socket.create_connection((host, port), timeout=self._left())

    def _left(self) -> float:
        left = self.deadline - self.clock()
        if left <= 0:
            raise _ServerError("no answer in time")
        return left

    def send(self, record: bytes) -> None:
        self.sock.settimeout(self._left())
        self.sock.sendall(_INT.pack(len(record)) + record)

    def receive(self) -> bytes:
        size = _INT.unpack(self._exactly(_INT.size))[0]
        if not 0 <= size <= _MAX_FRAME:
            raise _ServerError(f"bad frame length {size}")
        return self._exactly(size)

    def reply(self, xid: int) -> int:
        """The error code of the reply to ``xid``, skipping notifications and pings."""
        while True:
            frame = self.receive()
            if len(frame) < _REPLY.size:
                raise _ServerError("short reply")
            got, _zxid, err = _REPLY.unpack_from(frame)
            if got == xid:
                return int(err)

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            self.sock.settimeout(self._left())
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise _ServerError("connection closed by the server")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def _buffer(data: bytes) -> bytes:
    return _INT.pack(len(data)) + data


def _close_on(
    session: ZkSession, host: str, port: int, deadline: float, clock: Callable[[], float]
) -> tuple[str, str]:
    conn = _Conn(host, port, deadline, clock)
    try:
        # timeOut 0: the server gives the shortest it allows, so that a session this left open
        # (the close lost on the way) expires as soon as it can.
        conn.send(
            struct.pack("!iqiq", 0, 0, 0, session.session_id) + _buffer(session.password) + b"\0"
        )
        answer = conn.receive()
        if len(answer) < 16:
            raise _ServerError("short ConnectResponse")
        _version, timeout, session_id = struct.unpack_from("!iiq", answer)
        if timeout <= 0 or session_id != session.session_id:
            return "not_open", "the server does not know this session with this password"
        for scheme, credential in session.auth:
            conn.send(
                _HEADER.pack(_AUTH_XID, _OP_AUTH)
                + _INT.pack(0)
                + _buffer(scheme.encode())
                + _buffer(credential.encode())
            )
            if conn.reply(_AUTH_XID) == _AUTH_FAILED:
                return "auth_failed", f"the server refused the {scheme} credentials"
        conn.send(_HEADER.pack(_CLOSE_XID, _OP_CLOSE))
        err = conn.reply(_CLOSE_XID)
        if err == 0:
            return "closed", ""
        if err == _SESSION_EXPIRED:
            return "not_open", "expired while being closed"
        raise _ServerError(f"closeSession answered error {err}")
    finally:
        conn.close()


def _why(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _close_all(session: ZkSession, limit: float, clock: Callable[[], float]) -> Closed:
    start = clock()
    end = start + limit
    problems = []
    for host, port in session.servers:
        now = clock()
        if now >= end:
            problems.append(f"{host}:{port}: not tried, out of time")
            continue
        name = f"{host}:{port}"
        try:
            outcome, detail = _close_on(session, host, port, min(end, now + PER_SERVER), clock)
        except (_ServerError, OSError) as exc:
            problems.append(f"{name}: {_why(exc)}")
            continue
        return Closed(outcome, name, detail, round(clock() - start, 3))
    return Closed("unreachable", None, "; ".join(problems), round(clock() - start, 3))


def close_session(
    session: ZkSession, limit: float = CLOSE_LIMIT, clock: Callable[[], float] = time.monotonic
) -> Closed:
    """Close ``session``, trying its servers in turn, within ``limit`` seconds in all.

    The work runs in a daemon thread so that even a name lookup that hangs (the socket's
    timeout does not cover it) cannot hold the caller past the limit.
    """
    result: list[Closed] = []
    start = clock()
    worker = threading.Thread(
        target=lambda: result.append(_close_all(session, limit, clock)),
        name="close-session",
        daemon=True,
    )
    worker.start()
    worker.join(limit + 0.5)
    if result:
        return result[0]
    return Closed("unreachable", None, "no answer in time", round(clock() - start, 3))
