"""The peer channel over real UDP sockets on the loopback: what it accepts and what it refuses.

The clocks are the tests' (moved by hand); the sockets and the event loop are real.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from cluster.config import ConfigError, parse_agent_config
from cluster.peer_channel import (
    MAC_SIZE,
    Address,
    Message,
    Opener,
    PeerChannel,
    PeerChannelError,
    Sealer,
    bind_socket,
    load_secret,
    write_secret,
)

SECRET = b"s" * 32
WALL = 1_700_000_000.0


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class End:
    """One agent's end: its channel and what it received."""

    def __init__(self, node: str, peer: str, secret: bytes = SECRET) -> None:
        self.sock = bind_socket(("127.0.0.1", 0))
        self.address: Address = self.sock.getsockname()
        self.clock = Clock(100.0)
        self.wall = Clock(WALL)
        self.got: list[Message] = []
        self.node, self.peer, self.secret = node, peer, secret
        self.channel: PeerChannel | None = None

    def connect(self, other: End) -> PeerChannel:
        self.channel = PeerChannel(
            node=self.node,
            secret=self.secret,
            peers={self.peer: other.address},
            sock=self.sock,
            handler=lambda message, _address: self.got.append(message),
            clock=self.clock,
            wall=self.wall,
            max_skew=5.0,
        )
        return self.channel


async def _pair(secret_b: bytes = SECRET) -> tuple[End, End]:
    a, b = End("alpha", "beta"), End("beta", "alpha", secret_b)
    await a.connect(b).start()
    await b.connect(a).start()
    return a, b


async def _settle() -> None:
    for _ in range(50):  # real sockets: a few turns of the loop
        await asyncio.sleep(0.002)


def _raw_sender() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def test_heartbeats_are_heard_and_aged_by_the_receivers_clock() -> None:
    asyncio.run(_heartbeats())


async def _heartbeats() -> None:
    a, b = await _pair()
    assert a.channel is not None and b.channel is not None
    assert b.channel.heartbeat_ages() == ()  # never heard: not listed
    a.channel.heartbeat({"role": "active"})
    await _settle()
    assert [m.kind for m in b.got] == ["heartbeat"] and b.got[0].body == {"role": "active"}
    b.clock.now += 0.75
    assert b.channel.heartbeat_ages() == (("alpha", 0.75),)
    a.channel.close()
    b.channel.close()


def test_forged_replayed_stale_and_wrong_secret_messages_are_refused_and_logged() -> None:
    asyncio.run(_refusals())


async def _refusals() -> None:
    a, b = await _pair()
    assert a.channel is not None and b.channel is not None
    raw = _raw_sender()
    with capture_logs() as logs:
        # A forged MAC: the body of a true message, its MAC flipped.
        good = Sealer(SECRET, "alpha").seal("heartbeat", WALL)
        forged = bytes([good[0] ^ 1]) + good[1:]
        raw.sendto(forged, b.address)
        # Another secret altogether.
        raw.sendto(Sealer(b"x" * 32, "alpha").seal("heartbeat", WALL), b.address)
        # A replay of a message already accepted.
        a.channel.heartbeat()
        await _settle()
        captured = Sealer(SECRET, "alpha", boot=a.channel.sealer.boot)
        captured.seq = a.channel.sealer.seq - 1
        raw.sendto(captured.seal("heartbeat", WALL), b.address)
        # A stale timestamp: captured a minute ago.
        raw.sendto(Sealer(SECRET, "alpha").seal("heartbeat", WALL - 60), b.address)
        # A sender that is not a peer.
        raw.sendto(Sealer(SECRET, "mallory").seal("heartbeat", WALL), b.address)
        await _settle()
    assert len(b.got) == 1  # the one true heartbeat
    refused = [line for line in logs if line["event"] == "PeerMessageRefused"]
    # One line per burst from the address, with the first refusal's reason.
    assert len(refused) == 1
    assert refused[0]["reason"] == "bad MAC (forged, or another secret)"
    assert refused[0]["address"] == f"127.0.0.1:{raw.getsockname()[1]}"
    # The burst's count comes with the next line, once the address was quiet for a while.
    b.clock.now += 11
    with capture_logs() as logs:
        raw.sendto(forged, b.address)
        await _settle()
    [line] = [line for line in logs if line["event"] == "PeerMessageRefused"]
    assert line["before"] == 5
    raw.close()
    a.channel.close()
    b.channel.close()


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (lambda: b"short", "bad MAC"),
        (lambda: Sealer(b"y" * 32, "alpha").seal("heartbeat", WALL), "bad MAC"),
        (lambda: Sealer(SECRET, "alpha").seal("heartbeat", WALL + 6), "stale timestamp"),
        (lambda: Sealer(SECRET, "eve").seal("heartbeat", WALL), "unknown sender"),
    ],
)
def test_each_refusal_names_its_reason(datagram: Callable[[], bytes], reason: str) -> None:
    opener = Opener(SECRET, frozenset({"alpha"}), max_skew=5.0)
    result = opener.open(datagram(), WALL)
    assert isinstance(result, str) and result.startswith(reason)


def test_order_within_a_boot_and_across_boots() -> None:
    opener = Opener(SECRET, frozenset({"alpha"}), max_skew=5.0)
    first = Sealer(SECRET, "alpha", boot="one")
    one, two = first.seal("heartbeat", WALL), first.seal("heartbeat", WALL + 0.1)
    assert isinstance(opener.open(two, WALL), Message)
    assert "reordered" in str(opener.open(one, WALL))  # older than the newest accepted
    # A restart: a new boot, sequence from 1 again, later by the sender's clock.
    again = Sealer(SECRET, "alpha", boot="two").seal("heartbeat", WALL + 1)
    assert isinstance(opener.open(again, WALL), Message)
    # A message of the earlier boot, replayed after the restart.
    late = first.seal("heartbeat", WALL + 0.2)
    assert opener.open(late, WALL) == "replayed from an earlier boot"
    # The MAC covers the body: a body edited in flight is refused.
    edited = again[:MAC_SIZE] + again[MAC_SIZE:].replace(b'"heartbeat"', b'"ask"')
    assert str(opener.open(edited, WALL)).startswith("bad MAC")


def test_the_secret_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    path = tmp_path / "peer-secret"
    write_secret(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(load_secret(path)) >= 32
    path.chmod(0o640)
    with pytest.raises(PeerChannelError, match=r"mode 0640 lets others read it.*chmod 600"):
        load_secret(path)
    path.chmod(0o600)
    path.write_text("short\n")
    with pytest.raises(PeerChannelError, match="at least 16 are needed"):
        load_secret(path)
    with pytest.raises(PeerChannelError, match="No such file"):
        load_secret(tmp_path / "missing")
    with pytest.raises(FileExistsError):  # never over an existing secret
        write_secret(path)


def test_a_taken_address_is_named(tmp_path: Path) -> None:
    first = bind_socket(("127.0.0.1", 0))
    with pytest.raises(PeerChannelError, match=r"peer address 127\.0\.0\.1"):
        bind_socket(first.getsockname())
    first.close()


BASE = """
[agent]
node = "mx1"
zookeeper = "198.18.0.11:2181"
relay_config = "/etc/hamta/relay.toml"
"""
STORAGE = """
[storage]
path = "/var/spool/hamta"
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('peers = { mx2 = "198.18.0.12:7946" }', "needs agent.peer_address and"),
        ('peers = { mx2 = "198.18.0.12" }', "needs a port"),
        (
            'peer_address = "198.18.0.11:7946"\npeer_secret_file = "/s"\n'
            'peers = { mx1 = "198.18.0.11:7946" }',
            "names this node",
        ),
        (
            'peer_address = "198.18.0.11:7946"\npeer_secret_file = "/s"\n'
            'peers = { mx2 = "198.18.0.12:7946" }\nfailsafe_lease = "0.5s"',
            "failsafe_lease",
        ),
        ('heartbeat_interval = "0s"', "heartbeat_interval"),
    ],
)
def test_channel_settings_are_checked(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_agent_config(BASE + extra)


def test_channel_settings_and_their_defaults() -> None:
    config = parse_agent_config(
        BASE + 'peer_address = "198.18.0.11:7946"\npeer_secret_file = "/etc/hamta/peer-secret"\n'
        'peers = { mx2 = "198.18.0.12:7946" }' + STORAGE
    )
    agent = config.agent
    assert agent.peer_addresses() == {"mx2": ("198.18.0.12", 7946)}
    assert (agent.heartbeat_interval, agent.failsafe, agent.failsafe_lease) == (0.1, True, 3.0)
