"""The agent's pure decision core: every row of the table, whole walks, safety rules, invariants.

Everything here is plain data. States and snapshots are built by hand (or drawn at random from a
seeded generator) and handed to ``decide``; there is no clock, no ZooKeeper and no patching. The
executor is simulated by delivering a ``StepResult`` for the step in flight.
"""

from __future__ import annotations

import ast
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from cluster import state as state_module
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
    Then,
    Trigger,
    classify,
    decide,
    fence_targets,
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

    def snapshot(self, wall: float, result: StepResult | None = None) -> Snapshot:
        cluster = ClusterView(
            session=self.session,
            leader=self.leader,
            epoch=self.epoch,
            epoch_node=self.epoch_node,
            paused=self.paused,
            switchover=self.switchover,
            last_failover=self.last_failover,
        )
        local = LocalView(
            relay_running=self.relay_running,
            relay_ready=self.relay_ready,
            relay_failures=self.relay_failures,
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
        promoting(Step.FENCE), World(leader=ours()), failed(Step.FENCE), steps=(Step.DRAIN,)
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
    (Role.ACTIVE, Trigger.SESSION_LOST): Case(
        active(), World(session=Session.LOST, leader=ours()), steps=(Step.DRAIN,)
    ),
    (Role.ACTIVE, Trigger.LEADERSHIP_LOST): Case(
        active(), World(leader=theirs(EPOCH + 1)), steps=(Step.DRAIN,)
    ),
    (Role.ACTIVE, Trigger.SWITCHOVER): Case(
        active(),
        World(leader=ours(), switchover=Switchover(NODE, PEER, WALL - 1)),
        steps=(Step.DRAIN,),
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
    assert set(CASES) == set(TRANSITIONS)


def check_effect(then: Then, before: AgentState, case: Case, decision: Decision) -> None:
    """What each kind of transition promises besides its role and the steps it starts."""
    after = decision.state
    result = case.result
    match then:
        case Then.NOTHING:
            assert after == replace(before, role=after.role)
        case Then.START_RELAY | Then.RESTART_RELAY:
            assert after.attempts == before.attempts
        case Then.RELAY_STARTED:
            assert after.attempts == 0
        case Then.RELAY_START_FAILED:
            assert after.attempts == before.attempts + 1
            if before.role is not Role.ACTIVE:
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
        case Then.BEGIN_DEMOTION | Then.BEGIN_GIVING_UP | Then.ROLL_BACK:
            assert after.give_up is (then is not Then.BEGIN_DEMOTION)
            assert after.started == NOW
            assert after.steps == ()
            assert after.epoch == EPOCH
            assert after.reason == decision.trigger.value
            (drain,) = decision.actions
            assert drain.timeout == POLICY.drain_time(decision.trigger.value)
            assert drain.reason == decision.note
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
class Diversion:
    """A row whose effect documents a different role than the row's ``to``."""

    key: tuple[Role, Trigger]
    state: AgentState
    world: World
    result: StepResult | None
    role: Role
    steps: tuple[Step, ...] = ()
    trigger: Trigger | None = None  # the trigger the decision reports, when it is re-labelled


DIVERSIONS: dict[str, Diversion] = {
    "starting: too many failed starts": Diversion(
        (Role.STARTING, Trigger.STEP_FAILED),
        AgentState(step=START, attempts=POLICY.relay_start_limit - 1),
        World(relay_running=False),
        failed(START),
        Role.FAILED,
    ),
    "passive: too many failed starts": Diversion(
        (Role.PASSIVE, Trigger.STEP_FAILED),
        AgentState(role=Role.PASSIVE, step=START, attempts=POLICY.relay_start_limit - 1),
        World(relay_running=False),
        failed(START),
        Role.FAILED,
    ),
    "active: too many failed restarts": Diversion(
        (Role.ACTIVE, Trigger.STEP_FAILED),
        active(step=RESTART, attempts=POLICY.relay_restart_limit),
        World(leader=ours(), relay_running=False),
        failed(RESTART),
        Role.DEMOTING,
        (Step.DRAIN,),
        Trigger.RELAY_UNHEALTHY,
    ),
    "promoting: publish done": Diversion(
        (Role.PROMOTING, Trigger.STEP_DONE),
        promoting(Step.PUBLISH),
        World(leader=ours()),
        ok(Step.PUBLISH),
        Role.ACTIVE,
    ),
    "promoting: acquire lost": Diversion(
        (Role.PROMOTING, Trigger.STEP_FAILED),
        promoting(Step.ACQUIRE),
        World(leader=theirs(EPOCH)),
        failed(Step.ACQUIRE),
        Role.PASSIVE,
    ),
    "demoting: release done": Diversion(
        (Role.DEMOTING, Trigger.STEP_DONE),
        demoting(Step.RELEASE),
        World(),
        ok(Step.RELEASE),
        Role.PASSIVE,
    ),
}


@pytest.mark.parametrize("name", list(DIVERSIONS))
def test_documented_diversions(name: str) -> None:
    case = DIVERSIONS[name]
    snapshot = case.world.snapshot(WALL, case.result)
    assert classify(case.state, snapshot, NOW, POLICY) is case.key[1]
    assert TRANSITIONS[case.key].to is not case.role

    decision = decide(case.state, snapshot, NOW, POLICY)

    assert decision.state.role is case.role
    assert tuple(a.step for a in decision.actions) == case.steps
    assert decision.trigger is (case.trigger or case.key[1])
    if case.role is Role.DEMOTING:
        assert decision.state.give_up


# Pairs ``classify`` never produces for a role: safety triggers concern only a node holding or
# taking resources, each role has its own health and opportunity triggers, and a promotion always
# has a step in flight.
UNREACHABLE: frozenset[tuple[Role, Trigger]] = frozenset(
    {(role, t) for role in Role for t in (Trigger.SESSION_LOST, Trigger.LEADERSHIP_LOST)}
    - {(Role.PROMOTING, t) for t in (Trigger.SESSION_LOST, Trigger.LEADERSHIP_LOST)}
    - {(Role.ACTIVE, t) for t in (Trigger.SESSION_LOST, Trigger.LEADERSHIP_LOST)}
    | {(role, Trigger.RELAY_WARM) for role in Role if role not in (Role.STARTING, Role.FAILED)}
    | {(role, Trigger.RELAY_DOWN) for role in (Role.PROMOTING, Role.DEMOTING)}
    | {(role, Trigger.RELAY_UNHEALTHY) for role in Role if role is not Role.ACTIVE}
    | {(role, Trigger.SWITCHOVER) for role in Role if role is not Role.ACTIVE}
    | {(role, t) for role in Role if role is not Role.PASSIVE for t in (Trigger.LEADER_VACANT,)}
    | {(role, Trigger.LEADER_STRAY) for role in Role if role is not Role.PASSIVE}
    | {(role, Trigger.RETRY) for role in Role if role is not Role.DEMOTING}
    | {(Role.PROMOTING, Trigger.NOTHING)}
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
        promoting(Step.PUBLISH),
        active(),
        active(step=RESTART, attempts=1),
        demoting(Step.DRAIN),
        demoting(Step.RELEASE, give_up=True),
        demoting(None, retry_step=Step.STORAGE_DOWN, retry_at=NOW + 1),
        demoting(None, retry_step=Step.STORAGE_DOWN, retry_at=NOW),
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
                            worlds.append(
                                World(
                                    session=session,
                                    leader=leader,
                                    relay_running=running,
                                    relay_failures=failures,
                                    paused=paused,
                                    switchover=switchover,
                                )
                            )
    return worlds


def grid_results(state: AgentState) -> list[StepResult | None]:
    if state.step is None:
        return [None]
    epoch = EPOCH if state.step is Step.ACQUIRE else 0
    return [None, ok(state.step, epoch), failed(state.step)]


def test_pairs_missing_from_the_table_do_nothing() -> None:
    """Over a grid of states and snapshots: a pair not in the table leaves everything as it was."""
    seen: set[tuple[Role, Trigger]] = set()
    for state in grid_states():
        for world in grid_worlds():
            for result in grid_results(state):
                snapshot = world.snapshot(WALL, result)
                trigger = classify(state, snapshot, NOW, POLICY)
                seen.add((state.role, trigger))
                if (state.role, trigger) in TRANSITIONS:
                    continue
                decision = decide(state, snapshot, NOW, POLICY)
                assert decision.actions == ()
                assert decision.state == state
                assert decision.trigger is trigger
                assert not decision.changed
    assert set(TRANSITIONS) <= seen
    missing = {(role, trigger) for role in Role for trigger in Trigger} - set(TRANSITIONS)
    assert seen & UNREACHABLE == set()
    # Every pair outside the table was either seen above or is one classify never produces.
    assert missing - seen == UNREACHABLE
    assert {(role, Trigger.WAITING) for role in Role} <= seen


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
    walk.world.switchover = Switchover(NODE, PEER, walk.wall)


def set_switchover_to_anyone(walk: Walk) -> None:
    walk.world.switchover = Switchover(NODE, None, walk.wall)


def set_relay_unhealthy(walk: Walk) -> None:
    walk.world.relay_failures = walk.policy.relay_failure_limit - 1
    assert walk.see().actions == ()  # one check short of the limit: nothing yet
    walk.world.relay_failures = walk.policy.relay_failure_limit


def set_relay_unrestartable(walk: Walk) -> None:
    """Every restart the limit allows fails, and one more is left in flight."""
    walk.world.relay_running = False
    for _ in range(walk.policy.relay_restart_limit):
        decision = walk.see()
        assert [a.step for a in decision.actions] == [RESTART]
        decision = walk.finish(False, detail="spool locked")
        assert decision.state.role is Role.ACTIVE
        assert decision.actions == ()
    decision = walk.see()
    assert [a.step for a in decision.actions] == [RESTART]
    walk.tick()


def fail_the_restart(walk: Walk) -> Decision:
    return walk.finish(False, detail="spool locked")


CAUSES: dict[str, tuple[Callable[[Walk], None], Trigger, bool]] = {
    "session suspended": (set_session_suspended, Trigger.SESSION_LOST, False),
    "session lost": (set_session_lost, Trigger.SESSION_LOST, False),
    "leadership lost": (set_leadership_lost, Trigger.LEADERSHIP_LOST, False),
    "switchover": (set_switchover, Trigger.SWITCHOVER, False),
    "switchover to anyone": (set_switchover_to_anyone, Trigger.SWITCHOVER, False),
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
    decision = fail_the_restart(walk) if walk.state.step is RESTART else walk.see()

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


def test_relay_restarted_in_place_when_its_process_is_gone() -> None:
    walk = eligible()
    promote(walk)
    for _ in range(3):  # a successful restart resets the count of failures
        walk.world.relay_running = False
        decision = walk.see()
        assert decision.trigger is Trigger.RELAY_DOWN
        assert decision.actions == (Action(RESTART, POLICY.timeout(RESTART), epoch=EPOCH),)
        for _ in range(POLICY.relay_restart_limit):
            assert fail_the_restart(walk).state.role is Role.ACTIVE
            assert [a.step for a in walk.see().actions] == [RESTART]
        walk.world.relay_running = True
        decision = walk.finish()
        assert decision.state.role is Role.ACTIVE
        assert decision.state.attempts == 0
        assert walk.see().actions == ()


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
    walk.world.switchover = Switchover(NODE, PEER, walk.wall - POLICY.switchover_timeout - 0.001)
    assert walk.see().actions == ()
    assert walk.state.role is Role.ACTIVE


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
        # Whatever the world says, nothing happens before retry_interval...
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
    "storage": promoting(Step.STORAGE),
    "publish": promoting(Step.PUBLISH),
    "restart": active(step=RESTART),
    "drain": demoting(Step.DRAIN, give_up=True),
    "release": demoting(Step.RELEASE),
    "stray release": demoting(Step.RELEASE, reason="stray leader", epoch=0),
}

ALARMS: dict[str, World] = {
    "quiet": World(leader=ours()),
    "suspended": World(session=Session.SUSPENDED, leader=ours()),
    "lost": World(session=Session.LOST),
    "taken over": World(leader=theirs(EPOCH + 1)),
    "vacant": World(),
    "everything": World(
        session=Session.SUSPENDED,
        leader=theirs(EPOCH + 1),
        paused=PAUSE,
        switchover=Switchover(NODE, PEER, WALL),
        relay_running=False,
        relay_failures=99,
    ),
}


@pytest.mark.parametrize("alarm", list(ALARMS))
@pytest.mark.parametrize("name", list(IN_FLIGHT))
def test_nothing_happens_while_a_step_is_in_flight(name: str, alarm: str) -> None:
    state = IN_FLIGHT[name]
    decision = decide(state, ALARMS[alarm].snapshot(WALL), NOW, POLICY)
    assert decision.trigger is Trigger.WAITING
    assert decision.actions == ()
    assert decision.state == state
    assert not decision.changed


@pytest.mark.parametrize("step", [Step.STORAGE, Step.PUBLISH], ids=str)
def test_safety_takes_effect_when_the_promotion_step_ends(step: Step) -> None:
    walk = eligible()
    promote_until(walk, step)
    walk.world.session = Session.SUSPENDED
    for _ in range(5):
        walk.tick()
        assert walk.see().actions == ()
    decision = walk.finish()  # the step succeeded, but the session is gone
    assert decision.trigger is Trigger.SESSION_LOST
    assert decision.state.role is Role.DEMOTING
    assert [a.step for a in decision.actions] == [Step.DRAIN]


def test_safety_takes_effect_when_the_restart_ends() -> None:
    walk = eligible()
    promote(walk)
    walk.world.relay_running = False
    walk.see()
    walk.world.session = Session.LOST
    walk.world.leader = None
    assert walk.see().trigger is Trigger.WAITING
    walk.world.relay_running = True
    decision = walk.finish()
    assert decision.trigger is Trigger.SESSION_LOST
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
    walk.world.switchover = Switchover(NODE, PEER, walk.wall)
    decision = walk.see()
    assert decision.trigger is Trigger.SWITCHOVER
    assert not decision.state.give_up


def test_node_that_handed_over_does_not_take_it_back() -> None:
    walk = eligible()
    promote(walk)
    walk.world.switchover = Switchover(NODE, None, walk.wall)
    walk.see()
    finish_demotion(walk)
    assert walk.state.role is Role.PASSIVE
    assert walk.world.leader is None
    assert walk.see().actions == ()
    walk.tick(POLICY.switchover_timeout + 1)  # the request expired and nobody took over
    assert walk.see().trigger is Trigger.LEADER_VACANT


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
    if rng.random() < 0.03:
        world.relay_running = not world.relay_running
    if rng.random() < 0.05:
        world.relay_failures = rng.randrange(4)


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
    if now < state.cooldown_until:
        return False
    request = cluster.switchover
    if request is not None and snapshot.wall - request.at <= policy.switchover_timeout:
        return request.source != policy.node and request.target in (None, policy.node)
    if cluster.paused is not None:
        return False
    last = cluster.last_failover
    return last is None or snapshot.wall - last >= policy.min_failover_interval


@dataclass
class History:
    """What the checker remembers of the walk so far."""

    term_epoch: int = 0  # returned by the ACQUIRE of the current term, 0 outside a term
    promoted: list[Step] = field(default_factory=list)  # promotion steps done in this term
    demoted: list[Step] = field(default_factory=list)  # demotion steps done in this demotion
    demotion: tuple[Step, ...] = ()  # the steps the current demotion must run
    seen: set[tuple[Role, Trigger]] = field(default_factory=set)
    activations: int = 0
    demotions: int = 0
    give_ups: int = 0


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
    trigger = classify(before, snapshot, now, policy)
    history.seen.add((before.role, trigger))
    steps = [a.step for a in decision.actions]

    # One step at a time, and only when none is in flight or the one in flight just ended.
    assert len(decision.actions) <= 1
    if before.step is not None and result is None:
        assert trigger is Trigger.WAITING
        assert decision.actions == ()
        assert after == before
        return
    if result is not None:
        assert result.step is before.step
    assert after.step == (steps[0] if steps else None)

    # The current term: its epoch is the one ACQUIRE returned, and every action carries it.
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
    for action in decision.actions:
        if action.step is not Step.ACQUIRE:
            assert action.epoch == history.term_epoch, (action, history.term_epoch)
    if after.role in (Role.ACTIVE, Role.DEMOTING) or (
        after.role is Role.PROMOTING and after.step is not Step.ACQUIRE
    ):
        assert after.epoch == history.term_epoch

    # Promotion steps are taken only while connected and holding the leader znode.
    if set(steps) & set(PROMOTION[1:]):
        assert snapshot.cluster.session is Session.CONNECTED
        assert snapshot.cluster.leader is not None and snapshot.cluster.leader.ours

    # ACTIVE only after the complete promotion of this term, and never without a session.
    if after.role is Role.ACTIVE:
        assert snapshot.cluster.session is Session.CONNECTED
        assert snapshot.cluster.leader is not None and snapshot.cluster.leader.ours
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
            assert bool(steps) is (now >= before.retry_at)
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


def random_walk(seed: int, steps: int) -> History:
    rng = random.Random(seed)
    policy = RANDOM_POLICY
    world = World(relay_running=False, epoch=0, epoch_node=None)
    state = AgentState()
    history = History()
    now, wall = NOW, WALL
    for _ in range(steps):
        if rng.random() < 0.003:  # the agent restarts, with a new ZooKeeper session
            state = AgentState()
            history.term_epoch = 0
            world.relay_running = rng.random() < 0.5
            if world.leader is not None and world.leader.ours:
                world.leader = None
        elapsed = rng.choice((0.0, 0.1, 0.5, 1.0, 2.5))
        now += elapsed
        wall += elapsed
        perturb(rng, world, wall)
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


SEEDS = (1, 2, 3, 4, 5)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_walk_keeps_the_invariants(seed: int) -> None:
    history = random_walk(seed, 4000)
    assert history.activations >= 5
    assert history.demotions >= 5
    assert history.give_ups >= 1


def test_random_walks_visit_every_row_of_the_table() -> None:
    seen: set[tuple[Role, Trigger]] = set()
    for seed in SEEDS:
        seen |= random_walk(seed, 4000).seen
    assert set(TRANSITIONS) <= seen


# ------------------------------------------------------------------ purity


def test_state_imports_only_the_standard_library() -> None:
    path = Path(state_module.__file__)
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            assert node.module is not None
            modules.add(node.module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in {"__import__", "open", "exec", "eval"}
    roots = {name.split(".")[0] for name in modules}
    assert roots, "the parse found no imports at all"
    assert roots <= sys.stdlib_module_names
    forbidden = {"kazoo", "pyroute2", "asyncio", "subprocess", "socket", "time", "os", "threading"}
    assert not roots & forbidden


# ---------------------------------------------------------------- whom to fence


def fence_world(
    known: set[str], members: dict[str, Role], epoch_node: str | None = None
) -> Snapshot:
    view = ClusterView(
        session=Session.CONNECTED,
        leader=ours(),
        epoch=EPOCH,
        epoch_node=epoch_node,
        members={name: Member(node=name, role=role) for name, role in members.items()},
        known_nodes=frozenset(known),
    )
    return Snapshot(cluster=view, local=LocalView(relay_running=True), wall=WALL)


@pytest.mark.parametrize(
    ("known", "members", "epoch_node", "expected"),
    [
        # The former active node crashed: its member znode is gone.
        ({NODE, PEER}, {NODE: Role.PROMOTING}, PEER, (PEER,)),
        # A failed fence, then a retry: the epoch record names this node, the peer is still gone.
        ({NODE, PEER}, {NODE: Role.PROMOTING}, NODE, (PEER,)),
        # A switchover: the peer is connected and passive, it holds nothing.
        ({NODE, PEER}, {NODE: Role.PROMOTING, PEER: Role.PASSIVE}, PEER, ()),
        # Connected but still active or demoting by its own account: it may hold the spool.
        ({NODE, PEER}, {NODE: Role.PROMOTING, PEER: Role.DEMOTING}, PEER, (PEER,)),
        ({NODE, PEER}, {NODE: Role.PROMOTING, PEER: Role.ACTIVE}, PEER, (PEER,)),
        # Every node that is not provably clean, in a stable order; never this node.
        ({NODE, PEER, OTHER}, {NODE: Role.PROMOTING, OTHER: Role.FAILED}, None, (PEER,)),
        ({NODE, OTHER}, {NODE: Role.PROMOTING}, PEER, (PEER, OTHER)),
        ({NODE}, {NODE: Role.PROMOTING}, None, ()),
    ],
)
def test_fence_targets_are_every_node_not_known_to_hold_nothing(
    known: set[str], members: dict[str, Role], epoch_node: str | None, expected: tuple[str, ...]
) -> None:
    assert fence_targets(fence_world(known, members, epoch_node), POLICY) == expected


def test_the_fence_action_names_the_targets_seen_when_leadership_was_taken() -> None:
    state = promoting(Step.ACQUIRE, epoch=0)
    snapshot = replace(
        fence_world({NODE, PEER}, {NODE: Role.PROMOTING}, NODE), result=ok(Step.ACQUIRE, EPOCH)
    )
    decision = decide(state, snapshot, NOW, POLICY)
    (action,) = decision.actions
    assert action.step is Step.FENCE and action.fence == (PEER,) and action.epoch == EPOCH


def test_a_node_that_stepped_down_cleanly_is_not_fenced() -> None:
    snapshot = fence_world({NODE, PEER}, {NODE: Role.PROMOTING})
    demoting = Member(node=PEER, role=Role.DEMOTING, released=True)
    view = replace(snapshot.cluster, members={**snapshot.cluster.members, PEER: demoting})
    assert fence_targets(replace(snapshot, cluster=view), POLICY) == ()
    holding = replace(demoting, released=False)
    view = replace(snapshot.cluster, members={**snapshot.cluster.members, PEER: holding})
    assert fence_targets(replace(snapshot, cluster=view), POLICY) == (PEER,)


@pytest.mark.parametrize(
    ("trigger", "urgent"),
    [
        (Trigger.SESSION_LOST, True),
        (Trigger.LEADERSHIP_LOST, True),
        (Trigger.SWITCHOVER, False),
        (Trigger.RELAY_UNHEALTHY, False),
    ],
)
def test_the_drain_is_short_when_another_node_may_be_taking_over(
    trigger: Trigger, urgent: bool
) -> None:
    expected = POLICY.urgent_drain_timeout if urgent else POLICY.drain_timeout
    assert POLICY.drain_time(trigger.value) == expected
    assert POLICY.urgent_drain_timeout < POLICY.drain_timeout
