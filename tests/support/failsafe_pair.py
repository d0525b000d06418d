"""A pair of agents over a simulated ZooKeeper and peer channel, for the failsafe invariant.

Each agent decides with the real ``cluster.state.decide`` and the real failsafe rules
(``cluster.failsafe``); around them, plain data stands in for ZooKeeper (a quorum that can go
and come back, each node reaching it or not, sessions that expire on the server only while a
quorum stands, their timers reset when it is elected again), for the peer channel (cut or not in
each direction, one tick of delay) and for the executor (every step takes one tick; FENCE works
or not; a fenced node is dead for good). The invariant checked at every tick: never two nodes
serving at once, counting the failsafe leases (a node serves from its RELAY step's end to its
DRAIN step's end). With ``silent``, a server lost drops packets instead of resetting the
connection: kazoo notices only at its read timeout, and a node's read of the cluster blocks
until then (an active node's only until its demotion moment, as the agent's does).

With ``heartbeats``, the fast takeover joins in (issue 17): each live node's heartbeats cross
the channel (where it passes), and a node that may lead advances its pulse in ZooKeeper while it
reaches a quorum; a watcher that reaches one sees it, counting from its own reconnection. Every
fence of a node that was reaching ZooKeeper and pulsing, seen by a fencer that was reaching it
too, for a whole ``peer_timeout`` is counted in ``false_fences``: a cut channel alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cluster.decision_data import (
    PROMOTION,
    AgentState,
    ClusterView,
    Leader,
    LocalView,
    Member,
    Policy,
    Role,
    Session,
    Snapshot,
    Step,
    StepResult,
)
from cluster.failsafe import grant, should_ask
from cluster.state import decide, demotion_due
from cluster.takeover import holds_resources, pulsing

NODES = ("alpha", "beta")
TIMEOUT = 2.0  # the ZooKeeper session timeout
TICK = 0.05
STEP_TIME = 0.1
NOTICE = TIMEOUT * 2 / 3  # kazoo's read timeout: when it notices a silent server
WALL0 = 1_700_000_000.0


def other(node: str) -> str:
    return NODES[1 - NODES.index(node)]


@dataclass
class Node:
    name: str
    policy: Policy
    state: AgentState = field(default_factory=AgentState)
    reach: bool = True  # reaches the ZooKeeper servers (when they have a quorum)
    alive: bool = True  # not fenced
    session_alive: bool = True  # on the server
    lost_seen: bool = False  # the client has yet to see its expiry (one LOST snapshot)
    contact: float = 0.0  # last answered request (client: its deadline; server: expiry)
    record: Member | None = None  # its member znode, as last published
    last_leader: Leader | None = None  # the leader znode as it last read it
    step_end: float | None = None  # when the step in flight ends
    result: StepResult | None = None
    serving: bool = False
    held: dict[str, float] = field(default_factory=dict)
    granted: dict[str, float] = field(default_factory=dict)
    asks: dict[int, float] = field(default_factory=dict)
    seen: Session = Session.CONNECTED  # the session its last decision saw
    due: float | None = None  # an active node's demotion moment, from its last decision
    heard: dict[str, float] = field(default_factory=dict)  # the peer's last heartbeat heard
    reach_since: float | None = None  # reaching a quorum since (None: not now)
    pulsing_since: float | None = None  # advancing its pulse since (None: not now)
    stale: tuple[str, int] | None = None  # the ACQUIRE in flight may replace this znode


@dataclass
class Message:
    to: str
    kind: str
    sender: str
    seq: int
    at: float  # delivery time
    granted: bool = False


class FailsafePair:
    def __init__(
        self,
        *,
        fence_works: bool = False,
        lease: float = 3.0,
        silent: bool = False,
        heartbeats: bool = False,
    ) -> None:
        self.now = 1000.0
        self.silent = silent
        self.heartbeats = heartbeats
        self.pulse_at: dict[str, float] = {}  # each pulse znode's last advance (it exists)
        self.false_fences = 0
        self.fast_takeovers = 0
        self.quorum = True
        self.quorum_since = self.now
        self.channel = {name: True for name in NODES}  # name -> its outgoing datagrams pass
        self.fence_works = fence_works
        self.nodes = {
            name: Node(
                name,
                Policy(
                    node=name,
                    failsafe_peers=frozenset({other(name)}),
                    failsafe_lease=lease,
                    min_failover_interval=0.0,
                ),
                contact=self.now,
            )
            for name in NODES
        }
        self.leader: Leader | None = None
        self.epoch = 0
        self.absent: dict[str, float] = {}
        self.inbox: list[Message] = []
        self.seq = 0
        self.overlaps = 0
        self.serving_time = dict.fromkeys(NODES, 0.0)
        self.failsafe_time = dict.fromkeys(NODES, 0.0)
        self.promotions = dict.fromkeys(NODES, 0)
        self.last_serving = dict.fromkeys(NODES, 0.0)

    # ---------------------------------------------------------------- ZooKeeper

    def reaches(self, node: Node) -> bool:
        return self.quorum and node.reach and node.alive

    def kazoo_session(self, node: Node) -> Session:
        """The session as kazoo reports it: a silent server is noticed late."""
        if self.reaches(node) or (self.silent and self.now - node.contact < NOTICE):
            return Session.CONNECTED
        return Session.SUSPENDED

    def read_blocked(self, node: Node) -> bool:
        """A read of the cluster held up by a silent server: no decision this tick."""
        if self.reaches(node) or self.kazoo_session(node) is not Session.CONNECTED:
            return False
        return node.due is None or self.now < node.due

    def set_quorum(self, up: bool) -> None:
        if up and not self.quorum:
            self.quorum_since = self.now  # a new leader: every session's timer starts again
        self.quorum = up

    def _expire_sessions(self) -> None:
        if not self.quorum:
            return
        for node in self.nodes.values():
            if not node.session_alive or self.reaches(node):
                continue
            if self.now - max(node.contact, self.quorum_since) > TIMEOUT:
                node.session_alive = False
                node.lost_seen = True
                self.absent[node.name] = self.now
                self.pulse_at.pop(node.name, None)  # ephemeral: gone with its session
                if self.leader is not None and self.leader.node == node.name:
                    self.leader = None

    def view(self, node: Node) -> ClusterView:
        if not self.reaches(node):
            # Cut off, a client cannot know whether its session expired on the server.
            session = Session.SUSPENDED
            leader = node.last_leader  # its last read: it cannot see the znode go
            deadline = node.contact + TIMEOUT
            return ClusterView(session=session, leader=leader, session_deadline=deadline)
        if not node.session_alive:
            if node.lost_seen:
                node.lost_seen = False
                return ClusterView(session=Session.LOST)
            node.session_alive = True  # kazoo's new session
            self.absent.pop(node.name, None)
        node.contact = self.now
        members = {
            name: peer.record
            for name, peer in self.nodes.items()
            if peer.session_alive and peer.record is not None
        }
        leader = None
        if self.leader is not None:
            leader = Leader(
                self.leader.node, self.leader.epoch, WALL0, self.leader.node == node.name
            )
        node.last_leader = leader
        return ClusterView(
            session=Session.CONNECTED,
            leader=leader,
            epoch=self.epoch,
            members=members,
            known_nodes=frozenset(NODES),
            absent_since={k: v for k, v in self.absent.items() if k != node.name},
            session_deadline=self.now + TIMEOUT,
        )

    # ---------------------------------------------------------------- the channel

    def send(self, sender: str, to: str, kind: str, seq: int, granted: bool = False) -> None:
        if self.channel[sender] and self.nodes[to].alive:
            self.inbox.append(Message(to, kind, sender, seq, self.now + TICK, granted))

    def _deliver(self) -> None:
        due = [m for m in self.inbox if m.at <= self.now]
        self.inbox = [m for m in self.inbox if m.at > self.now]
        for message in due:
            node = self.nodes[message.to]
            if not node.alive:
                continue
            if message.kind == "ask":
                session = self.kazoo_session(node)
                refusal = grant(node.state, session, self.now - node.contact, node.policy)
                if refusal is None:
                    node.granted[message.sender] = self.now + node.policy.failsafe_lease
                self.send(node.name, message.sender, "answer", message.seq, refusal is None)
            elif message.seq in node.asks and message.granted:  # a refusal renews nothing
                end = node.asks[message.seq] + node.policy.failsafe_lease
                node.held[message.sender] = max(node.held.get(message.sender, end), end)

    # ---------------------------------------------------------------- the agents

    def _snapshot(self, node: Node) -> Snapshot:
        view = self.view(node)
        node.held = {k: v for k, v in node.held.items() if v > self.now}
        grace = node.policy.lease_grace
        node.granted = {k: v for k, v in node.granted.items() if v + grace > self.now}
        result, node.result = node.result, None
        heard = tuple((name, self.now - at) for name, at in sorted(node.heard.items()))
        pulses: tuple[tuple[str, float], ...] = ()
        if self.reaches(node) and node.reach_since is not None:
            pulses = tuple(
                (name, self.now - max(at, node.reach_since))
                for name, at in sorted(self.pulse_at.items())
                if name != node.name
            )
        return Snapshot(
            view,
            LocalView(relay_running=True, relay_ready=True),
            WALL0 + self.now,
            result,
            failsafe_held=tuple(sorted(node.held.items())),
            failsafe_granted=tuple(sorted(node.granted.items())),
            heartbeat_ages=heard,
            pulse_ages=pulses,
        )

    def _run_step(self, node: Node) -> None:
        step = node.state.step
        if step is None or node.step_end is None or self.now < node.step_end:
            return
        node.step_end = None
        ok, epoch, detail = True, 0, ""
        if step is Step.ACQUIRE:
            stale = self.leader is not None and node.stale == (self.leader.node, self.leader.epoch)
            if self.reaches(node) and (self.leader is None or stale):
                self.fast_takeovers += stale
                self.epoch += 1
                epoch = self.epoch
                self.leader = Leader(node.name, epoch, WALL0)
                node.last_leader = Leader(node.name, epoch, WALL0, ours=True)
            else:
                ok, detail = False, "node exists"
        elif step is Step.FENCE:
            peer = self.nodes[other(node.name)]
            if self.fence_works:
                peer.alive = peer.serving = False
            else:
                ok, detail = False, "no fence agent"
        elif step is Step.RELAY:
            node.serving = True
        elif step is Step.DRAIN:
            node.serving = False
        elif step is Step.RELEASE:
            if not self.reaches(node):
                ok, detail = False, "no session"
            elif self.leader is not None and self.leader.node == node.name:
                self.leader = None
            if ok:
                node.last_leader = None
        node.result = StepResult(step, ok, STEP_TIME, detail, epoch)

    def _decide(self, node: Node) -> None:
        snapshot = self._snapshot(node)
        decision = decide(node.state, snapshot, self.now, node.policy)
        node.state = decision.state
        node.seen = snapshot.cluster.session
        active = node.state.role is Role.ACTIVE
        node.due = demotion_due(snapshot, node.policy) if active else None
        if decision.actions:
            action = decision.actions[0]
            node.stale = action.stale_leader
            if action.step is Step.FENCE and decision.state.role is Role.PASSIVE:
                self._check_fence(node)
            # Every step a tick or two; a drain its whole time limit (the worst case).
            took = action.timeout if action.step is Step.DRAIN else STEP_TIME
            node.step_end = self.now + took
        if decision.actions and decision.actions[0].step is PROMOTION[0]:
            self.promotions[node.name] += 1

    def _channel_and_pulses(self) -> None:
        """Heartbeats over the channel; pulses in ZooKeeper, and who reaches it since when."""
        for node in self.nodes.values():
            reaches = self.reaches(node)
            if not reaches:
                node.reach_since = None
            elif node.reach_since is None:
                node.reach_since = self.now
            beats = node.alive and pulsing(node.state)
            if not beats:
                node.pulsing_since = None
            elif node.pulsing_since is None:
                node.pulsing_since = self.now
            if beats and reaches and node.session_alive:
                self.pulse_at[node.name] = self.now
            peer = self.nodes[other(node.name)]
            if node.alive and self.channel[node.name] and peer.alive:
                peer.heard[node.name] = self.now

    def _check_fence(self, node: Node) -> None:
        """A fence of the silent leader, begun now: was it pulsing in view all along?"""
        target = self.nodes[other(node.name)]
        since = self.now - node.policy.peer_timeout
        seen = node.reach_since is not None and node.reach_since <= since
        reached = target.reach_since is not None and target.reach_since <= since
        pulsed = target.pulsing_since is not None and target.pulsing_since <= since
        self.false_fences += seen and reached and pulsed and target.alive

    def tick(self) -> None:
        self.now += TICK
        self._expire_sessions()
        if self.heartbeats:
            self._channel_and_pulses()
        self._deliver()
        for node in self.nodes.values():
            if not node.alive:
                continue
            self._run_step(node)
            if not self.read_blocked(node):
                self._decide(node)
            if self.reaches(node):
                node.record = Member(
                    node.name,
                    node.state.role,
                    relay_running=True,
                    holds=holds_resources(node.state),
                )
            # The agent's asks: kazoo's view, or the last decision's when kazoo says connected.
            session = self.kazoo_session(node)
            if session is Session.CONNECTED:
                session = node.seen
            if should_ask(node.state, session, self.now - node.contact, node.policy):
                self.seq += 1
                node.asks[self.seq] = self.now
                self.send(node.name, other(node.name), "ask", self.seq)
        serving = [name for name, node in self.nodes.items() if node.serving and node.alive]
        self.overlaps += len(serving) > 1
        for name in serving:
            self.last_serving[name] = self.now
            self.serving_time[name] += TICK
            if self.nodes[name].state.failsafe_since is not None:
                self.failsafe_time[name] += TICK

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / TICK)):
            self.tick()
            assert self.overlaps == 0, f"two nodes serving at {self.now:.2f}"

    def perturb(self, rng: random.Random, quorum: float, reach: float, channel: float) -> None:
        """One random event, by the cumulative odds given (the rest: nothing), then a random
        while of it: the quorum lost or back, a node cut off from ZooKeeper or back, a node's
        outgoing peer channel cut or back."""
        event = rng.random()
        if event < quorum:
            self.set_quorum(not self.quorum)
        elif event < reach:
            node = self.nodes[rng.choice(NODES)]
            node.reach = not node.reach
        elif event < channel:
            name = rng.choice(NODES)
            self.channel[name] = not self.channel[name]
        self.run(rng.choice((0.2, 1.0, 2.0, 4.0)))

    def active(self) -> str | None:
        serving = [name for name, node in self.nodes.items() if node.serving and node.alive]
        return serving[0] if serving else None
