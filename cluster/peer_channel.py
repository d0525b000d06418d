"""The direct channel between the agents of a pair: authenticated UDP datagrams.

It carries heartbeats (every ``agent.heartbeat_interval``) and the failsafe protocol's asks and
answers (docs/fencing.md, "Failsafe"); it is not a second election: nothing here decides who
serves. Each datagram is ``HMAC-SHA256(secret, body) || body``, the body a JSON object naming
its sender, the sender's boot (a random id drawn at each start), a sequence number that grows
with every message of that boot, and the sender's wall clock. A datagram is refused when:

- its MAC does not match (forged, or another secret);
- its sender is not a configured peer, or its boot and sequence are not newer than the last
  accepted from that sender (a replay, or a datagram reordered behind a newer one: a heartbeat
  is worth only its newest copy);
- its timestamp is further than ``max_skew`` from this node's wall clock (a message captured
  and replayed to a receiver that restarted and forgot the sender's sequence).

Every replay that gets past these checks anyway (a restarted receiver, within the window) errs
on the safe side: a failsafe answer is bound to the ask's sequence number, so a replayed grant
proves nothing; a replayed ask makes its receiver grant a lease, i.e. wait longer before it may
take over. Refusals are logged once per burst (per sender address and reason), with a count.

The clock and the socket are injected: the agent gives a bound UDP socket and its clocks; the
tests give real sockets on the loopback and a clock they move.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hamta.eventlog import get_logger

MAC_SIZE = 32  # SHA-256
MAX_DATAGRAM = 4096
MIN_SECRET = 16  # bytes: a shorter secret is a typo, not a key
BURST_QUIET = 10.0  # seconds without a refusal from an address before its next one is logged

Address = tuple[str, int]


class PeerChannelError(Exception):
    """The channel cannot be set up (its secret file, its address); the message says why."""


def load_secret(path: Path) -> bytes:
    """The shared secret from ``path``: readable by its owner only (0600 or 0400)."""
    try:
        info = path.stat()
        data = path.read_bytes().strip()
    except OSError as exc:
        raise PeerChannelError(f"peer secret file {path}: {exc.strerror}") from None
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise PeerChannelError(
            f"peer secret file {path}: mode {mode:04o} lets others read it; "
            f"it must be 0600 (chmod 600 {path})"
        )
    if len(data) < MIN_SECRET:
        raise PeerChannelError(
            f"peer secret file {path}: {len(data)} bytes; at least {MIN_SECRET} are needed "
            "(for example: head -c 32 /dev/urandom | base64)"
        )
    return data


def write_secret(path: Path) -> None:
    """Create a new random secret at ``path``, mode 0600 (the lab; an operator's first node)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_urlsafe(32) + "\n")


@dataclass(frozen=True, slots=True)
class Message:
    """One authenticated message."""

    node: str  # the sender
    boot: str
    seq: int
    wall: float  # the sender's wall clock when it sent
    kind: str  # "heartbeat", "ask", "answer"
    body: Mapping[str, Any] = field(default_factory=dict)


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


class Sealer:
    """Seals this node's messages: its boot id and its growing sequence number."""

    def __init__(self, secret: bytes, node: str, boot: str | None = None) -> None:
        self.secret = secret
        self.node = node
        self.boot = boot or secrets.token_hex(8)
        self.seq = 0

    def seal(self, kind: str, wall: float, body: Mapping[str, Any] | None = None) -> bytes:
        self.seq += 1
        data = {
            "node": self.node,
            "boot": self.boot,
            "seq": self.seq,
            "wall": wall,
            "kind": kind,
            "body": dict(body or {}),
        }
        raw = json.dumps(data, separators=(",", ":")).encode()
        return _mac(self.secret, raw) + raw


class Opener:
    """Checks received datagrams: the MAC, the sender, freshness and order."""

    def __init__(self, secret: bytes, peers: frozenset[str], max_skew: float) -> None:
        self.secret = secret
        self.peers = peers
        self.max_skew = max_skew
        # Per sender: its boot and last sequence, and its wall clock then (a new boot must be
        # newer than the one it replaces by the sender's own clock).
        self.last: dict[str, tuple[str, int, float]] = {}

    def open(self, datagram: bytes, wall: float) -> Message | str:
        """The message, or why it is refused."""
        mac, raw = datagram[:MAC_SIZE], datagram[MAC_SIZE:]
        if len(mac) < MAC_SIZE or not hmac.compare_digest(mac, _mac(self.secret, raw)):
            return "bad MAC (forged, or another secret)"
        try:
            data = json.loads(raw)
            message = Message(
                node=str(data["node"]),
                boot=str(data["boot"]),
                seq=int(data["seq"]),
                wall=float(data["wall"]),
                kind=str(data["kind"]),
                body=dict(data["body"]),
            )
        except (ValueError, KeyError, TypeError):
            return "malformed message"
        if message.node not in self.peers:
            return f"unknown sender {message.node!r}"
        if abs(wall - message.wall) > self.max_skew:
            return f"stale timestamp ({wall - message.wall:+.1f}s off; window {self.max_skew:g}s)"
        last = self.last.get(message.node)
        if last is not None:
            boot, seq, seen = last
            if message.boot == boot and message.seq <= seq:
                return f"replayed or reordered (sequence {message.seq} after {seq})"
            if message.boot != boot and message.wall <= seen:
                return "replayed from an earlier boot"
        self.last[message.node] = (message.boot, message.seq, message.wall)
        return message


class _RefusalLog:
    """One log line per burst of refusals from an address, with how many there were."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.bursts: dict[str, tuple[float, int]] = {}  # address: (last refusal, count)
        self.log = get_logger(component="peer_channel")

    def refused(self, address: str, reason: str) -> None:
        now = self.clock()
        last = self.bursts.get(address)
        if last is not None and now - last[0] < BURST_QUIET:
            self.bursts[address] = (now, last[1] + 1)
            return
        before = last[1] if last is not None else 0
        self.bursts[address] = (now, 1)
        self.log.warning("PeerMessageRefused", address=address, reason=reason, before=before)


Handler = Callable[[Message, Address], None]


class PeerChannel(asyncio.DatagramProtocol):
    """The agent's end of the channel: sends to the configured peers, hands on what it accepts.

    ``heard`` holds, per peer, the monotonic time of its last authenticated heartbeat.
    ``handler`` receives every accepted message (heartbeats included), on the event loop.
    """

    def __init__(
        self,
        *,
        node: str,
        secret: bytes,
        peers: Mapping[str, Address],
        sock: socket.socket,
        handler: Handler,
        clock: Callable[[], float],
        wall: Callable[[], float],
        max_skew: float,
    ) -> None:
        self.node = node
        self.peers = dict(peers)
        self.sock = sock
        self.handler = handler
        self.clock = clock
        self.wall = wall
        self.sealer = Sealer(secret, node)
        self.opener = Opener(secret, frozenset(peers), max_skew)
        self.refusals = _RefusalLog(clock)
        self.heard: dict[str, float] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.log = get_logger(node=node, component="peer_channel")
        # Heartbeats go out from a thread of their own (HeartbeatSender), the failsafe's asks
        # and answers from the event loop: one sequence, sealed and sent under one lock, so
        # that no message leaves behind one with a higher number (the peer would refuse it).
        self._sending = threading.Lock()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=self.sock)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def send(self, peer: str, kind: str, body: Mapping[str, Any] | None = None) -> int:
        """Send one message to ``peer``; its sequence number (0: not sent, no transport)."""
        if self.transport is None:
            return 0
        with self._sending:
            datagram = self.sealer.seal(kind, self.wall(), body)
            seq = self.sealer.seq
            try:
                # The socket itself, not the transport: callable from any thread. A full
                # buffer (BlockingIOError) drops the datagram, as a lossy network would.
                self.sock.sendto(datagram, self.peers[peer])
            except OSError as exc:  # no route (a cut): the peer hears nothing, as with a loss
                self.log.debug("PeerSendFailed", peer=peer, error=str(exc))
        return seq

    def heartbeat(self, body: Mapping[str, Any] | None = None) -> None:
        for peer in self.peers:
            self.send(peer, "heartbeat", body)

    def heartbeat_ages(self) -> tuple[tuple[str, float], ...]:
        """For each peer heard at least once: seconds since its last authenticated heartbeat."""
        now = self.clock()
        return tuple(sorted((node, round(now - at, 4)) for node, at in self.heard.items()))

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        address = (str(addr[0]), int(addr[1]))
        if len(data) > MAX_DATAGRAM:
            self.refusals.refused(f"{address[0]}:{address[1]}", "oversized datagram")
            return
        message = self.opener.open(data, self.wall())
        if isinstance(message, str):
            self.refusals.refused(f"{address[0]}:{address[1]}", message)
            return
        if message.kind == "heartbeat":
            self.heard[message.node] = self.clock()
        self.handler(message, address)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable and the like
        self.log.debug("PeerChannelError", error=str(exc))


class HeartbeatSender:
    """Sends this node's heartbeats every ``interval`` from a thread of its own.

    On the event loop, a heartbeat waits for whatever runs before it: a decision turn, a burst
    of log lines, the results of worker threads, all of them slower on a CPU-starved machine.
    A live node whose heartbeats come late by ``peer_timeout`` gets fenced by its peer (the
    fast takeover), so they must not queue behind the agent's work. ``body`` says what each
    carries (the role and epoch: values read, nothing decided here); the pace is the clock's
    (``threading.Event.wait``), counted from the previous beat's due time, not from its end.

    A heartbeat still says that the *agent* lives, not just this thread: the event loop calls
    ``tick`` every interval, and no heartbeat goes out once its last tick is ``stall_limit``
    old. A hung loop falls silent ``stall_limit`` after it stopped, and its peer may fence it
    ``peer_timeout`` later: with ``stall_limit = peer_timeout``, the same stall as when the loop
    sent the heartbeats itself with a ``peer_timeout`` twice as long (docs/fencing.md).
    """

    def __init__(
        self,
        channel: PeerChannel,
        interval: float,
        stall_limit: float,
        body: Callable[[], Mapping[str, Any]],
        clock: Callable[[], float],
    ) -> None:
        self.channel = channel
        self.interval = interval
        self.stall_limit = stall_limit
        self.body = body
        self.clock = clock
        self.ticked = clock()  # the event loop's last tick
        self.withheld_since: float | None = None  # heartbeats held back since (a stalled loop)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peer-heartbeats", daemon=True)

    def start(self) -> None:
        self.ticked = self.clock()
        self._thread.start()

    def tick(self) -> None:
        """The event loop turns (called from it every interval)."""
        self.ticked = self.clock()

    def stop(self) -> None:
        """No heartbeat after this returns (it waits for one being sent)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop_turns(self) -> bool:
        """Whether the event loop ticked within ``stall_limit``; one line when that changes (a
        peer may fence this node once it has withheld its heartbeats for ``peer_timeout``)."""
        now = self.clock()
        age = now - self.ticked
        if age < self.stall_limit:
            if self.withheld_since is not None:
                held = now - self.withheld_since
                self.channel.log.warning("HeartbeatsResumed", withheld=round(held, 3))
                self.withheld_since = None
            return True
        if self.withheld_since is None:
            self.withheld_since = now
            self.channel.log.error("HeartbeatsWithheld", loop_stalled=round(age, 3))
        return False

    def _run(self) -> None:
        due = self.clock()
        while not self._stopped.is_set():
            try:
                if self._loop_turns():
                    self.channel.heartbeat(self.body())
            except Exception as exc:  # a bug here must not end the heartbeats for good
                self.channel.log.error("HeartbeatNotSent", error=repr(exc))
            due += self.interval
            now = self.clock()
            if due <= now:  # this beat itself was late (a stall): the pace resumes from it
                due = now + self.interval
            self._stopped.wait(due - now)


def bind_socket(address: Address) -> socket.socket:
    """A UDP socket bound to ``address`` (IP_FREEBIND: the address may come up later)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if hasattr(socket, "IP_FREEBIND"):
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_FREEBIND, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise PeerChannelError(f"peer address {address[0]}:{address[1]}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock
