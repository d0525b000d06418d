"""Every row of the transition table, the special rules beside it, and the pairs outside it.

The table is the whole truth: the role after a decision is its row's ``to``, the trigger logged
is the one ``classify`` and ``refine`` chose; a pair not in the table does nothing.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import pytest

from cluster.decision_data import (
    Action,
    AgentState,
    Decision,
    Role,
    Session,
    Snapshot,
    Step,
    Switchover,
    Trigger,
)
from cluster.state import TRANSITIONS, Then, classify, decide, refine
from cluster.takeover import holds_resources
from tests.support.decisions import (
    EPOCH,
    GRAY_SEEN,
    GRID_WORLDS,
    NODE,
    NOW,
    OTHER,
    PAUSE,
    PEER,
    POLICY,
    RESTART,
    START,
    WALL,
    Case,
    Refined,
    World,
    active,
    demoting,
    failed,
    graceful_drain,
    grid_results,
    grid_states,
    holding,
    ok,
    ours,
    promoting,
    ready,
    ready_peer,
    theirs,
)

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
    (Role.PASSIVE, Trigger.PEER_SILENT): Case(
        AgentState(role=Role.PASSIVE),
        World(leader=theirs(), heartbeat_ages={PEER: 2.0}),
        steps=(Step.FENCE,),
    ),
    (Role.PASSIVE, Trigger.PEER_FENCED): Case(
        AgentState(role=Role.PASSIVE, step=Step.FENCE, silent_leader=(PEER, EPOCH)),
        World(leader=theirs(), heartbeat_ages={PEER: 2.0}),
        ok(Step.FENCE),
        steps=(Step.ACQUIRE,),
    ),
    (Role.PASSIVE, Trigger.FENCE_FAILED): Case(
        AgentState(role=Role.PASSIVE, step=Step.FENCE, silent_leader=(PEER, EPOCH)),
        World(leader=theirs(), heartbeat_ages={PEER: 2.0}),
        failed(Step.FENCE),
    ),
    (Role.PASSIVE, Trigger.CHANNEL_SILENT): Case(
        AgentState(role=Role.PASSIVE),
        World(leader=theirs(), heartbeat_ages={PEER: 2.0}, pulse_ages={PEER: 0.2}),
    ),
    (Role.PASSIVE, Trigger.CHANNEL_HEARD): Case(
        AgentState(role=Role.PASSIVE, channel_silent=PEER),
        World(leader=theirs(), heartbeat_ages={PEER: 0.1}, pulse_ages={PEER: 0.2}),
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
    (Role.ACTIVE, Trigger.GRAY_FAILURE): Case(
        active(),
        World(leader=ours(), members=ready_peer(), locations=GRAY_SEEN),
        steps=(Step.DRAIN,),
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
    (Role.ACTIVE, Trigger.FAILSAFE_ENTERED): Case(
        active(),
        World(
            session=Session.SUSPENDED,
            leader=ours(),
            session_deadline=NOW + 0.5,  # the session alone: demote now
            failsafe_held={PEER: NOW + 2.0},  # but the peer holds it a lease
        ),
    ),
    (Role.ACTIVE, Trigger.FAILSAFE_ENDED): Case(
        active(failsafe_since=NOW - 30), World(leader=ours(), session_deadline=NOW + 2)
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
        case Then.FENCE_SILENT_PEER:
            assert after.silent_leader == (PEER, EPOCH)
            (fence,) = decision.actions
            assert fence.fence == (PEER,) and fence.peer == PEER
        case Then.BEGIN_FENCED_PROMOTION:
            assert result is not None
            assert after.epoch == 0 and after.previous == PEER
            assert after.reason == "peer fenced"
            assert after.started == NOW - result.seconds
            assert after.silent_leader == before.silent_leader
            (acquire,) = decision.actions
            assert acquire.stale_leader == (PEER, EPOCH)
        case Then.SILENT_FENCE_FAILED | Then.HOLD_FENCED:
            assert after.silent_leader is None
            assert after.silent_fence_at == NOW + POLICY.retry_interval
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
        case Then.BEGIN_GRAY_HANDOVER:
            # A planned handover (graceful drain), ending in a cooldown.
            assert after.give_up and after.started == NOW and after.epoch == EPOCH
            assert after.reason == Trigger.GRAY_FAILURE.value
            (drain,) = decision.actions
            assert drain.timeout == POLICY.drain_timeout
            assert drain.reason == decision.note
            assert decision.note.startswith("gray failure: 2 of 2 check locations")
            assert holds_resources(after)
        case Then.HOLD_GRAY:
            assert after == replace(before, gray_held=after.gray_held)
            assert decision.actions == ()
        case Then.REFUSE_SWITCHOVER:
            assert after == before
            assert decision.note.startswith(f"switchover refused: {PEER} cannot take over: ")
        case Then.ENTER_FAILSAFE:
            assert after == replace(before, failsafe_since=NOW)
            assert decision.note == (
                f"serving in failsafe: ZooKeeper lost, leases held from {PEER} for 2.0s"
            )
        case Then.NOTE_CHANNEL_SILENT:
            assert after == replace(before, channel_silent=PEER)
            assert "the peer channel is cut, not the node; not fencing it" in decision.note
        case Then.NOTE_CHANNEL_HEARD:
            assert after == replace(before, channel_silent="")
            assert decision.note == f"peer channel to {PEER}: heard again over the peer channel"
        case Then.LEAVE_FAILSAFE:
            assert after == replace(before, failsafe_since=None)
            assert decision.note == "failsafe over after 30.0s: the session is back"
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


# Each special rule. Before them, the cause's own row said one role and its effect sent the node
# to another: the table was not the whole truth.
REFINED: dict[str, Refined] = {
    "active: a gray failure while paused": Refined(
        (Role.ACTIVE, Trigger.GRAY_FAILURE_HELD),
        Trigger.GRAY_FAILURE,
        active(),
        World(leader=ours(), members=ready_peer(), locations=GRAY_SEEN, paused=PAUSE),
        None,
    ),
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
    "passive: fenced, but paused meanwhile": Refined(
        (Role.PASSIVE, Trigger.FENCED_HELD),
        Trigger.PEER_FENCED,
        AgentState(role=Role.PASSIVE, step=Step.FENCE, silent_leader=(PEER, EPOCH)),
        World(leader=theirs(), heartbeat_ages={PEER: 2.0}, paused=PAUSE),
        ok(Step.FENCE),
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
        expected = AgentState(
            role=Role.PASSIVE,
            steps=decision.state.steps,
            silent_fence_at=decision.state.silent_fence_at,  # a fence made: not again at once
        )
        assert decision.state == expected
        assert not holds_resources(decision.state)


ONLY_REFINED = (
    Trigger.PROMOTED,
    Trigger.DEMOTED,
    Trigger.LEADERSHIP_NOT_TAKEN,
    Trigger.LEASE_REFUSED,
    Trigger.RELAY_START_EXHAUSTED,
    Trigger.REPLICA_REFUSED,
    Trigger.FENCED_HELD,
)

# Pairs ``classify`` never produces for a role: safety triggers concern only a node holding or
# taking resources, so does a stop (a node that holds nothing just exits), each role has its own
# health and opportunity triggers, and a promotion always has a step in flight.
_PASSIVE = Role.PASSIVE
# The fast path starts passive; so does a cut peer channel's line.
_PASSIVE_ONLY = (
    Trigger.PEER_SILENT,
    Trigger.PEER_FENCED,
    Trigger.CHANNEL_SILENT,
    Trigger.CHANNEL_HEARD,
)

FAILSAFE = (Trigger.FAILSAFE_ENTERED, Trigger.FAILSAFE_ENDED)
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
    | {(role, Trigger.FENCE_FAILED) for role in Role if role not in (Role.PROMOTING, _PASSIVE)}
    | {(role, t) for role in Role if role is not _PASSIVE for t in _PASSIVE_ONLY}
    | {(role, Trigger.STOP) for role in Role if role not in (Role.ACTIVE, Role.PROMOTING)}
    | {(role, Trigger.GRAY_FAILURE) for role in Role if role is not Role.ACTIVE}
    | {(role, Trigger.GRAY_FAILURE_HELD) for role in Role if role is not Role.ACTIVE}
    # ``refine`` names an outcome only for the roles whose rows it leads to.
    | {(role, t) for role in Role for t in ONLY_REFINED if (role, t) not in TRANSITIONS}
    # Serving in failsafe is a sub-state of the active role only.
    | {(role, t) for role in Role if role is not Role.ACTIVE for t in FAILSAFE}
)


@functools.cache
def grid_sweep() -> tuple[tuple[AgentState, Snapshot, Trigger], ...]:
    """Every state and snapshot of the grid, with the trigger ``classify`` and ``refine`` chose
    (swept once for the tests below)."""
    sweep = []
    for state in grid_states():
        for world in GRID_WORLDS:
            for result in grid_results(state):
                snapshot = world.snapshot(WALL, result)
                cause = classify(state, snapshot, NOW, POLICY)
                sweep.append((state, snapshot, refine(cause, state, snapshot, NOW, POLICY)))
    return tuple(sweep)


def test_over_the_grid_every_row_is_true() -> None:
    """The table is the whole truth: on the grid, the trigger of a decision is the one
    ``classify`` and ``refine`` chose, and the role after it is its row's (the first snapshots
    of each row on the grid; the random walks check every one of their decisions)."""
    checked: dict[tuple[Role, Trigger], int] = {}
    for state, snapshot, trigger in grid_sweep():
        key = (state.role, trigger)
        if key not in TRANSITIONS or checked.get(key, 0) >= 40:
            continue
        checked[key] = checked.get(key, 0) + 1
        decision = decide(state, snapshot, NOW, POLICY)
        assert decision.trigger is trigger
        assert decision.state.role is TRANSITIONS[key].to, (state, snapshot, decision)
    assert set(checked) >= set(TRANSITIONS) - {case.key for case in REFINED.values()}


def test_pairs_missing_from_the_table_do_nothing() -> None:
    """Over a grid of states and snapshots: a pair not in the table leaves everything as it was."""
    seen: set[tuple[Role, Trigger]] = set()
    for state, snapshot, trigger in grid_sweep():
        seen.add((state.role, trigger))
        if (state.role, trigger) in TRANSITIONS:
            continue
        decision = decide(state, snapshot, NOW, POLICY)
        assert decision.trigger is trigger
        assert decision.actions == ()
        assert decision.state == state
        assert not decision.changed
    # The grid holds no state near a limit: those rows have their cases in REFINED.
    assert set(TRANSITIONS) <= seen | {case.key for case in REFINED.values()}
    missing = {(role, trigger) for role in Role for trigger in Trigger} - set(TRANSITIONS)
    assert seen & UNREACHABLE == set()
    # Every pair outside the table was either seen above or is one classify never produces.
    assert missing - seen == UNREACHABLE
    assert {(role, Trigger.WAITING) for role in Role} <= seen


def test_over_the_grid_only_safety_preempts_a_step_in_flight() -> None:
    """Over the grid: with a step in flight and no result, nothing happens, except that a node
    holding resources demotes at once when its session or its leadership is gone."""
    preempted: set[tuple[Role, Trigger]] = set()
    for state in grid_states():
        if state.step is None:
            continue
        for world in GRID_WORLDS:
            decision = decide(state, world.snapshot(WALL), NOW, POLICY)
            # Suspended, yet the peer holds it a lease: an active node serves on in failsafe
            # (a sub-state: the step in flight goes on).
            leased = world.session is Session.SUSPENDED and bool(world.failsafe_held)
            covered = state.role is Role.ACTIVE and leased and world.leader == ours()
            if covered:
                assert decision.trigger is Trigger.FAILSAFE_ENTERED
                assert decision.state == replace(state, failsafe_since=NOW)
                assert decision.actions == ()
                continue
            leased = leased and state.role is Role.ACTIVE
            suspended = world.session is not Session.CONNECTED and not leased
            lost = suspended or world.leader != ours()
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
            expected = Trigger.SESSION_LOST if suspended else Trigger.LEADERSHIP_LOST
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
