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


async def _protocol() -> None:
    a = Node("alpha", "beta", active())
    b = Node("beta", "alpha", AgentState(role=Role.PASSIVE))
    await a.connect(b)
    await b.connect(a)
    assert a.leases is not None and b.leases is not None
    # Both lost ZooKeeper: the active node asks, the passive one grants.
    with capture_logs() as logs:
        a.leases.ask(a.state)
        await _turns()
        a.now += 0.1
        b.now += 0.1
        a.leases.ask(a.state)
        await _turns()
    assert a.view().failsafe_held == (("beta", NOW + 0.1 + 3.0),)  # from the ask's sending
    assert dict(b.view().failsafe_granted)["alpha"] == NOW + 0.1 + 3.0
    assert a.woken == 1  # a lease came: decide again (not at every renewal)
    granting = [line for line in logs if line["event"] == "FailsafeGranting"]
    assert len(granting) == 1 and granting[0]["to"] == "alpha"  # one line, not one per ask
    # The passive node regains ZooKeeper: it refuses, and the lease held is dropped at once.
    b.session = Session.CONNECTED
    with capture_logs() as logs:
        a.leases.ask(a.state)
        await _turns()
    assert a.view().failsafe_held == ()
    assert [line["why"] for line in logs if line["event"] == "FailsafeRefused"] == [
        "connected to ZooKeeper"
    ]
    # ... but it still remembers the lease it granted (for its own takeover).
    assert dict(b.view().failsafe_granted)["alpha"] == NOW + 0.1 + 3.0
    # Connected again, the active node asks nothing.
    a.session = Session.CONNECTED
    a.leases.saw(Session.CONNECTED)
    a.leases.ask(a.state)
    assert a.leases.asks == {}
    a.leases.channel.close()
    b.leases.channel.close()


def test_the_protocol_over_real_sockets() -> None:
    asyncio.run(_protocol())


async def _answers_to_nobody() -> None:
    a = Node("alpha", "beta", active())
    b = Node("beta", "alpha", AgentState(role=Role.PASSIVE))
    await a.connect(b)
    await b.connect(a)
    assert a.leases is not None and b.leases is not None
    # An answer to an ask alpha never sent (forged by a peer, or very late) is no lease.
    b.leases.channel.send("alpha", "answer", {"ask": 999, "granted": True, "lease": 3.0})
    b.leases.channel.send("alpha", "answer", {"ask": "x", "granted": True})
    await _turns()
    assert a.view().failsafe_held == ()
    # A peer asking more than it is given: the lease is this node's own setting at most.
    a.leases.ask(a.state)
    await _turns()
    seq = max(a.leases.asks)
    b.leases.channel.send("alpha", "answer", {"ask": seq, "granted": True, "lease": 60.0})
    await _turns()
    assert a.view().failsafe_held == (("beta", NOW + 3.0),)
    a.leases.channel.close()
    b.leases.channel.close()


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
