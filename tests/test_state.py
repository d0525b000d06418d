"""The agent's pure decision core: every row of the table, whole walks, safety rules, invariants.

Everything here is plain data. States and snapshots are built by hand (or drawn at random from a
seeded generator) and handed to ``decide``; there is no clock, no ZooKeeper and no patching. The
executor is simulated by delivering a ``StepResult`` for the step in flight.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest

from cluster.state import (
    DEMOTION,
    PROMOTION,
    TRANSITIONS,
    Action,
    AgentState,
    ClusterView,
    Decision,
    Leader,
    LocalView,
    Member,
    Pause,
    Policy,
    Role,
    Session,
    Snapshot,
    Step,
    StepResult,
    Switchover,
    Takeover,
    Then,
    Trigger,
    classify,
    decide,
    fence_targets,
    holds_resources,
    lease_verdict,
    refine,
)

NODE = "alpha"
PEER = "beta"
OTHER = "gamma"
POLICY = Policy(node=NODE)
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
    relay_running: bool = True
    relay_ready: bool = True
    relay_failures: int = 0
    members: dict[str, Member] = field(default_factory=dict)  # the others' heartbeats
    stopping: bool = False  # the agent got SIGTERM
    absent_since: dict[str, float] = field(default_factory=dict)  # sessions seen to have ended
    known: frozenset[str] = frozenset()  # every node that ever joined
    outdated: frozenset[str] = frozenset()  # replicas DRBD's fence-peer handler marked
    split_brain: str | None = None

    def snapshot(self, wall: float, result: StepResult | None = None) -> Snapshot:
        cluster = ClusterView(
            session=self.session,
            leader=self.leader,
            epoch=self.epoch,
            epoch_node=self.epoch_node,
            members=dict(self.members),
            paused=self.paused,
            switchover=self.switchover,
            last_failover=self.last_failover,
            absent_since=dict(self.absent_since),
            known_nodes=self.known,
            outdated=self.outdated,
            split_brain=self.split_brain,
        )
        local = LocalView(
            relay_running=self.relay_running,
            relay_ready=self.relay_ready,
            relay_failures=self.relay_failures,
            stopping=self.stopping,
        )
        return Snapshot(cluster, local, wall, result)


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


# ------------------------------------------------------------------ every row of the table


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
CASES: dict[tuple[Role, Trigger], Case] = {
    (Role.STARTING, Trigger.RELAY_DOWN): Case(
        AgentState(), World(relay_running=False), steps=(START,)
    ),
    (Role.STARTING, Trigger.RELAY_WARM): Case(AgentState(attempts=2), World()),
    (Role.STARTING, Trigger.STEP_DONE): Case(AgentState(step=START), World(), ok(START)),
    (Role.STARTING, Trigger.STEP_FAILED): Case(
        AgentState(step=START), World(relay_running=False), failed(START)
    ),
    (Role.PASSIVE, Trigger.RELAY_DOWN): Case(
        AgentState(role=Role.PASSIVE), World(relay_running=False), steps=(START,)
    ),
    (Role.PASSIVE, Trigger.STEP_DONE): Case(
        AgentState(role=Role.PASSIVE, step=START, attempts=1), World(leader=theirs()), ok(START)
    ),
    (Role.PASSIVE, Trigger.STEP_FAILED): Case(
        AgentState(role=Role.PASSIVE, step=START),
        World(leader=theirs(), relay_running=False),
        failed(START),
    ),
    (Role.PASSIVE, Trigger.LEADER_VACANT): Case(
        AgentState(role=Role.PASSIVE), World(), steps=(Step.ACQUIRE,)
    ),
    (Role.PASSIVE, Trigger.LEADER_STRAY): Case(
        AgentState(role=Role.PASSIVE), World(leader=ours()), steps=(Step.RELEASE,)
    ),
    (Role.PROMOTING, Trigger.STEP_DONE): Case(
        promoting(Step.FENCE), World(leader=ours()), ok(Step.FENCE), steps=(Step.STORAGE,)
    ),
    (Role.PROMOTING, Trigger.STEP_FAILED): Case(
        promoting(Step.STORAGE), World(leader=ours()), failed(Step.STORAGE), steps=(Step.DRAIN,)
    ),
    (Role.PROMOTING, Trigger.FENCE_FAILED): Case(
        promoting(Step.FENCE),
        World(leader=ours(), absent_since={PEER: NOW - 0.5}),
        failed(Step.FENCE),
    ),
    (Role.PROMOTING, Trigger.RETRY): Case(
        replace(
            promoting(Step.FENCE),
            step=None,
            retry_step=Step.FENCE,
            retry_at=NOW - 0.1,
            waiting_since=NOW - 1.4,
            steps=((Step.ACQUIRE, 0.01), (Step.FENCE, 0.5)),
        ),
        World(leader=ours(), absent_since={PEER: NOW - 2.1}),
        steps=(Step.STORAGE,),
    ),
    (Role.PROMOTING, Trigger.SESSION_LOST): Case(
        promoting(Step.FENCE),
        World(session=Session.SUSPENDED, leader=ours()),
        ok(Step.FENCE),
        steps=(Step.DRAIN,),
    ),
    (Role.PROMOTING, Trigger.LEADERSHIP_LOST): Case(
        promoting(Step.FENCE), World(leader=None), ok(Step.FENCE), steps=(Step.DRAIN,)
    ),
    (Role.PROMOTING, Trigger.STOP): Case(
        promoting(Step.STORAGE),
        World(leader=ours(), stopping=True),
        ok(Step.STORAGE),
        steps=(Step.DRAIN,),
    ),
    (Role.ACTIVE, Trigger.SESSION_LOST): Case(
        active(), World(session=Session.LOST, leader=ours()), steps=(Step.DRAIN,)
    ),
    (Role.ACTIVE, Trigger.LEADERSHIP_LOST): Case(
        active(), World(leader=theirs(EPOCH + 1)), steps=(Step.DRAIN,)
    ),
    (Role.ACTIVE, Trigger.SWITCHOVER): Case(
        active(),
        World(leader=ours(), switchover=Switchover(NODE, PEER, WALL - 1), members=ready_peer()),
        steps=(Step.DRAIN,),
    ),
    (Role.ACTIVE, Trigger.SWITCHOVER_REFUSED): Case(
        active(),
        World(
            leader=ours(),
            switchover=Switchover(NODE, PEER, WALL - 1),
            members=ready_peer(),
            outdated=frozenset({PEER}),
        ),
    ),
    (Role.ACTIVE, Trigger.STOP): Case(
        active(), World(leader=ours(), stopping=True), steps=(Step.DRAIN,)
    ),
    (Role.ACTIVE, Trigger.RELAY_UNHEALTHY): Case(
        active(),
        World(leader=ours(), relay_failures=POLICY.relay_failure_limit),
        steps=(Step.DRAIN,),
    ),
    (Role.ACTIVE, Trigger.RELAY_DOWN): Case(
        active(), World(leader=ours(), relay_running=False), steps=(RESTART,)
    ),
    (Role.ACTIVE, Trigger.STEP_DONE): Case(
        active(step=RESTART, attempts=1), World(leader=ours()), ok(RESTART)
    ),
    (Role.ACTIVE, Trigger.STEP_FAILED): Case(
        active(step=RESTART), World(leader=ours(), relay_running=False), failed(RESTART)
    ),
    (Role.DEMOTING, Trigger.STEP_DONE): Case(
        demoting(Step.DRAIN), World(leader=ours()), ok(Step.DRAIN), steps=(Step.VIP_DOWN,)
    ),
    (Role.DEMOTING, Trigger.STEP_FAILED): Case(
        demoting(Step.VIP_DOWN), World(leader=ours()), failed(Step.VIP_DOWN)
    ),
    (Role.DEMOTING, Trigger.SESSION_LOST): Case(
        demoting(Step.DRAIN, reason=Trigger.SWITCHOVER.value),
        World(session=Session.SUSPENDED, leader=ours()),
        steps=(Step.DRAIN,),
    ),
    (Role.DEMOTING, Trigger.RETRY): Case(
        demoting(None, retry_step=Step.VIP_DOWN, retry_at=NOW, attempts=1),
        World(leader=ours()),
        steps=(Step.VIP_DOWN,),
    ),
    (Role.FAILED, Trigger.RELAY_DOWN): Case(
        AgentState(role=Role.FAILED, attempts=3, retry_at=NOW),
        World(relay_running=False),
        steps=(START,),
    ),
    (Role.FAILED, Trigger.RELAY_WARM): Case(AgentState(role=Role.FAILED, attempts=3), World()),
    (Role.FAILED, Trigger.STEP_DONE): Case(
        AgentState(role=Role.FAILED, step=START, attempts=3), World(), ok(START)
    ),
    (Role.FAILED, Trigger.STEP_FAILED): Case(
        AgentState(role=Role.FAILED, step=START, attempts=3),
        World(relay_running=False),
        failed(START),
    ),
}


def test_every_row_of_the_table_has_a_case() -> None:
    assert set(CASES) | {case.key for case in REFINED.values()} == set(TRANSITIONS)


def check_effect(then: Then, before: AgentState, case: Case, decision: Decision) -> None:
    """What each kind of transition promises besides its role and the steps it starts."""
    after = decision.state
    result = case.result
    match then:
        case Then.NOTHING:
            assert after == replace(before, role=after.role)
        case Then.START_RELAY:
            assert after.attempts == before.attempts
        case Then.RESTART_RELAY:
            recent = NOW - before.restarted_at <= POLICY.relay_restart_window
            assert after.attempts == (before.attempts if recent else 0) + 1
            assert after.restarted_at == NOW
        case Then.RELAY_STARTED:
            # In place, restarts are counted over a window, not reset by one that worked.
            assert after.attempts == (before.attempts if before.role is Role.ACTIVE else 0)
        case Then.RELAY_START_FAILED:
            if before.role is Role.ACTIVE:
                assert after.attempts == before.attempts
            else:
                assert after.attempts == before.attempts + 1
                assert after.retry_at == NOW + POLICY.retry_interval
        case Then.BEGIN_PROMOTION:
            assert after.epoch == 0
            assert after.previous == PEER
            assert after.reason == "leader vacant"
            assert after.started == NOW
            assert after.steps == ()
            assert after.cooldown_until == before.cooldown_until
        case Then.NEXT_PROMOTION_STEP:
            assert result is not None
            assert after.steps == (*before.steps, (result.step, result.seconds))
            assert after.epoch == before.epoch
        case Then.CHECK_LEASES:
            assert after.epoch == before.epoch
            if result is not None:  # fencing failed just now: wait for the peer's lease
                assert after.steps == (*before.steps, (result.step, result.seconds))
                assert after.retry_step is Step.FENCE and after.waiting_since == NOW
                assert after.retry_at == NOW - 0.5 + POLICY.lease_grace
                assert "waiting for the leases to expire" in decision.note
            else:  # the wait is over: the waited time is FENCE's
                assert after.retry_step is None
                assert after.steps == (*before.steps[:-1], (Step.FENCE, 0.5 + 1.4))
                assert "going on: leases expired" in decision.note
        case Then.CUT_DRAIN_SHORT:
            assert after.give_up is before.give_up
            assert after.reason == Trigger.SESSION_LOST.value
            (drain,) = decision.actions
            assert drain.step is Step.DRAIN and drain.timeout == POLICY.urgent_drain_timeout
        case Then.BEGIN_DEMOTION | Then.BEGIN_GIVING_UP | Then.ROLL_BACK:
            assert after.give_up is (then is not Then.BEGIN_DEMOTION)
            assert after.started == NOW
            assert after.steps == ()
            assert after.epoch == EPOCH
            assert after.reason == decision.trigger.value
            (drain,) = decision.actions
            assert drain.timeout == POLICY.drain_time(decision.trigger.value)
            assert drain.reason == decision.note
            assert holds_resources(after)  # nothing is released before its demotion step
        case Then.NEXT_DEMOTION_STEP:
            assert result is not None
            assert after.steps == (*before.steps, (result.step, result.seconds))
            assert after.give_up is before.give_up
        case Then.RETRY_DEMOTION_STEP:
            if result is not None:
                assert after.attempts == before.attempts + 1
                assert after.retry_at == NOW + POLICY.retry_interval
                assert after.retry_step is result.step
            else:
                assert after.retry_step is None
                assert after.attempts == before.attempts
        case Then.REFUSE_SWITCHOVER:
            assert after == before
            assert decision.note.startswith(f"switchover refused: {PEER} cannot take over: ")
        case Then.RELEASE_ONLY:
            assert after.reason == "stray leader"
            assert after.give_up is False


@pytest.mark.parametrize("key", list(CASES), ids=lambda key: f"{key[0].value}-{key[1].value}")
def test_each_row_moves_to_its_role_and_starts_its_steps(key: tuple[Role, Trigger]) -> None:
    role, trigger = key
    case = CASES[key]
    transition = TRANSITIONS[key]
    snapshot = case.world.snapshot(WALL, case.result)
    assert case.state.role is role
    assert classify(case.state, snapshot, NOW, POLICY) is trigger

    decision = decide(case.state, snapshot, NOW, POLICY)

    assert decision.trigger is trigger
    assert decision.state.role is transition.to
    assert tuple(a.step for a in decision.actions) == case.steps
    assert decision.state.step is (case.steps[0] if case.steps else None)
    for action in decision.actions:
        assert action.epoch == decision.state.epoch
        if action.step is not Step.DRAIN:
            assert action.timeout == POLICY.timeout(action.step)
    assert decision.changed is (bool(decision.actions) or decision.note != "")
    check_effect(transition.then, case.state, case, decision)


@dataclass(frozen=True)
class Refined:
    """A row that ``refine`` reaches from what ``classify`` saw (``cause``): a special rule."""

    key: tuple[Role, Trigger]
    cause: Trigger
    state: AgentState
    world: World
    result: StepResult | None
    steps: tuple[Step, ...] = ()


# Each special rule. Before them, the cause's own row said one role and its effect sent the node
# to another: the table was not the whole truth.
REFINED: dict[str, Refined] = {
    "starting: too many failed starts": Refined(
        (Role.STARTING, Trigger.RELAY_START_EXHAUSTED),
        Trigger.STEP_FAILED,
        AgentState(step=START, attempts=POLICY.relay_start_limit - 1),
        World(relay_running=False),
        failed(START),
    ),
    "passive: too many failed starts": Refined(
        (Role.PASSIVE, Trigger.RELAY_START_EXHAUSTED),
        Trigger.STEP_FAILED,
        AgentState(role=Role.PASSIVE, step=START, attempts=POLICY.relay_start_limit - 1),
        World(relay_running=False),
        failed(START),
    ),
    "active: the relay died once too often": Refined(
        (Role.ACTIVE, Trigger.RELAY_UNHEALTHY),
        Trigger.RELAY_DOWN,
        active(attempts=POLICY.relay_restart_limit, restarted_at=NOW - 1),
        World(leader=ours(), relay_running=False),
        None,
        (Step.DRAIN,),
    ),
    "promoting: publish done": Refined(
        (Role.PROMOTING, Trigger.PROMOTED),
        Trigger.STEP_DONE,
        promoting(Step.PUBLISH),
        World(leader=ours()),
        ok(Step.PUBLISH),
    ),
    "promoting: acquire lost": Refined(
        (Role.PROMOTING, Trigger.LEADERSHIP_NOT_TAKEN),
        Trigger.STEP_FAILED,
        promoting(Step.ACQUIRE),
        World(leader=theirs(EPOCH)),
        failed(Step.ACQUIRE),
    ),
    "promoting: stopping when acquire succeeds": Refined(
        (Role.PROMOTING, Trigger.LEADERSHIP_NOT_TAKEN),
        Trigger.STOP,
        promoting(Step.ACQUIRE),
        World(leader=ours(), stopping=True),
        ok(Step.ACQUIRE, EPOCH),
    ),
    "promoting: stopping when acquire fails": Refined(
        (Role.PROMOTING, Trigger.LEADERSHIP_NOT_TAKEN),
        Trigger.STOP,
        promoting(Step.ACQUIRE),
        World(leader=theirs(), stopping=True),
        failed(Step.ACQUIRE),
    ),
    "promoting: session lost as acquire succeeds": Refined(
        (Role.PROMOTING, Trigger.LEADERSHIP_NOT_TAKEN),
        Trigger.SESSION_LOST,
        promoting(Step.ACQUIRE),
        World(session=Session.SUSPENDED, leader=ours()),
        ok(Step.ACQUIRE, EPOCH),
    ),
    "promoting: not fenced, and the peer still holds": Refined(
        (Role.PROMOTING, Trigger.LEASE_REFUSED),
        Trigger.FENCE_FAILED,
        promoting(Step.FENCE),
        World(leader=ours(), members={PEER: replace(ready(PEER), holds=True)}),
        failed(Step.FENCE),
        (Step.DRAIN,),
    ),
    "promoting: the lease wait ends with the peer back and holding": Refined(
        (Role.PROMOTING, Trigger.LEASE_REFUSED),
        Trigger.RETRY,
        replace(promoting(Step.FENCE), step=None, retry_step=Step.FENCE, retry_at=NOW - 0.1),
        World(leader=ours(), members={PEER: replace(ready(PEER), holds=True)}),
        None,
        (Step.DRAIN,),
    ),
    "promoting: fenced, but the replica was marked outdated": Refined(
        (Role.PROMOTING, Trigger.REPLICA_REFUSED),
        Trigger.STEP_DONE,
        promoting(Step.FENCE),
        World(leader=ours(), outdated=frozenset({NODE})),
        ok(Step.FENCE),
        (Step.DRAIN,),
    ),
    "promoting: the leases expired, but a split brain was reported": Refined(
        (Role.PROMOTING, Trigger.REPLICA_REFUSED),
        Trigger.RETRY,
        replace(promoting(Step.FENCE), step=None, retry_step=Step.FENCE, retry_at=NOW - 0.1),
        World(leader=ours(), absent_since={PEER: NOW - 5}, split_brain="r0 diverged"),
        None,
        (Step.DRAIN,),
    ),
    "demoting: release done": Refined(
        (Role.DEMOTING, Trigger.DEMOTED),
        Trigger.STEP_DONE,
        demoting(Step.RELEASE),
        World(),
        ok(Step.RELEASE),
    ),
}


@pytest.mark.parametrize("name", list(REFINED))
def test_each_special_rule_leads_to_its_own_true_row(name: str) -> None:
    case = REFINED[name]
    snapshot = case.world.snapshot(WALL, case.result)
    assert classify(case.state, snapshot, NOW, POLICY) is case.cause
    assert refine(case.cause, case.state, snapshot, NOW, POLICY) is case.key[1]

    decision = decide(case.state, snapshot, NOW, POLICY)

    assert decision.trigger is case.key[1]
    assert decision.state.role is TRANSITIONS[case.key].to
    # The cause's own row says another role: hence the rule.
    assert TRANSITIONS[(case.key[0], case.cause)].to is not decision.state.role
    assert tuple(a.step for a in decision.actions) == case.steps
    if decision.state.role is Role.DEMOTING:
        assert decision.state.give_up
    if decision.state.role is Role.PASSIVE:
        # Nothing but (maybe) the leader znode was taken: a stray one is released later.
        assert decision.state == AgentState(role=Role.PASSIVE, steps=decision.state.steps)
        assert not holds_resources(decision.state)


def test_over_the_grid_every_decision_moves_to_its_rows_role() -> None:
    """The table is the whole truth: over the grid of states and snapshots, the trigger of a
    decision is the one ``classify`` and ``refine`` chose, and the role after it is its row's."""
    rows = 0
    for state in grid_states():
        for world in GRID_WORLDS:
            for result in grid_results(state):
                snapshot = world.snapshot(WALL, result)
                cause = classify(state, snapshot, NOW, POLICY)
                trigger = refine(cause, state, snapshot, NOW, POLICY)
                decision = decide(state, snapshot, NOW, POLICY)
                assert decision.trigger is trigger
                row = TRANSITIONS.get((state.role, trigger))
                if row is not None:
                    rows += 1
                    assert decision.state.role is row.to, (state, snapshot, decision)
    assert rows > 1000


ONLY_REFINED = (
    Trigger.PROMOTED,
    Trigger.DEMOTED,
    Trigger.LEADERSHIP_NOT_TAKEN,
    Trigger.LEASE_REFUSED,
    Trigger.RELAY_START_EXHAUSTED,
    Trigger.REPLICA_REFUSED,
)

# Pairs ``classify`` never produces for a role: safety triggers concern only a node holding or
# taking resources, so does a stop (a node that holds nothing just exits), each role has its own
# health and opportunity triggers, and a promotion always has a step in flight.
UNREACHABLE: frozenset[tuple[Role, Trigger]] = frozenset(
    {(role, t) for role in Role for t in (Trigger.SESSION_LOST, Trigger.LEADERSHIP_LOST)}
    - {(Role.PROMOTING, t) for t in (Trigger.SESSION_LOST, Trigger.LEADERSHIP_LOST)}
    - {(Role.ACTIVE, t) for t in (Trigger.SESSION_LOST, Trigger.LEADERSHIP_LOST)}
    - {(Role.DEMOTING, Trigger.SESSION_LOST)}  # a graceful drain is cut short
    | {(role, Trigger.RELAY_WARM) for role in Role if role not in (Role.STARTING, Role.FAILED)}
    | {(role, Trigger.RELAY_DOWN) for role in (Role.PROMOTING, Role.DEMOTING)}
    | {(role, Trigger.RELAY_UNHEALTHY) for role in Role if role is not Role.ACTIVE}
    | {(role, Trigger.SWITCHOVER) for role in Role if role is not Role.ACTIVE}
    | {(role, Trigger.SWITCHOVER_REFUSED) for role in Role if role is not Role.ACTIVE}
    | {(role, t) for role in Role if role is not Role.PASSIVE for t in (Trigger.LEADER_VACANT,)}
    | {(role, Trigger.LEADER_STRAY) for role in Role if role is not Role.PASSIVE}
    | {(role, Trigger.RETRY) for role in Role if role not in (Role.DEMOTING, Role.PROMOTING)}
    | {(role, Trigger.FENCE_FAILED) for role in Role if role is not Role.PROMOTING}
    | {(role, Trigger.STOP) for role in Role if role not in (Role.ACTIVE, Role.PROMOTING)}
    # ``refine`` names an outcome only for the roles whose rows it leads to.
    | {(role, t) for role in Role for t in ONLY_REFINED if (role, t) not in TRANSITIONS}
)


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
        promoting(Step.ACQUIRE),
        promoting(Step.FENCE),
        promoting(Step.STORAGE),
        promoting(Step.PUBLISH),
        replace(promoting(Step.FENCE), step=None, retry_step=Step.FENCE, retry_at=NOW + 1),
        replace(promoting(Step.FENCE), step=None, retry_step=Step.FENCE, retry_at=NOW),
        active(),
        active(step=RESTART, attempts=1),
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
                                        )
                                    )
    return worlds


GRID_WORLDS = grid_worlds()


def grid_results(state: AgentState) -> list[StepResult | None]:
    if state.step is None:
        return [None]
    epoch = EPOCH if state.step is Step.ACQUIRE else 0
    return [None, ok(state.step, epoch), failed(state.step)]


def test_pairs_missing_from_the_table_do_nothing() -> None:
    """Over a grid of states and snapshots: a pair not in the table leaves everything as it was."""
    seen: set[tuple[Role, Trigger]] = set()
    for state in grid_states():
        for world in GRID_WORLDS:
            for result in grid_results(state):
                snapshot = world.snapshot(WALL, result)
                cause = classify(state, snapshot, NOW, POLICY)
                trigger = refine(cause, state, snapshot, NOW, POLICY)
                seen.add((state.role, trigger))
                if (state.role, trigger) in TRANSITIONS:
                    continue
                decision = decide(state, snapshot, NOW, POLICY)
                assert decision.actions == ()
                assert decision.state == state
                assert decision.trigger is trigger
                assert not decision.changed
    # The grid holds no state near a limit: those rows have their cases in REFINED.
    assert set(TRANSITIONS) <= seen | {case.key for case in REFINED.values()}
    missing = {(role, trigger) for role in Role for trigger in Trigger} - set(TRANSITIONS)
    assert seen & UNREACHABLE == set()
    # Every pair outside the table was either seen above or is one classify never produces.
    assert missing - seen == UNREACHABLE
    assert {(role, Trigger.WAITING) for role in Role} <= seen


def holding(state: AgentState) -> bool:
    """Active, or promoting in a term it took: the node whose resources the peer must wait for."""
    return state.role is Role.ACTIVE or (state.role is Role.PROMOTING and state.epoch > 0)


def graceful_drain(state: AgentState) -> bool:
    """Demoting with a drain in flight that gives deliveries their full time."""
    urgent = POLICY.drain_time(state.reason) == POLICY.urgent_drain_timeout
    return state.role is Role.DEMOTING and state.step is Step.DRAIN and not urgent


def test_over_the_grid_only_safety_preempts_a_step_in_flight() -> None:
    """Over the grid: with a step in flight and no result, nothing happens, except that a node
    holding resources demotes at once when its session or its leadership is gone."""
    preempted: set[tuple[Role, Trigger]] = set()
    for state in grid_states():
        if state.step is None:
            continue
        for world in GRID_WORLDS:
            decision = decide(state, world.snapshot(WALL), NOW, POLICY)
            lost = world.session is not Session.CONNECTED or world.leader != ours()
            if graceful_drain(state) and world.session is not Session.CONNECTED:
                assert decision.trigger is Trigger.SESSION_LOST
                (drain,) = decision.actions
                assert drain.step is Step.DRAIN
                assert drain.timeout == POLICY.urgent_drain_timeout
                continue
            if not (holding(state) and lost):
                assert decision.trigger is Trigger.WAITING
                assert decision.actions == ()
                assert decision.state == state
                continue
            expected = (
                Trigger.SESSION_LOST
                if world.session is not Session.CONNECTED
                else Trigger.LEADERSHIP_LOST
            )
            assert decision.trigger is expected
            preempted.add((state.role, expected))
            assert decision.state.role is Role.DEMOTING
            assert decision.state.give_up is (state.role is Role.PROMOTING)
            assert decision.state.epoch == state.epoch
            assert decision.actions == (
                Action(
                    Step.DRAIN,
                    POLICY.urgent_drain_timeout,
                    epoch=state.epoch,
                    reason=decision.note,
                ),
            )
    assert preempted == {
        (role, trigger)
        for role in (Role.ACTIVE, Role.PROMOTING)
        for trigger in (Trigger.SESSION_LOST, Trigger.LEADERSHIP_LOST)
    }


# ------------------------------------------------------------------ whole walks


def test_starting_node_brings_its_relay_up_and_becomes_passive() -> None:
    walk = Walk(world=World(relay_running=False))
    decision = walk.see()
    assert decision.trigger is Trigger.RELAY_DOWN
    assert [a.step for a in decision.actions] == [START]
    assert walk.see().actions == ()  # in flight
    walk.world.relay_running = True
    decision = walk.finish()
    assert decision.state.role is Role.PASSIVE
    assert decision.state.step is None


def test_starting_node_with_a_warm_relay_is_passive_at_once() -> None:
    walk = Walk()
    decision = walk.see()
    assert decision.trigger is Trigger.RELAY_WARM
    assert decision.state.role is Role.PASSIVE
    assert decision.actions == ()


def test_failed_starts_lead_to_failed_then_retries_bring_it_back() -> None:
    walk = Walk(world=World(relay_running=False))
    for attempt in range(1, POLICY.relay_start_limit + 1):
        decision = walk.see()
        assert [a.step for a in decision.actions] == [START]
        decision = walk.finish(False, detail="no spool")
        assert decision.state.attempts == attempt
        assert walk.see().actions == ()  # not before retry_interval
        walk.tick(POLICY.retry_interval)
    assert walk.state.role is Role.FAILED
    assert walk.state.step is None
    decision = walk.see()
    assert [a.step for a in decision.actions] == [START]
    decision = walk.finish()
    assert decision.state.role is Role.PASSIVE
    assert decision.state.attempts == 0


@pytest.mark.parametrize(
    ("epoch_node", "peer"), [(PEER, PEER), (NODE, None), (None, None)], ids=["peer", "self", "none"]
)
def test_promotion_runs_every_step_in_order(epoch_node: str | None, peer: str | None) -> None:
    timeouts = {step: 1.0 + index for index, step in enumerate(PROMOTION)}
    policy = Policy(node=NODE, step_timeouts=timeouts)
    walk = Walk(world=World(relay_running=False, epoch_node=epoch_node), policy=policy)
    walk.see()
    walk.world.relay_running = True
    walk.finish()
    assert walk.state.role is Role.PASSIVE

    decision = walk.see()
    assert decision.trigger is Trigger.LEADER_VACANT
    assert decision.state.role is Role.PROMOTING
    (acquire_action,) = decision.actions
    assert acquire_action == Action(Step.ACQUIRE, 1.0, epoch=0, reason="leader vacant")
    started = walk.now

    walk.world.leader = ours(EPOCH)
    seconds = {step: round(0.1 * (index + 1), 4) for index, step in enumerate(PROMOTION)}
    emitted: list[Action] = []
    for step in PROMOTION:
        assert walk.state.step is step
        assert walk.see().actions == ()  # nothing happens until the step ends
        walk.tick(seconds[step])
        epoch = EPOCH if step is Step.ACQUIRE else 0
        decision = walk.finish(epoch=epoch, seconds=seconds[step])
        emitted.extend(decision.actions)

    assert [a.step for a in emitted] == list(PROMOTION[1:])
    for action in emitted:
        assert action.epoch == EPOCH
        assert action.timeout == timeouts[action.step]
    fence = emitted[0]
    assert fence.peer == peer
    publish = emitted[-1]
    assert publish.peer == peer
    assert publish.reason == "leader vacant"
    assert publish.steps == tuple((step, seconds[step]) for step in PROMOTION[:-1])
    assert decision.state.role is Role.ACTIVE
    assert decision.state.epoch == EPOCH
    assert decision.state.step is None
    assert walk.state.steps == tuple((step, seconds[step]) for step in PROMOTION)
    assert decision.note == f"active in epoch {EPOCH} after {round(walk.now - started, 4)}s"
    assert walk.see().actions == ()  # a healthy active node has nothing to do


def set_session_suspended(walk: Walk) -> None:
    walk.world.session = Session.SUSPENDED


def set_session_lost(walk: Walk) -> None:
    walk.world.session = Session.LOST
    walk.world.leader = None  # the ephemeral leader znode went with the session


def set_leadership_lost(walk: Walk) -> None:
    walk.world.leader = theirs(EPOCH + 1)


def set_switchover(walk: Walk) -> None:
    walk.world.members = ready_peer()
    walk.world.switchover = Switchover(NODE, PEER, walk.wall)


def set_switchover_to_anyone(walk: Walk) -> None:
    walk.world.members = ready_peer()
    walk.world.switchover = Switchover(NODE, None, walk.wall)


def set_stopping(walk: Walk) -> None:
    walk.world.stopping = True


def set_stopping_during_a_restart(walk: Walk) -> None:
    """SIGTERM while a restart is in flight: the restart ends first, then the handover begins."""
    walk.world.relay_running = False
    assert [a.step for a in walk.see().actions] == [RESTART]
    walk.world.stopping = True
    walk.tick()
    assert walk.see().trigger is Trigger.WAITING
    walk.world.relay_running = True


def set_relay_unhealthy(walk: Walk) -> None:
    walk.world.relay_failures = walk.policy.relay_failure_limit - 1
    assert walk.see().actions == ()  # one check short of the limit: nothing yet
    walk.world.relay_failures = walk.policy.relay_failure_limit


def set_relay_unrestartable(walk: Walk) -> None:
    """Every restart the limit allows fails; the next snapshot finds the relay down again."""
    walk.world.relay_running = False
    for _ in range(walk.policy.relay_restart_limit):
        decision = walk.see()
        assert [a.step for a in decision.actions] == [RESTART]
        decision = walk.finish(False, detail="spool locked")
        assert decision.state.role is Role.ACTIVE
        assert decision.actions == ()
    walk.tick()


def fail_the_restart(walk: Walk) -> Decision:
    return walk.finish(False, detail="spool locked")


CAUSES: dict[str, tuple[Callable[[Walk], None], Trigger, bool]] = {
    "session suspended": (set_session_suspended, Trigger.SESSION_LOST, False),
    "session lost": (set_session_lost, Trigger.SESSION_LOST, False),
    "leadership lost": (set_leadership_lost, Trigger.LEADERSHIP_LOST, False),
    "switchover": (set_switchover, Trigger.SWITCHOVER, False),
    "switchover to anyone": (set_switchover_to_anyone, Trigger.SWITCHOVER, False),
    "stop": (set_stopping, Trigger.STOP, False),
    "stop during a restart": (set_stopping_during_a_restart, Trigger.STOP, False),
    "relay unhealthy": (set_relay_unhealthy, Trigger.RELAY_UNHEALTHY, True),
    "relay restarts fail": (set_relay_unrestartable, Trigger.RELAY_UNHEALTHY, True),
}


@pytest.mark.parametrize("cause", list(CAUSES))
def test_active_node_demotes_through_every_step(cause: str) -> None:
    provoke, trigger, give_up = CAUSES[cause]
    walk = eligible()
    promote(walk)
    walk.tick(5)
    cooldown_before = walk.state.cooldown_until

    provoke(walk)
    if walk.state.step is RESTART:
        decision = walk.finish() if walk.world.relay_running else fail_the_restart(walk)
    else:
        decision = walk.see()

    assert decision.trigger is trigger
    assert decision.state.role is Role.DEMOTING
    assert decision.state.give_up is give_up
    assert decision.actions == (
        Action(
            Step.DRAIN,
            POLICY.drain_time(decision.trigger.value),
            epoch=EPOCH,
            reason=decision.note,
        ),
    )
    began = walk.now
    steps = finish_demotion(walk)
    assert steps == list(DEMOTION)
    assert [a.step for a in walk.log[-1].actions] == []
    for action in walk.actions()[-len(DEMOTION) :]:
        assert action.epoch == EPOCH
    assert walk.state.role is Role.PASSIVE
    assert walk.state.step is None
    assert walk.log[-1].note == f"passive after {round(walk.now - began, 4)}s"
    if give_up:
        assert walk.state.cooldown_until == walk.now + POLICY.cooldown
    else:
        assert walk.state.cooldown_until == cooldown_before
        assert walk.state.cooldown_until <= walk.now


def die_and_restart(walk: Walk) -> Decision:
    """The relay dies; the active node restarts it in place, and it comes back."""
    walk.world.relay_running = False
    decision = walk.see()
    assert decision.trigger is Trigger.RELAY_DOWN
    assert decision.actions == (Action(RESTART, POLICY.timeout(RESTART), epoch=EPOCH),)
    walk.world.relay_running = True
    return walk.finish()


def test_relay_restarted_in_place_when_its_process_is_gone() -> None:
    walk = eligible()
    promote(walk)
    for restart in range(1, POLICY.relay_restart_limit + 1):
        decision = die_and_restart(walk)
        assert decision.state.role is Role.ACTIVE
        assert decision.state.attempts == restart  # a restart that worked does not reset it
        assert walk.see().actions == ()
        walk.tick(POLICY.relay_restart_window / 2)
    # One death too many within the window of the last restart: the node gives up.
    walk.world.relay_running = False
    decision = walk.see()
    assert decision.trigger is Trigger.RELAY_UNHEALTHY
    assert decision.state.role is Role.DEMOTING and decision.state.give_up


def test_a_relay_that_stays_up_for_the_window_starts_a_new_count() -> None:
    walk = eligible()
    promote(walk)
    for _ in range(3 * POLICY.relay_restart_limit):
        decision = die_and_restart(walk)
        assert decision.state.role is Role.ACTIVE
        assert decision.state.attempts == 1
        walk.tick(POLICY.relay_restart_window + 1)


def test_failed_restarts_count_too_and_pause_keeps_restarting() -> None:
    walk = eligible()
    promote(walk)
    walk.world.paused = PAUSE
    walk.world.relay_running = False
    for _ in range(POLICY.relay_restart_limit + 3):
        decision = walk.see()
        assert [a.step for a in decision.actions] == [RESTART]  # paused: never gives up
        assert fail_the_restart(walk).state.role is Role.ACTIVE
    walk.world.paused = None
    assert walk.see().trigger is Trigger.RELAY_UNHEALTHY


# ------------------------------------------------------------------ safety


def block_session_suspended(walk: Walk) -> None:
    walk.world.session = Session.SUSPENDED


def block_session_lost(walk: Walk) -> None:
    walk.world.session = Session.LOST


def block_leader_theirs(walk: Walk) -> None:
    walk.world.leader = theirs()


def block_leader_ours(walk: Walk) -> None:
    walk.world.leader = ours()


def block_paused(walk: Walk) -> None:
    walk.world.paused = PAUSE


def block_relay_down(walk: Walk) -> None:
    walk.world.relay_running = False


def block_relay_down_retry_later(walk: Walk) -> None:
    walk.world.relay_running = False
    walk.state = replace(walk.state, retry_at=walk.now + 1)


def block_cooldown(walk: Walk) -> None:
    walk.state = replace(walk.state, cooldown_until=walk.now + 0.001)


def block_recent_failover(walk: Walk) -> None:
    walk.world.last_failover = walk.wall - POLICY.min_failover_interval + 0.001


def block_switchover_to_another(walk: Walk) -> None:
    walk.world.switchover = Switchover(PEER, OTHER, walk.wall)


def block_switchover_away_from_here(walk: Walk) -> None:
    walk.world.switchover = Switchover(NODE, None, walk.wall)


def block_switchover_to_self_in_cooldown(walk: Walk) -> None:
    walk.world.switchover = Switchover(PEER, NODE, walk.wall)
    walk.state = replace(walk.state, cooldown_until=walk.now + 1)


def block_switchover_to_self_leader_present(walk: Walk) -> None:
    walk.world.switchover = Switchover(PEER, NODE, walk.wall)
    walk.world.leader = theirs()


def block_stale_switchover_with_pause(walk: Walk) -> None:
    walk.world.switchover = Switchover(PEER, NODE, walk.wall - POLICY.switchover_timeout - 0.001)
    walk.world.paused = PAUSE


BLOCKERS: dict[str, Callable[[Walk], None]] = {
    "session suspended": block_session_suspended,
    "session lost": block_session_lost,
    "leader theirs": block_leader_theirs,
    "leader ours": block_leader_ours,
    "paused": block_paused,
    "relay down": block_relay_down,
    "relay down, retry later": block_relay_down_retry_later,
    "cooldown": block_cooldown,
    "recent failover": block_recent_failover,
    "switchover to another": block_switchover_to_another,
    "switchover away from here": block_switchover_away_from_here,
    "switchover to self in cooldown": block_switchover_to_self_in_cooldown,
    "switchover to self, leader present": block_switchover_to_self_leader_present,
    "stale switchover to self, paused": block_stale_switchover_with_pause,
}


@pytest.mark.parametrize("blocker", list(BLOCKERS))
def test_never_promotes_when_blocked(blocker: str) -> None:
    walk = eligible()
    BLOCKERS[blocker](walk)
    for _ in range(3):
        decision = walk.see()
        assert decision.trigger is not Trigger.LEADER_VACANT
        assert Step.ACQUIRE not in [a.step for a in decision.actions]
        assert decision.state.role is not Role.PROMOTING
        if walk.state.step is not None:
            walk.finish()


@pytest.mark.parametrize("role", [Role.STARTING, Role.FAILED], ids=str)
def test_only_a_passive_node_promotes(role: Role) -> None:
    """A starting or failed node whose relay turns out warm becomes passive first."""
    walk = Walk(AgentState(role=role, attempts=3))
    decision = walk.see()
    assert decision.trigger is Trigger.RELAY_WARM
    assert decision.actions == ()
    assert decision.state.role is Role.PASSIVE
    assert decision.state.attempts == 0  # the relay is up: failed starts are no longer in a row
    assert walk.see().trigger is Trigger.LEADER_VACANT


def test_eligible_node_promotes() -> None:
    decision = eligible().see()
    assert decision.trigger is Trigger.LEADER_VACANT
    assert decision.actions == (
        Action(Step.ACQUIRE, POLICY.timeout(Step.ACQUIRE), reason="leader vacant"),
    )


def test_cooldown_and_interval_end_exactly_on_time() -> None:
    walk = eligible()
    walk.state = replace(walk.state, cooldown_until=walk.now)
    walk.world.last_failover = walk.wall - POLICY.min_failover_interval
    assert walk.see().trigger is Trigger.LEADER_VACANT


@pytest.mark.parametrize("target", [NODE, None], ids=["to-self", "to-anyone"])
def test_switchover_to_this_node_overrides_pause_and_interval(target: str | None) -> None:
    walk = eligible()
    walk.world.paused = PAUSE
    walk.world.last_failover = walk.wall - 0.1
    walk.world.switchover = Switchover(PEER, target, walk.wall - POLICY.switchover_timeout)
    decision = walk.see()
    assert decision.trigger is Trigger.LEADER_VACANT
    assert [a.step for a in decision.actions] == [Step.ACQUIRE]
    assert decision.actions[0].reason == "switchover"
    assert decision.state.reason == "switchover"


def test_stale_switchover_is_ignored() -> None:
    walk = eligible()
    walk.world.switchover = Switchover(PEER, OTHER, walk.wall - POLICY.switchover_timeout - 0.001)
    decision = walk.see()
    assert decision.trigger is Trigger.LEADER_VACANT
    assert decision.state.reason == "leader vacant"

    walk = eligible()
    promote(walk)
    walk.world.members = ready_peer()
    walk.world.switchover = Switchover(NODE, PEER, walk.wall - POLICY.switchover_timeout - 0.001)
    assert walk.see().actions == ()
    assert walk.state.role is Role.ACTIVE
    walk.world.switchover = Switchover(NODE, PEER, walk.wall - POLICY.switchover_timeout)
    assert walk.see().trigger is Trigger.SWITCHOVER  # the same request, just in time


def test_losing_the_acquire_race_returns_to_passive_without_cooldown() -> None:
    walk = eligible()
    walk.state = replace(walk.state, cooldown_until=NOW - 50)
    start_promotion(walk)
    walk.world.leader = theirs(EPOCH)
    decision = walk.finish(False, detail="node exists")
    assert decision.state == AgentState(role=Role.PASSIVE, cooldown_until=NOW - 50)
    assert decision.actions == ()
    assert walk.see().actions == ()


@pytest.mark.parametrize(
    "loss", [set_session_suspended, set_leadership_lost], ids=["session", "leader"]
)
def test_no_fencing_when_the_acquired_leadership_is_lost_at_once(
    loss: Callable[[Walk], None],
) -> None:
    """ACQUIRE succeeded, but the snapshot bringing its result shows the session or znode gone."""
    walk = eligible()
    start_promotion(walk)
    walk.world.leader = ours(EPOCH)
    loss(walk)
    decision = walk.finish(epoch=EPOCH)
    assert decision.actions == ()
    assert decision.state.role is Role.PASSIVE
    assert decision.state.cooldown_until <= walk.now
    # Once the session is back with the znode still ours, the stray leadership is given up.
    walk.world.session = Session.CONNECTED
    walk.world.leader = ours(EPOCH)
    decision = walk.see()
    assert decision.trigger is Trigger.LEADER_STRAY
    assert [a.step for a in decision.actions] == [Step.RELEASE]
    assert finish_demotion(walk) == [Step.RELEASE]
    assert walk.state.role is Role.PASSIVE
    assert walk.state.cooldown_until <= walk.now


def fail_step(walk: Walk) -> Decision:
    return walk.finish(False, detail="timed out")


def lose_session(walk: Walk) -> Decision:
    walk.world.session = Session.SUSPENDED
    return walk.finish()


def lose_leadership(walk: Walk) -> Decision:
    walk.world.leader = None
    return walk.finish()


ROLLBACKS: dict[str, tuple[Callable[[Walk], Decision], Trigger]] = {
    "failed": (fail_step, Trigger.STEP_FAILED),
    "session": (lose_session, Trigger.SESSION_LOST),
    "leader": (lose_leadership, Trigger.LEADERSHIP_LOST),
}


@pytest.mark.parametrize("how", list(ROLLBACKS))
@pytest.mark.parametrize("step", PROMOTION[1:], ids=str)
def test_failed_promotion_rolls_back_through_the_whole_demotion(step: Step, how: str) -> None:
    provoke, trigger = ROLLBACKS[how]
    walk = eligible()
    if step is Step.FENCE and how == "failed":
        # Whether a failed fence rolls back depends on the takeover policy (tested below).
        walk.policy = replace(POLICY, takeover=Takeover.FENCE_ONLY)
        trigger = Trigger.LEASE_REFUSED
    promote_until(walk, step)
    walk.tick()
    decision = provoke(walk)
    assert decision.trigger is trigger
    assert decision.state.role is Role.DEMOTING
    assert decision.state.give_up
    assert [(a.step, a.epoch) for a in decision.actions] == [(Step.DRAIN, EPOCH)]
    # The demotion runs to its end whatever the world looks like meanwhile.
    assert finish_demotion(walk) == list(DEMOTION)
    assert walk.state.role is Role.PASSIVE
    assert walk.state.cooldown_until == walk.now + POLICY.cooldown
    # ... and the cooldown keeps it from taking over again at once.
    walk.world = World()
    assert walk.see().actions == ()
    walk.tick(POLICY.cooldown)
    assert walk.see().trigger is Trigger.LEADER_VACANT


# ---------------------------------------------------------------- DRBD's marks


@pytest.mark.parametrize("request_", [None, Switchover(PEER, NODE, WALL)], ids=["vacant", "asked"])
def test_an_outdated_replica_never_takes_over(request_: Switchover | None) -> None:
    walk = eligible()
    walk.world.switchover = request_
    walk.world.outdated = frozenset({NODE})
    assert walk.see().actions == ()
    walk.world.outdated = frozenset({PEER})  # the peer's mark is no reason to wait
    assert [a.step for a in walk.see().actions] == [Step.ACQUIRE]


def test_a_reported_split_brain_stops_automatic_failover() -> None:
    walk = eligible()
    walk.world.split_brain = "DRBD reported a split brain of r0 on beta"
    assert walk.see().trigger is Trigger.NOTHING
    walk.world.split_brain = None
    assert walk.see().trigger is Trigger.LEADER_VACANT


def test_an_active_node_with_a_split_brain_reported_keeps_serving() -> None:
    """The report stops takeovers, not the node that serves: that is for the operator."""
    walk = Walk(active(), World(leader=ours(), split_brain="reported"))
    assert walk.see().trigger is Trigger.NOTHING
    assert walk.state.role is Role.ACTIVE


# ---------------------------------------------------------------- takeover without a fence


def fencing_fails(absent_for: float | None, *, holds: bool = False) -> Walk:
    """A promotion whose FENCE of the peer is in flight; the peer left ``absent_for`` ago.

    ``absent_for`` None: the peer is still connected, publishing ``holds``.
    """
    walk = eligible()
    walk.world.known = frozenset({NODE, PEER})
    promote_until(walk, Step.FENCE)
    if absent_for is None:
        walk.world.members = {PEER: replace(ready(PEER), role=Role.DEMOTING, holds=holds)}
    else:
        walk.world.absent_since = {PEER: walk.now - absent_for}
    return walk


def test_an_unfenced_peer_whose_lease_expired_long_ago_is_passed_over() -> None:
    walk = fencing_fails(POLICY.lease_grace + 1)
    decision = walk.finish(False, detail="ipmi: timed out")
    assert decision.trigger is Trigger.FENCE_FAILED
    assert [a.step for a in decision.actions] == [Step.STORAGE]
    assert decision.note.startswith("ipmi: timed out; going on: leases expired (beta 3.0s ago")


def test_the_promotion_waits_out_the_grace_then_counts_the_wait_as_fencing() -> None:
    walk = fencing_fails(0.5)
    decision = walk.finish(False, seconds=0.25, detail="no fence agent configured")
    assert decision.actions == () and walk.state.role is Role.PROMOTING
    assert walk.state.retry_at == walk.now + POLICY.lease_grace - 0.5
    assert "waiting for the leases to expire (beta 0.5s ago; grace 2s)" in decision.note
    assert holds_resources(walk.state)  # leadership is held while it waits
    walk.tick(1.0)
    assert walk.see().trigger is Trigger.NOTHING
    walk.tick(0.5)
    decision = walk.see()
    assert decision.trigger is Trigger.RETRY
    assert [a.step for a in decision.actions] == [Step.STORAGE]
    assert walk.state.steps[-1] == (Step.FENCE, 0.25 + 1.5)


def test_losing_the_session_while_waiting_for_a_lease_rolls_back() -> None:
    walk = fencing_fails(0.0)
    walk.finish(False, detail="no fence agent configured")
    walk.tick(0.5)
    walk.world.session = Session.SUSPENDED
    decision = walk.see()
    assert decision.trigger is Trigger.SESSION_LOST
    assert [a.step for a in decision.actions] == [Step.DRAIN]


def test_a_connected_peer_still_holding_is_never_passed_over() -> None:
    walk = fencing_fails(None, holds=True)
    decision = walk.finish(False, detail="ssh: connection refused")
    assert decision.trigger is Trigger.LEASE_REFUSED
    assert walk.state.role is Role.DEMOTING and walk.state.give_up
    assert "beta still connected to ZooKeeper and holding" in decision.note


def test_fence_only_never_passes_over_an_unfenced_peer() -> None:
    walk = fencing_fails(60.0)
    walk.policy = replace(POLICY, takeover=Takeover.FENCE_ONLY)
    decision = walk.finish(False, detail="ipmi: power status unknown")
    assert walk.state.role is Role.DEMOTING
    assert "takeover is fence-only" in decision.note


def test_lease_verdict_takes_the_latest_departure() -> None:
    world = World(absent_since={PEER: NOW - 5, OTHER: NOW - 1}, known=frozenset({PEER, OTHER}))
    snapshot = world.snapshot(WALL)
    at, why = lease_verdict(snapshot, NOW, POLICY)
    assert at == NOW - 1 + POLICY.lease_grace
    assert "beta 5.0s ago, gamma 1.0s ago" in why


@pytest.mark.parametrize("failing", DEMOTION, ids=str)
def test_failed_demotion_step_is_retried_and_never_skipped(failing: Step) -> None:
    walk = eligible()
    promote(walk)
    walk.world.session = Session.SUSPENDED
    assert walk.see().state.role is Role.DEMOTING
    emitted = [Step.DRAIN]
    for _ in range(DEMOTION.index(failing)):
        walk.tick()
        emitted.extend(a.step for a in walk.finish().actions)
    assert walk.state.step is failing
    for attempt in (1, 2, 3):
        walk.tick()
        decision = walk.finish(False, detail="busy")
        assert decision.actions == ()
        assert decision.state.attempts == attempt
        # Whatever the world says, nothing happens before retry_interval (but RELEASE is tried
        # again as soon as the session is connected: see the test after this one)...
        if failing is not Step.RELEASE:
            walk.world.session = Session.CONNECTED
        walk.world.leader = None
        walk.tick(POLICY.retry_interval - 0.25)
        assert walk.see().actions == ()
        walk.world.session = Session.LOST
        walk.tick(0.25)
        # ... and then the same step runs again.
        decision = walk.see()
        assert decision.trigger is Trigger.RETRY
        limit = (
            POLICY.drain_time(walk.state.reason)
            if failing is Step.DRAIN
            else POLICY.timeout(failing)
        )
        assert decision.actions == (Action(failing, limit, epoch=EPOCH),)
        emitted.append(failing)
    steps = finish_demotion(walk)
    emitted.extend(steps[1:])
    assert [s for s in emitted if s is not failing] == [s for s in DEMOTION if s is not failing]
    assert emitted.count(failing) == 4
    assert emitted[-1] is Step.RELEASE
    assert walk.state.role is Role.PASSIVE
    assert walk.state.cooldown_until <= walk.now  # not a give-up


@pytest.mark.parametrize("outage", [Session.SUSPENDED, Session.LOST], ids=str)
def test_a_failed_release_is_retried_as_soon_as_the_session_is_back(outage: Session) -> None:
    """Leadership is given up without waiting out retry_interval once ZooKeeper answers again:
    until then the peer cannot take over, whatever this node has released already."""
    walk = eligible()
    promote(walk)
    walk.world.members = ready_peer()
    walk.world.switchover = Switchover(NODE, PEER, walk.wall)
    walk.see()
    for _ in DEMOTION[:-1]:
        walk.tick()
        walk.finish()
    assert walk.state.step is Step.RELEASE
    walk.world.session = outage
    walk.tick()
    decision = walk.finish(False, detail="connection loss")
    assert decision.trigger is Trigger.STEP_FAILED
    assert decision.state.retry_step is Step.RELEASE
    assert decision.state.retry_at == walk.now + POLICY.retry_interval
    for _ in range(3):
        walk.tick(0.1)
        assert walk.see().actions == ()  # still no ZooKeeper: nothing to gain
    walk.world.session = Session.CONNECTED
    walk.tick(0.1)
    assert walk.now < walk.state.retry_at
    decision = walk.see()
    assert decision.trigger is Trigger.RETRY
    assert decision.actions == (Action(Step.RELEASE, POLICY.timeout(Step.RELEASE), epoch=EPOCH),)
    assert decision.state.retry_step is None
    walk.world.leader = None
    walk.tick()
    decision = walk.finish()
    assert decision.state.role is Role.PASSIVE
    assert decision.state.cooldown_until <= walk.now  # a switchover is not a give-up


def test_a_failed_stray_release_is_retried_as_soon_as_the_session_is_back() -> None:
    walk = Walk(AgentState(role=Role.PASSIVE), World(leader=ours()))
    assert [a.step for a in walk.see().actions] == [Step.RELEASE]
    walk.world.session = Session.SUSPENDED
    walk.tick()
    assert walk.finish(False).actions == ()
    walk.tick()
    assert walk.see().actions == ()
    walk.world.session = Session.CONNECTED
    walk.tick()
    assert walk.now < walk.state.retry_at
    decision = walk.see()
    assert decision.trigger is Trigger.RETRY
    assert decision.actions == (Action(Step.RELEASE, POLICY.timeout(Step.RELEASE), epoch=0),)


@pytest.mark.parametrize("failing", DEMOTION[:-1], ids=str)
def test_other_failed_demotion_steps_wait_even_when_the_session_is_back(failing: Step) -> None:
    state = demoting(None, retry_step=failing, retry_at=NOW + POLICY.retry_interval, attempts=1)
    for session in Session:
        decision = decide(state, World(session=session, leader=ours()).snapshot(WALL), NOW, POLICY)
        assert decision.trigger is Trigger.NOTHING
        assert decision.actions == ()
    release = replace(state, retry_step=Step.RELEASE)
    decision = decide(release, World(leader=ours()).snapshot(WALL), NOW, POLICY)
    assert [a.step for a in decision.actions] == [Step.RELEASE]


def test_give_up_survives_retries() -> None:
    walk = eligible()
    promote(walk)
    walk.world.relay_failures = POLICY.relay_failure_limit
    walk.see()
    for step in DEMOTION:
        walk.tick()
        walk.finish(False)
        walk.tick(POLICY.retry_interval)
        assert walk.see().actions[0].step is step
        walk.tick()
        walk.finish()
    assert walk.state.role is Role.PASSIVE
    assert walk.state.cooldown_until == walk.now + POLICY.cooldown


IN_FLIGHT: dict[str, AgentState] = {
    "starting": AgentState(step=START),
    "failed": AgentState(role=Role.FAILED, step=START, attempts=3),
    "passive": AgentState(role=Role.PASSIVE, step=START),
    "acquire": promoting(Step.ACQUIRE),
    "fence": promoting(Step.FENCE),
    "storage": promoting(Step.STORAGE),
    "publish": promoting(Step.PUBLISH),
    "restart": active(step=RESTART),
    "drain": demoting(Step.DRAIN, give_up=True),
    "release": demoting(Step.RELEASE),
    "stray release": demoting(Step.RELEASE, reason="stray leader", epoch=0),
}
# Active, or promoting past ACQUIRE: the steps a lost session or leadership cuts short.
PREEMPTIBLE = frozenset({"fence", "storage", "publish", "restart"})

# What the snapshot shows, and the safety trigger it is for a node holding resources.
ALARMS: dict[str, tuple[World, Trigger | None]] = {
    "quiet": (World(leader=ours()), None),
    "suspended": (World(session=Session.SUSPENDED, leader=ours()), Trigger.SESSION_LOST),
    "lost": (World(session=Session.LOST), Trigger.SESSION_LOST),
    "taken over": (World(leader=theirs(EPOCH + 1)), Trigger.LEADERSHIP_LOST),
    "vacant": (World(), Trigger.LEADERSHIP_LOST),
    "stopping": (World(leader=ours(), stopping=True), None),
    "unhealthy": (World(leader=ours(), relay_running=False, relay_failures=99), None),
    "switchover": (
        World(leader=ours(), switchover=Switchover(NODE, PEER, WALL), members=ready_peer()),
        None,
    ),
    "everything": (
        World(
            session=Session.SUSPENDED,
            leader=theirs(EPOCH + 1),
            paused=PAUSE,
            switchover=Switchover(NODE, PEER, WALL),
            members=ready_peer(),
            relay_running=False,
            relay_failures=99,
            stopping=True,
        ),
        Trigger.SESSION_LOST,
    ),
}


@pytest.mark.parametrize("alarm", list(ALARMS))
@pytest.mark.parametrize("name", list(IN_FLIGHT))
def test_only_safety_preempts_the_step_in_flight(name: str, alarm: str) -> None:
    """While a step is in flight nothing happens, whatever the snapshot says, except that a node
    holding resources demotes at once on a lost session or leadership (the agent abandons the
    step in flight and discards its result)."""
    state = IN_FLIGHT[name]
    world, safety = ALARMS[alarm]
    decision = decide(state, world.snapshot(WALL), NOW, POLICY)
    if graceful_drain(state) and world.session is not Session.CONNECTED:
        # A graceful drain is not abandoned but cut short: the relay must let go at once.
        assert decision.trigger is Trigger.SESSION_LOST
        assert decision.state.give_up is state.give_up
        assert decision.actions == (
            Action(Step.DRAIN, POLICY.urgent_drain_timeout, epoch=EPOCH, reason=decision.note),
        )
        return
    if name not in PREEMPTIBLE or safety is None:
        assert decision.trigger is Trigger.WAITING
        assert decision.actions == ()
        assert decision.state == state
        assert not decision.changed
        return
    assert decision.trigger is safety
    assert decision.state.role is Role.DEMOTING
    assert decision.state.step is Step.DRAIN
    assert decision.state.give_up is (state.role is Role.PROMOTING)
    assert decision.actions == (
        Action(Step.DRAIN, POLICY.urgent_drain_timeout, epoch=EPOCH, reason=decision.note),
    )
    assert decision.changed
    assert holds_resources(decision.state)


LOSSES: dict[str, tuple[Callable[[Walk], None], Trigger]] = {
    "suspended": (set_session_suspended, Trigger.SESSION_LOST),
    "lost": (set_session_lost, Trigger.SESSION_LOST),
    "leader": (set_leadership_lost, Trigger.LEADERSHIP_LOST),
}


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("step", PROMOTION[1:], ids=str)
def test_safety_preempts_the_promotion_step_in_flight(step: Step, loss: str) -> None:
    provoke, trigger = LOSSES[loss]
    walk = eligible()
    promote_until(walk, step)
    walk.tick()
    provoke(walk)
    mark = len(walk.log)
    decision = walk.see()  # the step has not ended: it is abandoned
    assert decision.trigger is trigger
    assert decision.state.role is Role.DEMOTING
    assert decision.state.give_up
    assert decision.actions == (
        Action(Step.DRAIN, POLICY.urgent_drain_timeout, epoch=EPOCH, reason=decision.note),
    )
    assert decision.note == f"promotion abandoned ({trigger.value}); rolling back"
    # The abandoned step's result never reaches decide; the demotion runs from its first step.
    assert finish_demotion(walk) == list(DEMOTION)
    assert walk.state.role is Role.PASSIVE
    assert walk.state.cooldown_until == walk.now + POLICY.cooldown
    assert [a.step for d in walk.log[mark:] for a in d.actions] == list(DEMOTION)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_safety_preempts_a_restart_in_flight(loss: str) -> None:
    provoke, trigger = LOSSES[loss]
    walk = eligible()
    promote(walk)
    walk.world.relay_running = False
    assert [a.step for a in walk.see().actions] == [RESTART]
    walk.tick()
    assert walk.see().trigger is Trigger.WAITING  # a restart takes its time...
    provoke(walk)
    decision = walk.see()  # ... but not once another node may take over
    assert decision.trigger is trigger
    assert decision.state.role is Role.DEMOTING
    assert not decision.state.give_up
    assert decision.state.attempts == 0
    assert decision.actions == (
        Action(Step.DRAIN, POLICY.urgent_drain_timeout, epoch=EPOCH, reason=decision.note),
    )
    assert finish_demotion(walk) == list(DEMOTION)
    assert walk.state.role is Role.PASSIVE


@pytest.mark.parametrize("success", [True, False], ids=["restarted", "restart-failed"])
def test_safety_beats_the_result_of_a_restart(success: bool) -> None:
    """The loss arrives on the very snapshot that brings the restart's outcome."""
    walk = eligible()
    promote(walk)
    walk.world.relay_running = False
    walk.see()
    walk.world.session = Session.LOST
    walk.world.leader = None
    walk.world.relay_running = success
    decision = walk.finish(success)
    assert decision.trigger is Trigger.SESSION_LOST
    assert decision.state.role is Role.DEMOTING
    assert [a.step for a in decision.actions] == [Step.DRAIN]


@pytest.mark.parametrize(
    "loss",
    [set_session_suspended, set_session_lost, set_leadership_lost],
    ids=["suspended", "lost", "leader"],
)
def test_pause_does_not_stop_self_demotion(loss: Callable[[Walk], None]) -> None:
    walk = eligible()
    promote(walk)
    walk.world.paused = PAUSE
    loss(walk)
    decision = walk.see()
    assert decision.state.role is Role.DEMOTING
    assert [a.step for a in decision.actions] == [Step.DRAIN]


def test_pause_stops_giving_up_for_relay_health() -> None:
    walk = eligible()
    promote(walk)
    walk.world.paused = PAUSE
    walk.world.relay_failures = POLICY.relay_failure_limit * 10
    for _ in range(3):
        walk.tick()
        assert walk.see().actions == ()
    assert walk.state.role is Role.ACTIVE

    # A relay that keeps failing to restart is restarted again, but leadership is kept.
    walk.world.relay_running = False
    for _ in range(POLICY.relay_restart_limit + 3):
        walk.tick()
        assert [a.step for a in walk.see().actions] == [RESTART]
        decision = fail_the_restart(walk)
        assert decision.state.role is Role.ACTIVE
        assert decision.actions == ()

    # Unpaused, the health rules apply again.
    walk.world.paused = None
    walk.world.relay_running = True
    decision = walk.see()
    assert decision.trigger is Trigger.RELAY_UNHEALTHY
    assert decision.state.give_up


def test_pause_does_not_stop_an_operator_switchover() -> None:
    walk = eligible()
    promote(walk)
    walk.world.paused = PAUSE
    walk.world.members = ready_peer()
    walk.world.switchover = Switchover(NODE, PEER, walk.wall)
    decision = walk.see()
    assert decision.trigger is Trigger.SWITCHOVER
    assert not decision.state.give_up


def test_node_that_handed_over_does_not_take_it_back() -> None:
    walk = eligible()
    promote(walk)
    walk.world.members = ready_peer()
    walk.world.switchover = Switchover(NODE, None, walk.wall)
    assert walk.see().trigger is Trigger.SWITCHOVER
    finish_demotion(walk)
    assert walk.state.role is Role.PASSIVE
    assert walk.world.leader is None
    assert walk.see().actions == ()
    walk.tick(POLICY.switchover_timeout + 1)  # the request expired and nobody took over
    assert walk.see().trigger is Trigger.LEADER_VACANT


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


@pytest.mark.parametrize("target", [PEER, None], ids=["to-peer", "to-anyone"])
@pytest.mark.parametrize("peer", [None, *UNREADY], ids=lambda name: name or "absent")
def test_switchover_is_refused_while_nobody_can_take_over(
    peer: str | None, target: str | None
) -> None:
    """A handover into a cluster with nobody ready would be an outage: the node stays active,
    and hands over as soon as the target is ready."""
    walk = eligible()
    promote(walk)
    walk.world.members = {NODE: unready(NODE, "active")}
    if peer is not None:
        walk.world.members[PEER] = unready(PEER, peer)
    walk.world.switchover = Switchover(NODE, target, walk.wall)
    for _ in range(3):
        walk.tick()
        decision = walk.see()
        assert decision.trigger is Trigger.SWITCHOVER_REFUSED
        assert decision.actions == ()
        assert decision.state.role is Role.ACTIVE
        assert decision.changed  # logged, with the reason
        if peer is None and target is not None:
            assert decision.note == f"switchover refused: {PEER} is not connected"
        elif target is not None:
            assert decision.note.startswith(f"switchover refused: {PEER} cannot take over: ")
        else:
            assert decision.note.startswith("switchover refused: no other node can take over")
    walk.world.members[PEER] = ready(PEER)
    walk.tick()
    decision = walk.see()
    assert decision.trigger is Trigger.SWITCHOVER
    assert decision.state.role is Role.DEMOTING
    assert decision.actions == (
        Action(Step.DRAIN, POLICY.drain_timeout, epoch=EPOCH, reason="switchover"),
    )


@pytest.mark.parametrize("target", [PEER, None], ids=["to-peer", "to-anyone"])
@pytest.mark.parametrize(
    ("mark", "why"),
    [
        ("outdated", "its replica is marked outdated (it missed writes)"),
        ("split brain", "a split brain is reported (replicas diverged)"),
    ],
)
def test_an_active_node_refuses_a_switchover_its_target_would_refuse(
    mark: str, why: str, target: str | None
) -> None:
    """The target does not take over with an outdated replica or a split brain reported: the
    active node stays active and says why (issue 16: it used to demote, leaving nobody), and
    hands over once the mark is cleared."""
    walk = eligible()
    promote(walk)
    walk.world.members = {NODE: unready(NODE, "active"), PEER: ready(PEER)}
    if mark == "outdated":
        walk.world.outdated = frozenset({PEER})
    else:
        walk.world.split_brain = "replicas diverged"
    walk.world.switchover = Switchover(NODE, target, walk.wall)
    walk.tick()
    decision = walk.see()
    assert decision.trigger is Trigger.SWITCHOVER_REFUSED
    assert (decision.state, decision.actions) == (replace(walk.log[-2].state), ())
    assert decision.state.role is Role.ACTIVE
    assert why in decision.note
    walk.world.outdated = frozenset()
    walk.world.split_brain = None
    walk.tick()
    assert walk.see().trigger is Trigger.SWITCHOVER


@pytest.mark.parametrize(
    ("request_", "members", "hands_over"),
    [
        # to a named target: that one must be ready, however ready the others are
        (Switchover(NODE, PEER, WALL), {PEER: ready(PEER)}, True),
        (Switchover(NODE, OTHER, WALL), {PEER: ready(PEER)}, False),
        (
            Switchover(NODE, OTHER, WALL),
            {PEER: ready(PEER), OTHER: unready(OTHER, "relay down")},
            False,
        ),
        (Switchover(NODE, OTHER, WALL), {PEER: unready(PEER, "failed"), OTHER: ready(OTHER)}, True),
        # to anyone: some other member must be ready
        (
            Switchover(NODE, None, WALL),
            {PEER: unready(PEER, "cooling down"), OTHER: ready(OTHER)},
            True,
        ),
        (Switchover(NODE, None, WALL), {PEER: unready(PEER, "cooling down")}, False),
        # never to itself (the operator's CLI never asks for that)
        (Switchover(NODE, NODE, WALL), {NODE: unready(NODE, "active"), PEER: ready(PEER)}, False),
        (Switchover(NODE, None, WALL), {NODE: ready(NODE)}, False),
        # a request from another node is not this node's to act on
        (Switchover(PEER, OTHER, WALL), {OTHER: ready(OTHER)}, False),
        (Switchover(PEER, None, WALL), {PEER: ready(PEER)}, False),
        # a stale request is ignored, a ready target or not
        (Switchover(NODE, PEER, WALL - POLICY.switchover_timeout - 1), {PEER: ready(PEER)}, False),
    ],
)
def test_switchover_goes_only_to_a_member_that_can_take_over(
    request_: Switchover, members: dict[str, Member], hands_over: bool
) -> None:
    world = World(leader=ours(), switchover=request_, members=members)
    decision = decide(active(), world.snapshot(WALL), NOW, POLICY)
    fresh = WALL - request_.at <= POLICY.switchover_timeout
    refused = Trigger.SWITCHOVER_REFUSED if request_.source == NODE and fresh else Trigger.NOTHING
    assert decision.trigger is (Trigger.SWITCHOVER if hands_over else refused)
    assert decision.state.role is (Role.DEMOTING if hands_over else Role.ACTIVE)
    assert bool(decision.actions) is hands_over


# ------------------------------------------------------------------ stopping


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_a_stopping_active_node_hands_over_gracefully_then_stays_passive(paused: bool) -> None:
    walk = eligible()
    promote(walk)
    walk.world.paused = PAUSE if paused else None
    walk.world.stopping = True
    walk.tick()
    decision = walk.see()
    assert decision.trigger is Trigger.STOP
    assert decision.state.role is Role.DEMOTING
    assert not decision.state.give_up  # the node is leaving, not sick
    assert decision.state.reason == "stop"
    assert decision.actions == (
        Action(Step.DRAIN, POLICY.drain_timeout, epoch=EPOCH, reason="stop"),
    )
    assert finish_demotion(walk) == list(DEMOTION)
    assert walk.state.role is Role.PASSIVE
    assert walk.state.cooldown_until <= walk.now
    # Passive and stopping: the agent exits; until it does, it neither takes over (the leader
    # znode is vacant, no cooldown, no interval) nor restarts its relay.
    walk.world.paused = None
    walk.world.relay_running = False
    walk.tick(POLICY.cooldown + POLICY.min_failover_interval)
    decision = walk.see()
    assert decision.trigger is Trigger.NOTHING
    assert decision.actions == ()
    walk.world.relay_running = True
    walk.world.switchover = Switchover(PEER, NODE, walk.wall)  # not even when asked to
    decision = walk.see()
    assert decision.trigger is Trigger.NOTHING
    assert decision.actions == ()


@pytest.mark.parametrize("loss", list(LOSSES))
def test_safety_beats_a_stop(loss: str) -> None:
    """A stopping node that loses its session or leadership lets go at once: the urgent drain."""
    provoke, trigger = LOSSES[loss]
    walk = eligible()
    promote(walk)
    walk.world.stopping = True
    provoke(walk)
    decision = walk.see()
    assert decision.trigger is trigger
    assert decision.actions == (
        Action(Step.DRAIN, POLICY.urgent_drain_timeout, epoch=EPOCH, reason=decision.note),
    )


@pytest.mark.parametrize("success", [True, False], ids=["ok", "failed"])
@pytest.mark.parametrize("step", PROMOTION[1:], ids=str)
def test_a_stop_during_promotion_waits_for_the_step_then_rolls_back(
    step: Step, success: bool
) -> None:
    walk = eligible()
    promote_until(walk, step)
    walk.world.stopping = True
    mark = len(walk.log)
    for _ in range(3):
        walk.tick()
        decision = walk.see()
        assert decision.trigger is Trigger.WAITING
        assert decision.actions == ()
    decision = walk.finish(success, detail="slow")
    assert decision.trigger is Trigger.STOP
    assert decision.state.role is Role.DEMOTING
    assert decision.state.give_up
    assert decision.state.epoch == EPOCH
    assert [a.step for a in decision.actions] == [Step.DRAIN]
    assert decision.actions[0].timeout == POLICY.drain_timeout
    why = "" if success else f"{step.value} failed: slow"
    assert decision.note == f"promotion abandoned ({why or 'stop'}); rolling back"
    assert finish_demotion(walk) == list(DEMOTION)
    assert walk.state.role is Role.PASSIVE
    assert [a.step for d in walk.log[mark:] for a in d.actions] == list(DEMOTION)


@pytest.mark.parametrize("success", [True, False], ids=["won", "lost"])
def test_a_stop_during_acquire_takes_no_further_step(success: bool) -> None:
    walk = eligible()
    start_promotion(walk)
    walk.world.stopping = True
    walk.tick()
    assert walk.see().trigger is Trigger.WAITING
    walk.world.leader = ours(EPOCH) if success else theirs(EPOCH)
    decision = walk.finish(success, epoch=EPOCH if success else 0, detail="node exists")
    assert decision.trigger is Trigger.LEADERSHIP_NOT_TAKEN
    assert decision.note == f"leadership not taken: {'stop' if success else 'node exists'}"
    assert decision.state.role is Role.PASSIVE
    assert decision.actions == ()
    assert not holds_resources(decision.state)
    decision = walk.see()
    if success:  # the leader znode it took is let go before the agent exits
        assert decision.trigger is Trigger.LEADER_STRAY
        assert [a.step for a in decision.actions] == [Step.RELEASE]
        assert finish_demotion(walk) == [Step.RELEASE]
    else:
        assert decision.actions == ()
    assert walk.state.role is Role.PASSIVE


def test_a_stopping_node_finishes_its_demotion() -> None:
    walk = eligible()
    promote(walk)
    walk.world.relay_failures = POLICY.relay_failure_limit
    assert walk.see().trigger is Trigger.RELAY_UNHEALTHY
    walk.world.stopping = True
    assert finish_demotion(walk) == list(DEMOTION)
    assert walk.state.role is Role.PASSIVE
    assert walk.state.cooldown_until == walk.now + POLICY.cooldown  # still a give-up


# ------------------------------------------------------------------ random walks

RANDOM_POLICY = Policy(
    node=NODE,
    relay_failure_limit=2,
    relay_restart_limit=1,
    relay_start_limit=2,
    retry_interval=2.0,
    min_failover_interval=3.0,
    cooldown=10.0,
    switchover_timeout=8.0,
)


def random_leader(rng: random.Random, epoch: int) -> Leader | None:
    owner = rng.choice((None, NODE, PEER))
    if owner is None:
        return None
    return Leader(owner, epoch, since=WALL, ours=owner == NODE)


def random_switchover(rng: random.Random, wall: float) -> Switchover | None:
    if rng.random() < 0.5:
        return None
    source = rng.choice((NODE, PEER))
    target = rng.choice((None, NODE, PEER, OTHER))
    return Switchover(source, target, wall - rng.choice((0.0, 4.0, 8.0, 9.0)))


def random_members(rng: random.Random) -> dict[str, Member]:
    """The other nodes' records: present or not, ready to take over or not."""
    members: dict[str, Member] = {}
    for node, choices in ((PEER, ("ready",) * 6 + tuple(UNREADY)), (OTHER, ("ready", "failed"))):
        why = rng.choice((None, *choices))
        if why == "ready":
            members[node] = ready(node)
        elif why is not None:
            members[node] = unready(node, why)
    return members


def mark(rng: random.Random, world: World) -> None:
    """DRBD marks a replica outdated or reports a split brain, or an operator clears them (drawn
    from a generator of their own, so that the walks' other draws stay what they were)."""
    if rng.random() < (0.2 if world.outdated or world.split_brain else 0.01):
        marks: tuple[frozenset[str], ...] = (frozenset({NODE}), frozenset({PEER}), frozenset())
        world.outdated = frozenset() if world.outdated else rng.choice(marks)
        world.split_brain = "r0 diverged" if rng.random() < 0.2 else None


def perturb(rng: random.Random, world: World, wall: float) -> None:
    """The world changes a little, the way a real cluster does, and sometimes a lot."""
    if rng.random() < 0.02:
        world.session = rng.choices(list(Session), weights=(6, 3, 1))[0]
        if world.session is Session.LOST and world.leader is not None and world.leader.ours:
            world.leader = None
    if world.leader is not None and not world.leader.ours:
        if rng.random() < 0.05:  # the peer dies or hands over
            world.leader = None
    elif rng.random() < 0.01:
        if rng.random() < 0.5:
            world.leader = None
        else:  # the peer takes over
            world.epoch += 1
            world.leader = theirs(world.epoch)
            world.epoch_node = PEER
            world.last_failover = wall
    if rng.random() < (0.1 if world.paused is not None else 0.01):
        world.paused = None if world.paused is not None else PAUSE
    if rng.random() < 0.02:
        world.switchover = random_switchover(rng, wall)
    if rng.random() < 0.05:
        world.members = random_members(rng)
    if rng.random() < 0.03:
        world.relay_running = not world.relay_running
    if rng.random() < 0.05:
        world.relay_failures = rng.randrange(4)
    if rng.random() < 0.006:  # SIGTERM: stays until the agent exits
        world.stopping = True


def arbitrary(rng: random.Random, wall: float, result: StepResult | None) -> Snapshot:
    """A snapshot with every field drawn independently: no coherence at all."""
    world = World(
        session=rng.choice(list(Session)),
        leader=random_leader(rng, rng.randrange(1, 20)),
        epoch=rng.randrange(20),
        epoch_node=rng.choice((None, NODE, PEER)),
        paused=rng.choice((None, PAUSE)),
        switchover=random_switchover(rng, wall),
        last_failover=rng.choice((None, wall, wall - 10)),
        relay_running=rng.random() < 0.7,
        relay_failures=rng.randrange(4),
        members=random_members(rng),
        stopping=rng.random() < 0.2,
    )
    return world.snapshot(wall, result)


def run_executor(rng: random.Random, step: Step, world: World, wall: float) -> StepResult:
    """The outcome of ``step``, and what it did to the world."""
    success = rng.random() < (0.6 if step in (START, RESTART) else 0.9)
    epoch = 0
    if step is Step.ACQUIRE:
        if success and world.leader is None:
            world.epoch += 1
            epoch = world.epoch
            world.leader = ours(epoch)
            world.epoch_node = NODE
            world.last_failover = wall
        else:
            success = False
    elif step is Step.RELEASE and success and world.leader is not None and world.leader.ours:
        world.leader = None
    elif step in (START, RESTART) and success:
        world.relay_running = True
        world.relay_failures = 0
    return StepResult(step, success, round(rng.random(), 3), epoch=epoch)


def may_take_over(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """The essay's rules for taking over, restated independently of the code under test."""
    cluster = snapshot.cluster
    if state.role is not Role.PASSIVE or cluster.session is not Session.CONNECTED:
        return False
    if cluster.leader is not None or not snapshot.local.relay_running:
        return False
    if now < state.cooldown_until or snapshot.local.stopping:
        return False
    if policy.node in cluster.outdated or cluster.split_brain is not None:
        return False
    request = cluster.switchover
    if request is not None and snapshot.wall - request.at <= policy.switchover_timeout:
        return request.source != policy.node and request.target in (None, policy.node)
    if cluster.paused is not None:
        return False
    last = cluster.last_failover
    return last is None or snapshot.wall - last >= policy.min_failover_interval


def may_hand_over(snapshot: Snapshot, policy: Policy) -> bool:
    """A fresh request from this node names a member (or, with no target, some other member)
    that is passive, has its warm relay running and is not cooling down."""
    request = snapshot.cluster.switchover
    if request is None or request.source != policy.node:
        return False
    if snapshot.wall - request.at > policy.switchover_timeout:
        return False
    cluster = snapshot.cluster
    members = cluster.members
    names = {request.target} if request.target is not None else set(members)
    return cluster.split_brain is None and any(
        name != policy.node
        and name in members
        and members[name].role is Role.PASSIVE
        and members[name].relay_running
        and not members[name].cooldown
        and name not in cluster.outdated
        for name in names
    )


# What each step may take, and the step whose success lets go of it again.
TAKES: dict[Step, str] = {
    Step.STORAGE: "spool",
    Step.VIP: "address",
    Step.RELAY: "serving relay",
    RESTART: "serving relay",
}
LETS_GO: dict[Step, str] = {
    Step.STORAGE_DOWN: "spool",
    Step.VIP_DOWN: "address",
    Step.DRAIN: "serving relay",
}


@dataclass
class History:
    """What the checker remembers of the walk so far."""

    term_epoch: int = 0  # returned by the ACQUIRE of the current term, 0 outside a term
    promoted: list[Step] = field(default_factory=list)  # promotion steps done in this term
    demoted: list[Step] = field(default_factory=list)  # demotion steps done in this demotion
    demotion: tuple[Step, ...] = ()  # the steps the current demotion must run
    # What the node may hold on this machine: taken from the moment a step that takes it is
    # started (an abandoned or failed step may have done half of its work), until the step
    # that lets go of it succeeded.
    taken: set[str] = field(default_factory=set)
    seen: set[tuple[Role, Trigger]] = field(default_factory=set)
    activations: int = 0
    demotions: int = 0
    give_ups: int = 0
    preempted: int = 0  # steps in flight cut short by a lost session or leadership
    stops: int = 0  # handovers because the agent was stopping
    handovers: int = 0  # switchovers begun by this active node
    refused: int = 0  # decisions to stay active on a fresh request nobody could take
    exits: int = 0  # the agent stopped, holding nothing
    storage_checked: int = 0  # STORAGE started, with the replica's marks looked at


def check(
    history: History,
    before: AgentState,
    snapshot: Snapshot,
    now: float,
    policy: Policy,
    decision: Decision,
) -> None:
    """The invariants of one decision."""
    after = decision.state
    result = snapshot.result
    cluster = snapshot.cluster
    cause = classify(before, snapshot, now, policy)
    trigger = refine(cause, before, snapshot, now, policy)
    history.seen.add((before.role, trigger))
    # The table is the whole truth: the trigger logged is the one looked up, and the role after
    # the decision is its row's.
    assert decision.trigger is trigger
    if (before.role, trigger) in TRANSITIONS:
        assert after.role is TRANSITIONS[(before.role, trigger)].to
    else:
        assert after == before
    steps = [a.step for a in decision.actions]
    stopping = snapshot.local.stopping

    # What the node may hold: the last step's outcome, then the step it starts now.
    if result is not None and result.ok and result.step in LETS_GO:
        history.taken.discard(LETS_GO[result.step])
    history.taken.update(TAKES[step] for step in steps if step in TAKES)
    if history.taken:
        assert holds_resources(after), (history.taken, after)
    if after.role in (Role.STARTING, Role.PASSIVE, Role.FAILED):
        assert not history.taken
        assert not holds_resources(after)

    # Safety first: a node holding resources (active, or promoting in a term it took) that
    # lost its session or leadership lets go on this very snapshot, even with a step in flight.
    acquired = result is not None and result.step is Step.ACQUIRE and result.ok
    holding = before.role is Role.ACTIVE or (
        before.role is Role.PROMOTING and (before.epoch > 0 or acquired)
    )
    lost = cluster.session is not Session.CONNECTED or not (cluster.leader and cluster.leader.ours)
    assert len(decision.actions) <= 1
    if holding and lost:
        if before.step is not None and result is None:
            history.preempted += 1
        if before.role is Role.PROMOTING and before.epoch == 0:  # nothing taken but the znode
            assert after.role is Role.PASSIVE
            assert steps == []
        else:
            assert after.role is Role.DEMOTING
            assert after.step is Step.DRAIN
            assert decision.actions[0].timeout == policy.urgent_drain_timeout
            assert after.give_up is (before.role is Role.PROMOTING)
    elif graceful_drain(before) and result is None and cluster.session is not Session.CONNECTED:
        # A graceful drain is cut short: an urgent one replaces it, the give-up kept.
        assert trigger is Trigger.SESSION_LOST
        assert after.step is Step.DRAIN and after.give_up is before.give_up
        assert decision.actions[0].timeout == policy.urgent_drain_timeout
        return
    elif before.step is not None and result is None:
        # One step at a time: nothing else happens while a step is in flight.
        assert trigger is Trigger.WAITING
        assert decision.actions == ()
        assert after == before
        return
    if result is not None:
        assert result.step is before.step
    assert after.step == (steps[0] if steps else None)

    # A stopping agent hands over and never takes anything on.
    if stopping:
        assert Step.ACQUIRE not in steps
        assert not set(steps) & set(PROMOTION)
        assert after.role is not Role.ACTIVE
        if before.role is Role.PASSIVE:
            assert START not in steps
        if before.role in (Role.ACTIVE, Role.PROMOTING):
            assert after.role in (Role.DEMOTING, Role.PASSIVE)
            if not (holding and lost):
                assert cause is Trigger.STOP
                history.stops += 1
                if before.role is Role.ACTIVE:
                    assert not after.give_up
                    assert decision.actions[0].timeout == policy.drain_timeout

    # A switchover only to a member that can take it; otherwise the node stays active.
    if trigger is Trigger.SWITCHOVER:
        assert may_hand_over(snapshot, policy)
        history.handovers += 1
    if before.role is Role.ACTIVE and trigger in (Trigger.NOTHING, Trigger.SWITCHOVER_REFUSED):
        assert not may_hand_over(snapshot, policy)
        request = cluster.switchover
        pending = (
            request is not None
            and request.source == policy.node
            and snapshot.wall - request.at <= policy.switchover_timeout
        )
        assert pending is (trigger is Trigger.SWITCHOVER_REFUSED)
        if pending:
            assert decision.note.startswith("switchover refused: ")
        history.refused += pending

    # The current term: its epoch is the one ACQUIRE returned, and every action carries it.
    # The spool is taken only for a replica that may be served.
    if Step.STORAGE in steps:
        assert policy.node not in cluster.outdated and cluster.split_brain is None
        history.storage_checked += 1
    if Step.ACQUIRE in steps:
        assert may_take_over(before, snapshot, now, policy)
        assert decision.actions[0].epoch == 0
        history.term_epoch = 0
        history.promoted = []
    if before.role is Role.PROMOTING and result is not None and result.ok:
        if result.step is Step.ACQUIRE:
            history.term_epoch = result.epoch
        if after.role in (Role.PROMOTING, Role.ACTIVE):
            history.promoted.append(result.step)
    if Step.STORAGE in steps and history.promoted == [Step.ACQUIRE]:
        # Past FENCE without a fence: only over nodes whose leases provably expired.
        assert policy.takeover is Takeover.FENCE_OR_LEASE
        at, why = lease_verdict(snapshot, now, policy)
        assert at is not None and at <= now, why
        history.promoted.append(Step.FENCE)
    for action in decision.actions:
        if action.step is not Step.ACQUIRE:
            assert action.epoch == history.term_epoch, (action, history.term_epoch)
    if after.role in (Role.ACTIVE, Role.DEMOTING) or (
        after.role is Role.PROMOTING and after.step is not Step.ACQUIRE
    ):
        assert after.epoch == history.term_epoch

    # Promotion steps are taken only while connected and holding the leader znode.
    if set(steps) & set(PROMOTION[1:]):
        assert cluster.session is Session.CONNECTED
        assert cluster.leader is not None and cluster.leader.ours

    # ACTIVE only after the complete promotion of this term, and never without a session.
    if after.role is Role.ACTIVE:
        assert cluster.session is Session.CONNECTED
        assert cluster.leader is not None and cluster.leader.ours
        if before.role is not Role.ACTIVE:
            assert before.role is Role.PROMOTING
            assert history.promoted == list(PROMOTION)
            history.activations += 1
        else:
            assert after.epoch == before.epoch

    # Demotion: every step in order, a failed one again, RELEASE last, cooldown iff giving up.
    if after.role is Role.DEMOTING and before.role is not Role.DEMOTING:
        history.demoted = []
        if before.role is Role.PASSIVE:
            history.demotion = (Step.RELEASE,)
            assert not after.give_up
        else:
            history.demotion = DEMOTION
            giving_up = before.role is Role.PROMOTING or decision.trigger is Trigger.RELAY_UNHEALTHY
            assert after.give_up is giving_up
        assert steps == [history.demotion[0]]
    elif before.role is Role.DEMOTING:
        if result is not None and result.ok:
            history.demoted.append(result.step)
        for step in steps:
            assert step is history.demotion[len(history.demoted)]
        if before.step is None and result is None:
            # A failed step waits out retry_interval; giving up leadership waits only for
            # ZooKeeper to answer again.
            back = before.retry_step is Step.RELEASE and cluster.session is Session.CONNECTED
            assert bool(steps) is (now >= before.retry_at or back)
        if after.role is not Role.DEMOTING:
            assert after.role is Role.PASSIVE
            assert history.demoted == list(history.demotion)
            history.demotions += 1
            if before.give_up:
                history.give_ups += 1
                assert after.cooldown_until == now + policy.cooldown
            else:
                assert after.cooldown_until == before.cooldown_until
    if after.role in (Role.PASSIVE, Role.STARTING, Role.FAILED):
        assert after.epoch == 0
        assert not after.give_up
        history.term_epoch = 0

    # What the node publishes as ``holds``: from the leadership taken to the spool released.
    if after.role is Role.PROMOTING:
        assert holds_resources(after) is (after.step is not Step.ACQUIRE)
    if after.role is Role.DEMOTING:
        full = history.demotion == DEMOTION
        assert holds_resources(after) is (full and Step.STORAGE_DOWN not in history.demoted)


def random_walk(seed: int, steps: int) -> History:
    rng = random.Random(seed)
    marks = random.Random(-seed)
    policy = RANDOM_POLICY
    world = World(relay_running=False, epoch=0, epoch_node=None, known=frozenset({NODE, PEER}))
    state = AgentState()
    history = History()
    now, wall = NOW, WALL
    for _ in range(steps):
        done = state.role in (Role.STARTING, Role.PASSIVE, Role.FAILED) and state.step is None
        exits = world.stopping and done
        if exits or rng.random() < 0.003:
            # The agent exits (stopped, holding nothing) or crashes, and starts again with a new
            # ZooKeeper session; its clean slate releases what a former run left held.
            history.exits += exits
            state = AgentState()
            history.term_epoch = 0
            history.taken.clear()
            world.stopping = False
            world.relay_running = rng.random() < 0.5
            if world.leader is not None and world.leader.ours:
                world.leader = None
        elapsed = rng.choice((0.0, 0.1, 0.5, 1.0, 2.5))
        now += elapsed
        wall += elapsed
        perturb(rng, world, wall)
        mark(marks, world)
        # As the coordinator sees it: since when the peer has had no member znode.
        if PEER in world.members:
            world.absent_since = {}
        elif PEER not in world.absent_since:
            world.absent_since = {PEER: now - rng.choice((0.0, 0.0, 1.0, 3.0))}
        if state.role is Role.ACTIVE and rng.random() < 0.1:  # the operator asks it to hand over
            world.switchover = Switchover(NODE, rng.choice((None, PEER, OTHER)), wall)
        # This node's own record, as its agent publishes it.
        world.members[NODE] = Member(
            node=NODE,
            role=state.role,
            epoch=state.epoch,
            relay_running=world.relay_running,
            cooldown=now < state.cooldown_until,
            holds=holds_resources(state),
        )
        result = None
        if state.step is not None and rng.random() < 0.5:
            result = run_executor(rng, state.step, world, wall)
        snapshot = world.snapshot(wall, result)
        if rng.random() < 0.05:
            snapshot = arbitrary(rng, wall, result)
        decision = decide(state, snapshot, now, policy)
        try:
            check(history, state, snapshot, now, policy, decision)
        except AssertionError as error:
            raise AssertionError(
                f"seed {seed}: {state}\n{snapshot}\nnow={now}\n-> {decision}"
            ) from error
        state = decision.state
    return history


SEEDS = (1, 2, 3, 4, 5, 6, 7, 8)
_WALKS: dict[int, History] = {}


def walked(seed: int) -> History:
    """The history of the walk for ``seed`` (each walk runs once per test session)."""
    if seed not in _WALKS:
        _WALKS[seed] = random_walk(seed, 4000)
    return _WALKS[seed]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_walk_keeps_the_invariants(seed: int) -> None:
    history = walked(seed)
    assert history.activations >= 5
    assert history.demotions >= 5
    assert history.give_ups >= 1


def test_random_walks_visit_every_row_of_the_table() -> None:
    seen: set[tuple[Role, Trigger]] = set()
    for seed in SEEDS:
        seen |= walked(seed).seen
    assert set(TRANSITIONS) <= seen


def test_random_walks_exercise_the_new_rules() -> None:
    """The invariants above were checked on walks that did meet each rule, more than once."""
    histories = [walked(seed) for seed in SEEDS]
    assert sum(h.preempted for h in histories) >= 5
    assert sum(h.stops for h in histories) >= 5
    assert sum(h.exits for h in histories) >= 5
    assert sum(h.handovers for h in histories) >= 5
    assert sum(h.refused for h in histories) >= 5
    assert sum(h.storage_checked for h in histories) >= 5


# ------------------------------------------------------------------ time limits of the parts


def test_the_action_shares_its_time_limit_among_its_parts() -> None:
    """How long each fence chain and the relay's graceful stop may take is decided here; the
    executor only applies it."""
    fence = Action(Step.FENCE, 30.0, fence=(PEER, OTHER))
    assert fence.fence_timeout == pytest.approx(13.5)
    assert Action(Step.FENCE, 30.0).fence_timeout == pytest.approx(27.0)
    drain = Action(Step.DRAIN, 10.0)
    assert drain.graceful_timeout == pytest.approx(8.0)
    assert drain.deliveries_timeout == pytest.approx(6.0)


# ---------------------------------------------------------------- what a node holds


@pytest.mark.parametrize(
    ("state", "holds"),
    [
        (AgentState(), False),
        (AgentState(step=START), False),
        (AgentState(role=Role.FAILED, attempts=3), False),
        (AgentState(role=Role.PASSIVE), False),
        (AgentState(role=Role.PASSIVE, step=START, cooldown_until=NOW + 5), False),
        # promoting: nothing before the leadership is taken, everything may follow after it
        (promoting(Step.ACQUIRE), False),
        (promoting(Step.FENCE), True),
        (promoting(Step.STORAGE), True),
        (promoting(Step.PUBLISH), True),
        (active(), True),
        (active(step=RESTART, attempts=1), True),
        # demoting: until the spool is released (the relay and the address go before it)
        (demoting(Step.DRAIN), True),
        (demoting(Step.VIP_DOWN, steps=((Step.DRAIN, 0.1),)), True),
        (demoting(Step.STORAGE_DOWN, steps=((Step.DRAIN, 0.1), (Step.VIP_DOWN, 0.1))), True),
        (
            demoting(
                None,
                steps=((Step.DRAIN, 0.1), (Step.VIP_DOWN, 0.1)),
                retry_step=Step.STORAGE_DOWN,
                attempts=2,
            ),
            True,
        ),
        (demoting(Step.RELEASE, steps=tuple((s, 0.1) for s in DEMOTION[:-1])), False),
        (
            demoting(None, steps=tuple((s, 0.1) for s in DEMOTION[:-1]), retry_step=Step.RELEASE),
            False,
        ),
        # releasing a stray leadership: a passive node took nothing else
        (demoting(Step.RELEASE, reason="stray leader", epoch=0), False),
        (demoting(None, reason="stray leader", epoch=0, retry_step=Step.RELEASE), False),
    ],
)
def test_holds_resources(state: AgentState, holds: bool) -> None:
    assert holds_resources(state) is holds


def test_holds_resources_along_a_promotion_and_a_demotion() -> None:
    """Holding begins with the leadership and ends when the spool is released."""
    walk = eligible()
    start_promotion(walk)
    assert not holds_resources(walk.state)  # ACQUIRE in flight: it may lose the race
    acquire(walk)
    for _ in PROMOTION[1:]:
        assert holds_resources(walk.state), walk.state.step
        walk.tick()
        walk.finish()
    assert walk.log[-1].state.role is Role.ACTIVE
    assert holds_resources(walk.state)
    walk.world.members = ready_peer()
    walk.world.switchover = Switchover(NODE, PEER, walk.wall)
    assert walk.see().state.role is Role.DEMOTING
    held: list[tuple[Step | None, bool]] = []
    while walk.state.role is Role.DEMOTING:
        held.append((walk.state.step, holds_resources(walk.state)))
        if walk.state.step is Step.RELEASE:
            walk.world.leader = None
        walk.tick()
        walk.finish()
    assert held == [
        (Step.DRAIN, True),
        (Step.VIP_DOWN, True),
        (Step.STORAGE_DOWN, True),
        (Step.RELEASE, False),
    ]
    assert not holds_resources(walk.state)


# ---------------------------------------------------------------- whom to fence


def fence_world(
    known: set[str], members: dict[str, tuple[Role, bool]], epoch_node: str | None = None
) -> Snapshot:
    """The view when leadership was just taken; ``members``: each record's role and ``holds``."""
    view = ClusterView(
        session=Session.CONNECTED,
        leader=ours(),
        epoch=EPOCH,
        epoch_node=epoch_node,
        members={
            name: Member(node=name, role=role, holds=holds)
            for name, (role, holds) in members.items()
        },
        known_nodes=frozenset(known),
    )
    return Snapshot(cluster=view, local=LocalView(relay_running=True), wall=WALL)


TAKING = (Role.PROMOTING, True)  # this node, as it publishes itself once it took leadership


@pytest.mark.parametrize(
    ("known", "members", "epoch_node", "expected"),
    [
        # The former active node crashed: its member znode is gone.
        ({NODE, PEER}, {NODE: TAKING}, PEER, (PEER,)),
        # A failed fence, then a retry: the epoch record names this node, the peer is still gone.
        ({NODE, PEER}, {NODE: TAKING}, NODE, (PEER,)),
        # A switchover: the peer is connected and passive, it holds nothing.
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.PASSIVE, False)}, PEER, ()),
        # ... or still demoting, with everything but leadership released.
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.DEMOTING, False)}, PEER, ()),
        # A cold start: the peer lost the race for leadership, it took nothing.
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.PROMOTING, False)}, NODE, ()),
        # Connected but holding by its own account: it may hold the spool.
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.DEMOTING, True)}, PEER, (PEER,)),
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.ACTIVE, True)}, PEER, (PEER,)),
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.PROMOTING, True)}, PEER, (PEER,)),
        # Every node that is not provably clean, in a stable order; never this node.
        ({NODE, PEER, OTHER}, {NODE: TAKING, OTHER: (Role.FAILED, False)}, None, (PEER,)),
        ({NODE, OTHER}, {NODE: TAKING}, PEER, (PEER, OTHER)),
        ({NODE}, {NODE: TAKING}, None, ()),
    ],
)
def test_fence_targets_are_every_node_not_known_to_hold_nothing(
    known: set[str],
    members: dict[str, tuple[Role, bool]],
    epoch_node: str | None,
    expected: tuple[str, ...],
) -> None:
    assert fence_targets(fence_world(known, members, epoch_node), POLICY) == expected


@pytest.mark.parametrize("holds", [False, True], ids=["clean", "holding"])
@pytest.mark.parametrize("role", list(Role), ids=str)
def test_a_member_is_clean_exactly_when_it_says_it_holds_nothing(role: Role, holds: bool) -> None:
    """The record's ``holds`` decides, not its role: the publisher knows what it took."""
    snapshot = fence_world({NODE, PEER}, {NODE: TAKING, PEER: (role, holds)}, PEER)
    assert fence_targets(snapshot, POLICY) == ((PEER,) if holds else ())


def test_the_fence_action_names_the_targets_seen_when_leadership_was_taken() -> None:
    state = promoting(Step.ACQUIRE, epoch=0)
    snapshot = replace(
        fence_world({NODE, PEER}, {NODE: TAKING}, NODE), result=ok(Step.ACQUIRE, EPOCH)
    )
    decision = decide(state, snapshot, NOW, POLICY)
    (action,) = decision.actions
    assert action.step is Step.FENCE and action.fence == (PEER,) and action.epoch == EPOCH


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
        return Snapshot(view, LocalView(relay_running=True, relay_ready=True), self.wall, result)

    def decide(self, node: str, result: StepResult | None = None) -> Decision:
        snapshot = self.snapshot(node, result)
        decision = decide(self.states[node], snapshot, self.now, Policy(node=node))
        self.states[node] = decision.state
        self.fenced.extend(a.fence for a in decision.actions if a.step is Step.FENCE)
        return decision

    def execute(self, node: str) -> StepResult:
        """The executor runs ``node``'s step in flight against the shared ZooKeeper."""
        step = self.states[node].step
        assert step is not None
        self.now += 0.1
        self.wall += 0.1
        if step is Step.ACQUIRE:
            if self.leader is not None:
                return StepResult(step, False, 0.1, "node exists")
            self.epoch += 1
            self.leader = self.epoch_node = node
            return StepResult(step, True, 0.1, epoch=self.epoch)
        if step is Step.RELEASE and self.leader == node:
            self.leader = None
        if step is Step.PUBLISH:
            self.switchover = None
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


@pytest.mark.parametrize("loser_heard_first", [False, True], ids=["loser-acquiring", "loser-back"])
def test_the_loser_of_a_cold_start_race_is_not_fenced(loser_heard_first: bool) -> None:
    pair = Pair({NODE: AgentState(role=Role.PASSIVE), PEER: AgentState(role=Role.PASSIVE)})
    for node in (NODE, PEER):  # both see the vacant leadership and try to take it
        assert pair.decide(node).trigger is Trigger.LEADER_VACANT
    loser = pair.record(PEER)  # what the winner sees of the loser while both are acquiring
    assert (loser.role, loser.holds) == (Role.PROMOTING, False)
    won, lost = pair.execute(NODE), pair.execute(PEER)
    assert won.ok and not lost.ok
    if loser_heard_first:
        assert pair.decide(PEER, lost).state.role is Role.PASSIVE
    decision = pair.decide(NODE, won)
    (fence,) = decision.actions
    assert fence.step is Step.FENCE
    assert fence.fence == ()  # the loser is connected and holds nothing: no shooting it
    if not loser_heard_first:
        assert pair.decide(PEER, lost).state.role is Role.PASSIVE
    pair.settle()
    assert pair.states[NODE].role is Role.ACTIVE
    assert pair.states[PEER] == AgentState(role=Role.PASSIVE)
    assert pair.fenced == [()]


def test_a_node_releasing_a_stray_leadership_is_not_fenced() -> None:
    """ACQUIRE won, but the session was suspended when its result came: the node rolled back to
    passive, and gives the leader znode up once connected again. The peer takes over the moment
    the znode is gone, while the node still publishes DEMOTING: it must not be fenced."""
    pair = Pair({NODE: AgentState(role=Role.PASSIVE), PEER: AgentState(role=Role.PASSIVE)})
    assert pair.decide(NODE).trigger is Trigger.LEADER_VACANT
    won = pair.execute(NODE)
    pair.suspended.add(NODE)
    assert pair.decide(NODE, won).state.role is Role.PASSIVE
    pair.suspended.clear()
    decision = pair.decide(NODE)
    assert decision.trigger is Trigger.LEADER_STRAY
    assert [a.step for a in decision.actions] == [Step.RELEASE]
    assert pair.record(NODE).role is Role.DEMOTING
    assert not pair.record(NODE).holds
    released = pair.execute(NODE)  # the znode is gone; the node has not heard back yet
    assert pair.decide(PEER).trigger is Trigger.LEADER_VACANT
    decision = pair.run(PEER)
    assert [a.step for a in decision.actions] == [Step.FENCE]
    assert pair.fenced == [()]
    assert pair.decide(NODE, released).state == AgentState(
        role=Role.PASSIVE, steps=((Step.RELEASE, 0.1),)
    )
    pair.settle()
    assert pair.states[PEER].role is Role.ACTIVE
    assert pair.fenced == [()]


def two_nodes_one_active() -> Pair:
    pair = Pair({NODE: AgentState(role=Role.PASSIVE), PEER: AgentState(role=Role.PASSIVE)})
    assert pair.decide(NODE).trigger is Trigger.LEADER_VACANT
    pair.settle()
    assert pair.states[NODE].role is Role.ACTIVE
    assert pair.states[PEER].role is Role.PASSIVE
    pair.fenced.clear()
    pair.now += POLICY.min_failover_interval
    pair.wall += POLICY.min_failover_interval
    return pair


def test_a_node_that_stepped_down_cleanly_is_not_fenced() -> None:
    pair = two_nodes_one_active()
    pair.switchover = Switchover(NODE, PEER, pair.wall)
    assert pair.decide(NODE).trigger is Trigger.SWITCHOVER
    held = []
    while pair.states[NODE].step is not None:
        held.append(pair.record(NODE).holds)
        assert pair.decide(PEER).actions == ()  # the leadership is still taken
        pair.run(NODE)
    assert held == [True, True, True, False]  # DRAIN, VIP_DOWN, STORAGE_DOWN, RELEASE
    assert pair.decide(PEER).trigger is Trigger.LEADER_VACANT
    pair.settle()
    assert pair.states[PEER].role is Role.ACTIVE
    assert pair.states[NODE].role is Role.PASSIVE
    assert pair.fenced == [()]


def test_a_node_that_vanished_while_holding_is_fenced() -> None:
    pair = two_nodes_one_active()
    pair.connected.discard(NODE)  # it crashed: its session expired, its znodes are gone
    pair.leader = None
    assert pair.decide(PEER).trigger is Trigger.LEADER_VACANT
    pair.settle()
    assert pair.states[PEER].role is Role.ACTIVE
    assert pair.fenced == [(NODE,)]


@pytest.mark.parametrize(
    ("trigger", "urgent"),
    [
        (Trigger.SESSION_LOST, True),
        (Trigger.LEADERSHIP_LOST, True),
        (Trigger.SWITCHOVER, False),
        (Trigger.STOP, False),
        (Trigger.RELAY_UNHEALTHY, False),
    ],
)
def test_the_drain_is_short_when_another_node_may_be_taking_over(
    trigger: Trigger, urgent: bool
) -> None:
    expected = POLICY.urgent_drain_timeout if urgent else POLICY.drain_timeout
    assert POLICY.drain_time(trigger.value) == expected
    assert POLICY.urgent_drain_timeout < POLICY.drain_timeout


def test_a_switchover_never_hands_over_to_the_node_that_asks_to_leave() -> None:
    # A stale record of this node itself looking ready must not count as a target.
    members = {NODE: ready(NODE)}
    for target in (NODE, None):
        world = World(leader=ours(), switchover=Switchover(NODE, target, WALL), members=members)
        decision = decide(active(), world.snapshot(WALL), NOW, POLICY)
        assert decision.trigger is Trigger.SWITCHOVER_REFUSED and decision.actions == ()


@pytest.mark.parametrize("role", [Role.STARTING, Role.FAILED, Role.PASSIVE])
def test_a_stopping_agent_does_not_start_its_relay(role: Role) -> None:
    world = World(relay_running=False, stopping=True)
    decision = decide(AgentState(role=role), world.snapshot(WALL), NOW, POLICY)
    assert decision.actions == ()
