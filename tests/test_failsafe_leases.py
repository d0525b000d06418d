"""The failsafe protocol over two real peer channels on the loopback (cluster.failsafe_leases).

The sessions and the clocks are the tests' own; the sockets and the event loop are real.
"""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from cluster.decision_data import AgentState, Policy, Role, Session, Snapshot
from cluster.failsafe_leases import FORMER_RUN, FailsafeLeases
from cluster.peer_channel import Message, PeerChannel, bind_socket
from hamta.eventlog import get_logger
from tests.support.decisions import NOW, WALL, World, active

SECRET = b"k" * 32


class Node:
    def __init__(self, name: str, peer: str, state: AgentState) -> None:
        self.name, self.peer, self.state = name, peer, state
        self.sock = bind_socket(("127.0.0.1", 0))
        self.session = Session.SUSPENDED
        self.confirmed_age: float | None = 0.1  # since the leader last confirmed (kazoo's thread)
        self.now = NOW
        self.woken = 0
        self.leases: FailsafeLeases | None = None

    def clock(self) -> float:
        return self.now

    def wake(self) -> None:
        self.woken += 1

    async def connect(self, other: Node) -> None:
        channel = PeerChannel(
            node=self.name,
            secret=SECRET,
            peers={self.peer: other.sock.getsockname()},
            sock=self.sock,
            handler=self.receive,
            clock=self.clock,
            wall=lambda: WALL,
            max_skew=5.0,
        )
        await channel.start()
        policy = Policy(node=self.name, failsafe_peers=frozenset({self.peer}))
        self.leases = FailsafeLeases(
            channel=channel,
            policy=policy,
            session=lambda: self.session,
            confirmed_age=lambda: self.confirmed_age,
            clock=self.clock,
            log=get_logger(node=self.name),
            on_change=self.wake,
        )

    def receive(self, message: Message, _address: tuple[str, int]) -> None:
        assert self.leases is not None
        self.leases.receive(message, self.state)

    def view(self) -> Snapshot:
        assert self.leases is not None
        return self.leases.view(World().snapshot(WALL))


async def _turns() -> None:
    for _ in range(30):
        await asyncio.sleep(0.002)


async def _pair() -> tuple[Node, Node, FailsafeLeases, FailsafeLeases]:
    """alpha active, beta passive, both suspended, their channels connected."""
    a = Node("alpha", "beta", active())
    b = Node("beta", "alpha", AgentState(role=Role.PASSIVE))
    await a.connect(b)
    await b.connect(a)
    assert a.leases is not None and b.leases is not None
    return a, b, a.leases, b.leases


async def _protocol() -> None:
    a, b, leases_a, leases_b = await _pair()
    # Both lost ZooKeeper: the active node asks, the passive one grants.
    with capture_logs() as logs:
        leases_a.ask(a.state)
        await _turns()
        a.now += 0.1
        b.now += 0.1
        leases_a.ask(a.state)
        await _turns()
    assert a.view().failsafe_held == (("beta", NOW + 0.1 + 3.0),)  # from the ask's sending
    assert dict(b.view().failsafe_granted)["alpha"] == NOW + 0.1 + 3.0
    assert a.woken == 1  # a lease came: decide again (not at every renewal)
    granting = [line for line in logs if line["event"] == "FailsafeGranting"]
    assert len(granting) == 1 and granting[0]["to"] == "alpha"  # one line, not one per ask
    # The passive node regains ZooKeeper: it refuses; nothing is renewed, and what it granted
    # stands until it ends (one line, however many refusals).
    b.session = Session.CONNECTED
    with capture_logs() as logs:
        for _ in range(3):
            a.now += 0.1
            b.now += 0.1
            leases_a.ask(a.state)
            await _turns()
    assert a.view().failsafe_held == (("beta", NOW + 0.1 + 3.0),)
    assert a.woken == 2
    assert [line["why"] for line in logs if line["event"] == "FailsafeRefused"] == [
        "connected to ZooKeeper"
    ]
    a.now += 3.0
    assert a.view().failsafe_held == ()
    # ... but it still remembers the lease it granted (for its own takeover).
    assert dict(b.view().failsafe_granted)["alpha"] == NOW + 0.1 + 3.0
    # Connected again, the active node asks nothing.
    a.session = Session.CONNECTED
    leases_a.saw(Session.CONNECTED)
    leases_a.ask(a.state)
    assert leases_a.asks == {}
    leases_a.channel.close()
    leases_b.channel.close()


def test_the_protocol_over_real_sockets() -> None:
    asyncio.run(_protocol())


async def _answers_to_nobody() -> None:
    a, _, leases_a, leases_b = await _pair()
    # An answer to an ask alpha never sent (forged by a peer, or very late) is no lease.
    leases_b.channel.send("alpha", "answer", {"ask": 999, "granted": True, "lease": 3.0})
    leases_b.channel.send("alpha", "answer", {"ask": "x", "granted": True})
    await _turns()
    assert a.view().failsafe_held == ()
    # A peer asking more than it is given: the lease is this node's own setting at most.
    leases_a.ask(a.state)
    await _turns()
    seq = max(leases_a.asks)
    leases_b.channel.send("alpha", "answer", {"ask": seq, "granted": True, "lease": 60.0})
    await _turns()
    assert a.view().failsafe_held == (("beta", NOW + 3.0),)
    leases_a.channel.close()
    leases_b.channel.close()


async def _silent_servers() -> None:
    a, b, leases_a, leases_b = await _pair()
    # kazoo has noticed nothing on either side (a partition that drops packets): both sessions
    # still say connected, yet no server has answered either node for 0.3 s, then 0.6 s.
    a.session = b.session = Session.CONNECTED
    a.confirmed_age = b.confirmed_age = 0.3
    leases_a.ask(a.state)
    await _turns()
    assert leases_a.asks == {} and a.view().failsafe_held == ()  # a slow answer, no more
    a.confirmed_age = 0.6
    with capture_logs() as logs:
        leases_a.ask(a.state)
        await _turns()
    # The passive node was answered 0.3 s ago: it is not cut off, and says so.
    assert a.view().failsafe_held == ()
    refused = [line for line in logs if line["event"] == "FailsafeRefusing"]
    assert refused[0]["why"] == "connected to ZooKeeper" and refused[0]["confirmed_age"] == 0.3
    b.confirmed_age = 0.6
    leases_a.ask(a.state)
    await _turns()
    assert a.view().failsafe_held == (("beta", NOW + 3.0),)
    # A new session, not yet answered: only kazoo's word counts.
    a.confirmed_age = None
    leases_a.ask(a.state)
    assert leases_a.asks == {}
    leases_a.channel.close()
    leases_b.channel.close()


def test_servers_gone_silent_count_as_cut_off_before_kazoo_notices() -> None:
    asyncio.run(_silent_servers())


def test_stray_answers_and_long_leases_are_not_trusted() -> None:
    asyncio.run(_answers_to_nobody())


def test_a_restarted_agent_assumes_it_granted_a_lease_just_before() -> None:
    async def run() -> Snapshot:
        node = Node("beta", "alpha", AgentState(role=Role.PASSIVE))
        await node.connect(node)
        assert node.leases is not None
        node.leases.channel.close()
        return node.view()

    assert asyncio.run(run()).failsafe_granted == ((FORMER_RUN, NOW + 3.0),)
