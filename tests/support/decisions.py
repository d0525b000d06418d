"""The harness of the decision tests (tests/test_state_*.py): plain data, no clock, no patching.

``World`` is what the next snapshot reports, ``Walk`` one agent over time with its decision log
(the executor is simulated by delivering a ``StepResult`` for the step in flight), ``Pair``
agents sharing one ZooKeeper; the builders make states and members by hand, the grid a set of
states and snapshots to sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cluster.decision_data import (
    PROMOTION,
    Action,
    AgentState,
    ClusterView,
    Decision,
    Leader,
    LocalView,
    LocationVerdict,
    Member,
    Pause,
    Policy,
    Role,
    ScheduledSwitchover,
    Session,
    Snapshot,
    Step,
    StepResult,
    Switchover,
    Trigger,
)
from cluster.state import decide
from cluster.takeover import holds_resources, pulsing

# ---------------------------------------- the world, and one agent walking through it


NODE = "alpha"
PEER = "beta"
OTHER = "gamma"
POLICY = Policy(node=NODE, failsafe_peers=frozenset({PEER}))
NOW = 1000.0  # monotonic
WALL = 1_700_000_000.0  # wall clock
EPOCH = 7
PAUSE = Pause(by="operator", at=WALL - 60, reason="maintenance")


def ours(epoch: int = EPOCH) -> Leader:
    """The leader znode, held by this agent's session."""
    return Leader(NODE, epoch, since=WALL, ours=True)


def theirs(epoch: int = EPOCH) -> Leader:
    """The leader znode, held by the peer."""
    return Leader(PEER, epoch, since=WALL)


def ok(step: Step, epoch: int = 0, seconds: float = 0.5) -> StepResult:
    return StepResult(step, True, seconds, epoch=epoch)


def failed(step: Step) -> StepResult:
    return StepResult(step, False, 0.5, detail="boom")


# Two check locations that see the service down since this term began (``ours()``: WALL).
GRAY_SEEN = tuple(
    LocationVerdict(name, WALL, ("vip-smtp",), (("vip-smtp", WALL),)) for name in ("inet", "client")
)


def ready(node: str) -> Member:
    """A member that can take over: passive, its warm relay running, not cooling down."""
    return Member(node=node, role=Role.PASSIVE, relay_running=True, relay_ready=True)


def ready_peer() -> dict[str, Member]:
    """The members of a pair whose peer is ready to take over."""
    return {PEER: ready(PEER)}


@dataclass
class World:
    """What the next snapshot reports; tests change its fields between decisions."""

    session: Session = Session.CONNECTED
    leader: Leader | None = None
    epoch: int = EPOCH - 1
    epoch_node: str | None = PEER
    paused: Pause | None = None
    switchover: Switchover | None = None
    last_failover: float | None = None
    last_served: float | None = None
    relay_running: bool = True
    relay_ready: bool = True
    relay_failures: int = 0
    members: dict[str, Member] = field(default_factory=dict)  # the others' heartbeats
    stopping: bool = False  # the agent got SIGTERM
    absent_since: dict[str, float] = field(default_factory=dict)  # sessions seen to have ended
    known: frozenset[str] = frozenset()  # every node that ever joined
    outdated: frozenset[str] = frozenset()  # replicas DRBD's fence-peer handler marked
    split_brain: str | None = None
    session_deadline: float | None = None  # monotonic: the session surely lives on until then
    scheduled: ScheduledSwitchover | None = None  # a switchover stored for a later time
    locations: tuple[LocationVerdict, ...] = ()  # what the check locations see (gray failure)
    heartbeat_ages: dict[str, float] = field(default_factory=dict)  # peers heard over the channel
    failsafe_held: dict[str, float] = field(default_factory=dict)  # leases peers granted it
    failsafe_granted: dict[str, float] = field(default_factory=dict)  # leases it granted
    pulse_ages: dict[str, float] = field(default_factory=dict)  # peers' pulses in ZooKeeper

    def snapshot(self, wall: float, result: StepResult | None = None) -> Snapshot:
        cluster = ClusterView(
            session=self.session,
            session_deadline=self.session_deadline,
            leader=self.leader,
            epoch=self.epoch,
            epoch_node=self.epoch_node,
            members=dict(self.members),
            paused=self.paused,
            switchover=self.switchover,
            last_failover=self.last_failover,
            last_served=self.last_served,
            absent_since=dict(self.absent_since),
            known_nodes=self.known,
            outdated=self.outdated,
            split_brain=self.split_brain,
            scheduled_switchover=self.scheduled,
        )
        local = LocalView(
            relay_running=self.relay_running,
            relay_ready=self.relay_ready,
            relay_failures=self.relay_failures,
            stopping=self.stopping,
        )
        return Snapshot(
            cluster,
            local,
            wall,
            result,
            location_verdicts=self.locations,
            heartbeat_ages=tuple(sorted(self.heartbeat_ages.items())),
            failsafe_held=tuple(sorted(self.failsafe_held.items())),
            failsafe_granted=tuple(sorted(self.failsafe_granted.items())),
            pulse_ages=tuple(sorted(self.pulse_ages.items())),
        )


class Walk:
    """One agent over time: its state, the world it sees and the clocks, with a decision log."""

    def __init__(
        self,
        state: AgentState | None = None,
        world: World | None = None,
        policy: Policy = POLICY,
    ) -> None:
        self.state = AgentState() if state is None else state
        self.world = World() if world is None else world
        self.policy = policy
        self.now = NOW
        self.wall = WALL
        self.log: list[Decision] = []

    def tick(self, seconds: float = 0.25) -> None:
        self.now += seconds
        self.wall += seconds

    def decide(self, result: StepResult | None = None) -> Decision:
        snapshot = self.world.snapshot(self.wall, result)
        decision = decide(self.state, snapshot, self.now, self.policy)
        self.state = decision.state
        self.log.append(decision)
        return decision

    def see(self) -> Decision:
        """A snapshot without a step result (a watch fired, a heartbeat ticked)."""
        return self.decide()

    def finish(
        self, success: bool = True, *, epoch: int = 0, seconds: float = 0.5, detail: str = ""
    ) -> Decision:
        """The executor reports the outcome of the step in flight."""
        step = self.state.step
        assert step is not None, "no step in flight"
        return self.decide(StepResult(step, success, seconds, detail, epoch))

    def actions(self) -> list[Action]:
        return [action for decision in self.log for action in decision.actions]


def eligible() -> Walk:
    """A passive node whose next snapshot shows a vacant leadership it may take."""
    return Walk(AgentState(role=Role.PASSIVE))


def start_promotion(walk: Walk) -> Decision:
    decision = walk.see()
    assert decision.trigger is Trigger.LEADER_VACANT
    assert [a.step for a in decision.actions] == [Step.ACQUIRE]
    return decision


def acquire(walk: Walk, epoch: int = EPOCH) -> Decision:
    """ACQUIRE succeeds: the leader znode is now this session's, in a new term."""
    assert walk.state.step is Step.ACQUIRE
    walk.world.leader = ours(epoch)
    walk.world.epoch = epoch
    walk.world.epoch_node = NODE
    walk.tick()
    return walk.finish(epoch=epoch)


def promote_until(walk: Walk, step: Step, epoch: int = EPOCH) -> None:
    """From a vacant leadership, promote successfully until ``step`` is in flight."""
    start_promotion(walk)
    if step is Step.ACQUIRE:
        return
    acquire(walk, epoch)
    while walk.state.step is not step:
        assert walk.state.role is Role.PROMOTING
        walk.tick()
        walk.finish()


def promote(walk: Walk, epoch: int = EPOCH) -> None:
    """A whole successful promotion from a vacant leadership."""
    promote_until(walk, Step.PUBLISH, epoch)
    walk.tick()
    decision = walk.finish()
    assert decision.state.role is Role.ACTIVE
    assert decision.actions == ()


def finish_demotion(walk: Walk) -> list[Step]:
    """Let every demotion step succeed; the steps run, in order, from the one in flight."""
    steps: list[Step] = []
    for _ in range(10):
        if walk.state.role is not Role.DEMOTING:
            return steps
        step = walk.state.step
        assert step is not None
        steps.append(step)
        if step is Step.RELEASE and walk.world.leader is not None and walk.world.leader.ours:
            walk.world.leader = None
        walk.tick()
        walk.finish()
    raise AssertionError(f"demotion did not end: {walk.state}")


# ---------------------------------------- states built by hand, and the cases of the table


def promoting(step: Step, epoch: int = EPOCH) -> AgentState:
    """A promotion with every step before ``step`` done and ``step`` in flight."""
    done = PROMOTION[: PROMOTION.index(step)]
    return AgentState(
        role=Role.PROMOTING,
        epoch=0 if step is Step.ACQUIRE else epoch,
        step=step,
        started=NOW - 2,
        steps=tuple((s, 0.5) for s in done),
        reason="leader vacant",
        previous=PEER,
    )


def active(**changes: object) -> AgentState:
    state = AgentState(
        role=Role.ACTIVE,
        epoch=EPOCH,
        started=NOW - 10,
        steps=tuple((s, 0.5) for s in PROMOTION),
        reason="leader vacant",
        previous=PEER,
    )
    return replace(state, **changes)  # type: ignore[arg-type]


def demoting(step: Step | None, **changes: object) -> AgentState:
    state = AgentState(role=Role.DEMOTING, epoch=EPOCH, step=step, started=NOW - 1)
    return replace(state, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Case:
    """A state and snapshot that ``classify`` maps to one trigger, and the steps it must start."""

    state: AgentState
    world: World
    result: StepResult | None = None
    steps: tuple[Step, ...] = ()


START = Step.START_RELAY
RESTART = Step.RESTART_RELAY


@dataclass(frozen=True)
class Refined:
    """A row that ``refine`` reaches from what ``classify`` saw (``cause``): a special rule."""

    key: tuple[Role, Trigger]
    cause: Trigger
    state: AgentState
    world: World
    result: StepResult | None
    steps: tuple[Step, ...] = ()


# ---------------------------------------- the grid of states and snapshots


def grid_states() -> list[AgentState]:
    """States an agent can be in, with and without a step in flight, for every role."""
    return [
        AgentState(),
        AgentState(step=START),
        AgentState(retry_at=NOW + 1, attempts=1),
        AgentState(role=Role.FAILED, attempts=3),
        AgentState(role=Role.FAILED, attempts=3, step=START),
        AgentState(role=Role.FAILED, attempts=3, retry_at=NOW + 1),
        AgentState(role=Role.PASSIVE),
        AgentState(role=Role.PASSIVE, step=START),
        AgentState(role=Role.PASSIVE, retry_at=NOW + 1),
        AgentState(role=Role.PASSIVE, cooldown_until=NOW + 1),
        AgentState(role=Role.PASSIVE, step=Step.FENCE, silent_leader=(PEER, EPOCH)),
        AgentState(role=Role.PASSIVE, channel_silent=PEER),
        promoting(Step.ACQUIRE),
        promoting(Step.FENCE),
        promoting(Step.STORAGE),
        promoting(Step.PUBLISH),
        replace(promoting(Step.FENCE), step=None, retry_step=Step.FENCE, retry_at=NOW + 1),
        replace(promoting(Step.FENCE), step=None, retry_step=Step.FENCE, retry_at=NOW),
        active(),
        active(step=RESTART, attempts=1),
        active(failsafe_since=NOW - 1),
        demoting(Step.DRAIN),
        demoting(Step.RELEASE, give_up=True),
        demoting(Step.RELEASE, reason="stray leader", epoch=0),
        demoting(None, retry_step=Step.STORAGE_DOWN, retry_at=NOW + 1),
        demoting(None, retry_step=Step.STORAGE_DOWN, retry_at=NOW),
        demoting(None, retry_step=Step.RELEASE, retry_at=NOW + 1, attempts=1),
    ]


def grid_worlds() -> list[World]:
    worlds = []
    for session in Session:
        for leader in (None, ours(), theirs()):
            for running in (False, True):
                for failures in (0, POLICY.relay_failure_limit):
                    for paused in (None, PAUSE):
                        for switchover in (
                            None,
                            Switchover(NODE, None, WALL),
                            Switchover(PEER, NODE, WALL),
                        ):
                            for members in ({}, ready_peer()):
                                for stopping in (False, True):
                                    # The peer heard lately, or silent past peer_timeout.
                                    for age in (0.1, 2.0):
                                        worlds.append(
                                            World(
                                                session=session,
                                                leader=leader,
                                                relay_running=running,
                                                relay_failures=failures,
                                                paused=paused,
                                                switchover=switchover,
                                                members=members,
                                                stopping=stopping,
                                                heartbeat_ages={PEER: age},
                                                # With a peer: it holds this node a lease.
                                                failsafe_held={PEER: NOW + 2} if members else {},
                                                # ... and its pulse advances (given only while
                                                # connected); without: no pulse znode.
                                                pulse_ages={PEER: 0.2}
                                                if members and session is Session.CONNECTED
                                                else {},
                                            )
                                        )
    # A gray failure seen by the check locations, where it can matter: a connected leader.
    leading = [w for w in worlds if w.session is Session.CONNECTED and w.leader == ours()]
    return worlds + [replace(world, locations=GRAY_SEEN) for world in leading]


GRID_WORLDS = grid_worlds()


def grid_results(state: AgentState) -> list[StepResult | None]:
    if state.step is None:
        return [None]
    epoch = EPOCH if state.step is Step.ACQUIRE else 0
    return [None, ok(state.step, epoch), failed(state.step)]


def holding(state: AgentState) -> bool:
    """Active, or promoting in a term it took: the node whose resources the peer must wait for."""
    return state.role is Role.ACTIVE or (state.role is Role.PROMOTING and state.epoch > 0)


def graceful_drain(state: AgentState) -> bool:
    """Demoting with a drain in flight that gives deliveries their full time."""
    urgent = POLICY.drain_time(state.reason) == POLICY.urgent_drain_timeout
    return state.role is Role.DEMOTING and state.step is Step.DRAIN and not urgent


# ------------------------------------------------------------------ what befalls an active node


def set_session_suspended(walk: Walk) -> None:
    walk.world.session = Session.SUSPENDED


def set_session_lost(walk: Walk) -> None:
    walk.world.session = Session.LOST
    walk.world.leader = None  # the ephemeral leader znode went with the session


def set_leadership_lost(walk: Walk) -> None:
    walk.world.leader = theirs(EPOCH + 1)


def fail_the_restart(walk: Walk) -> Decision:
    return walk.finish(False, detail="spool locked")


LOSSES: dict[str, tuple[Callable[[Walk], None], Trigger]] = {
    "suspended": (set_session_suspended, Trigger.SESSION_LOST),
    "lost": (set_session_lost, Trigger.SESSION_LOST),
    "leader": (set_leadership_lost, Trigger.LEADERSHIP_LOST),
}


# ------------------------------------------------------------------ the others' records


def member(node: str, **changes: object) -> Member:
    return replace(ready(node), **changes)  # type: ignore[arg-type]


# Why a member cannot take over: how its record differs from a ready one.
UNREADY: dict[str, dict[str, object]] = {
    "starting": {"role": Role.STARTING},
    "failed": {"role": Role.FAILED},
    "promoting": {"role": Role.PROMOTING},
    "active": {"role": Role.ACTIVE, "holds": True},
    "demoting": {"role": Role.DEMOTING, "holds": True},
    "relay down": {"relay_running": False, "relay_ready": False},
    "cooling down": {"cooldown": True},
}


def unready(node: str, why: str) -> Member:
    return member(node, **UNREADY[why])


# ------------------------------------------------------------------ agents sharing one ZooKeeper


class Pair:
    """Agents sharing one ZooKeeper; each publishes ``holds_resources`` of its state at once."""

    def __init__(self, states: dict[str, AgentState]) -> None:
        self.states = dict(states)
        self.connected = set(states)  # agents whose session, and so member znode, is alive
        self.suspended: set[str] = set()  # agents whose connection is lost for now
        self.leader: str | None = None
        self.epoch = EPOCH - 1
        self.epoch_node: str | None = None
        self.switchover: Switchover | None = None
        self.now = NOW
        self.wall = WALL
        self.fenced: list[tuple[str, ...]] = []  # the targets of every FENCE action, in order
        # The peer channel: since when each node's heartbeats have not been heard (a dead node,
        # or a live one cut off or stalled); the others' are heard fresh.
        self.silent_since: dict[str, float] = {}
        # Their pulses in ZooKeeper: since when each node's has not advanced (a dead or stalled
        # node; a cut peer channel leaves it alone); the others' advance while ``pulsing``.
        self.pulse_since: dict[str, float] = {}
        self.dead: set[str] = set()  # fenced (powered off): decides nothing; session lingers
        self.started: dict[str, Action] = {}  # each node's action in flight

    def record(self, node: str) -> Member:
        state = self.states[node]
        return Member(
            node=node,
            role=state.role,
            epoch=state.epoch,
            relay_running=True,
            relay_ready=True,
            cooldown=self.now < state.cooldown_until,
            holds=holds_resources(state),
        )

    def snapshot(self, node: str, result: StepResult | None = None) -> Snapshot:
        leader = None
        if self.leader is not None:
            leader = Leader(self.leader, self.epoch, since=WALL, ours=self.leader == node)
        view = ClusterView(
            session=Session.SUSPENDED if node in self.suspended else Session.CONNECTED,
            leader=leader,
            epoch=self.epoch,
            epoch_node=self.epoch_node,
            members={name: self.record(name) for name in sorted(self.connected)},
            switchover=self.switchover,
            known_nodes=frozenset(self.states),
        )
        ages = tuple(
            (name, self.now - self.silent_since.get(name, self.now))
            for name in sorted(self.states)
            if name != node
        )
        # A pulse znode lives with its node's session; one that never pulsed has none.
        pulses = tuple(
            (name, self.now - self.pulse_since.get(name, self.now))
            for name in sorted(self.connected)
            if name != node and (name in self.pulse_since or pulsing(self.states[name]))
        )
        if node in self.suspended:  # given only while connected
            pulses = ()
        local = LocalView(relay_running=True, relay_ready=True)
        return Snapshot(view, local, self.wall, result, heartbeat_ages=ages, pulse_ages=pulses)

    def decide(self, node: str, result: StepResult | None = None) -> Decision:
        snapshot = self.snapshot(node, result)
        decision = decide(self.states[node], snapshot, self.now, Policy(node=node))
        self.states[node] = decision.state
        self.fenced.extend(a.fence for a in decision.actions if a.step is Step.FENCE)
        for action in decision.actions:
            self.started[node] = action
        return decision

    def execute(self, node: str) -> StepResult:
        """The executor runs ``node``'s step in flight against the shared ZooKeeper."""
        step = self.states[node].step
        assert step is not None
        self.now += 0.1
        self.wall += 0.1
        action = self.started.get(node)
        if step is Step.ACQUIRE:
            # Replacing a stale leader znode: the transaction checks that it is still the one.
            stale = action.stale_leader if action is not None else None
            if self.leader is not None and stale != (self.leader, self.epoch):
                return StepResult(step, False, 0.1, "node exists")
            self.epoch += 1
            self.leader = self.epoch_node = node
            return StepResult(step, True, 0.1, epoch=self.epoch)
        if step is Step.RELEASE and self.leader == node:
            self.leader = None
        if step is Step.PUBLISH:
            self.switchover = None
        if step is Step.FENCE and action is not None:
            for target in action.fence:  # powered off: stops deciding and heartbeating
                self.dead.add(target)
                self.silent_since.setdefault(target, self.now)
                self.pulse_since.setdefault(target, self.now)
        return StepResult(step, True, 0.1)

    def run(self, node: str) -> Decision:
        return self.decide(node, self.execute(node))

    def settle(self) -> None:
        """Every agent runs its steps to the end, in turns, until nothing is in flight."""
        for _ in range(50):
            busy = [name for name in sorted(self.connected) if self.states[name].step]
            if not busy:
                return
            for name in busy:
                self.run(name)
            for name in sorted(self.connected):
                self.decide(name)
        raise AssertionError(f"the pair did not settle: {self.states}")
