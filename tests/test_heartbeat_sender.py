"""The heartbeat thread (``cluster.peer_channel.HeartbeatSender``) over real loopback sockets.

Heartbeats must keep their pace while the agent's event loop is busy (a peer would fence a
live node whose heartbeats come late by ``peer_timeout``), and must stop once the event loop
has not turned for ``stall_limit`` (a hung agent must still fall silent). The sender's wall
clock is sealed in every message: it says when each heartbeat left.
"""

from __future__ import annotations

import asyncio
import socket
import time

from structlog.testing import capture_logs

from cluster.peer_channel import HeartbeatSender, Message, Opener, PeerChannel, bind_socket

SECRET = b"h" * 32
INTERVAL = 0.02


def _received(sock: socket.socket) -> list[Message]:
    """Every heartbeat waiting on ``sock``, each checked as a receiver checks it."""
    opener = Opener(SECRET, frozenset({"alpha"}), max_skew=60.0)
    got: list[Message] = []
    sock.setblocking(False)
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return got
        message = opener.open(data, time.time())
        assert isinstance(message, Message), message  # in order, authentic
        got.append(message)


async def _channel(receiver: socket.socket) -> PeerChannel:
    channel = PeerChannel(
        node="alpha",
        secret=SECRET,
        peers={"beta": receiver.getsockname()},
        sock=bind_socket(("127.0.0.1", 0)),
        handler=lambda _message, _address: None,
        clock=time.monotonic,
        wall=time.time,
        max_skew=60.0,
    )
    await channel.start()
    return channel


def _hold(seconds: float) -> None:
    """Keep the calling thread (the event loop's) busy computing, holding the GIL as it can."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_heartbeats_keep_their_pace_while_the_event_loop_is_busy() -> None:
    asyncio.run(_busy_loop())


async def _busy_loop() -> None:
    receiver = bind_socket(("127.0.0.1", 0))
    channel = await _channel(receiver)
    sender = HeartbeatSender(channel, INTERVAL, 5.0, lambda: {"role": "active"}, time.monotonic)
    sender.start()
    busy_from = time.time()
    _hold(0.5)  # the condition under test: the event loop does not turn for 0.5 s
    busy_until = time.time()
    sender.stop()
    channel.close()
    during = [m for m in _received(receiver) if busy_from <= m.wall <= busy_until]
    receiver.close()
    # About 25 at this pace (fewer on a loaded machine: the thread needs the GIL and a core);
    # heartbeats sent by the event loop itself would be none.
    assert len(during) >= 3, [round(m.wall - busy_from, 3) for m in during]
    assert all(m.kind == "heartbeat" and m.body == {"role": "active"} for m in during)
    assert [m.seq for m in during] == sorted(m.seq for m in during)


def test_heartbeats_stop_when_the_event_loop_stops_turning() -> None:
    with capture_logs() as logs:
        asyncio.run(_hung_loop())
    events = [entry["event"] for entry in logs if entry["event"].startswith("Heartbeats")]
    assert events == ["HeartbeatsWithheld", "HeartbeatsResumed"]  # one line each way


async def _hung_loop() -> None:
    receiver = bind_socket(("127.0.0.1", 0))
    channel = await _channel(receiver)
    stall_limit = 0.15
    sender = HeartbeatSender(channel, INTERVAL, stall_limit, dict, time.monotonic)
    started = time.time()
    sender.start()
    await asyncio.sleep(0.3)  # the loop turns, but nobody calls tick(): as if it hung
    sender.tick()  # it turns again: the heartbeats resume
    resumed = time.time()
    await asyncio.sleep(0.1)
    sender.stop()
    channel.close()
    walls = [m.wall for m in _received(receiver)]
    receiver.close()
    assert walls and walls[0] - started < 0.1
    silent = [w for w in walls if started + stall_limit + 0.05 < w < resumed]
    assert silent == []  # silent from stall_limit after the last tick until the next tick
    assert any(w >= resumed for w in walls)
