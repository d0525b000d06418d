"""Fenced immediate takeover: a silent leader is fenced, then replaced at once (issue 17 §2)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.decision_data import (
    PROMOTION,
    AgentState,
    Member,
    Policy,
    Role,
    Session,
    Step,
    Switchover,
    Trigger,
)
from cluster.state import TRANSITIONS
from cluster.takeover import silence_due, silent_leader
from tests.support.decisions import (
    EPOCH,
    NODE,
    NOW,
    PAUSE,
    PEER,
    POLICY,
    WALL,
    Pair,
    Walk,
    World,
    ours,
    theirs,
)


def silent_peer(age: float = 1.2, /, **world: object) -> Walk:
    """A passive node; the peer leads in EPOCH, holding, and was last heard ``age`` ago."""
    members = {PEER: Member(PEER, Role.ACTIVE, epoch=EPOCH, relay_running=True, holds=True)}
    fields: dict[str, object] = {
        "leader": theirs(EPOCH),
        "epoch": EPOCH,
        "members": members,
        "known": frozenset({NODE, PEER}),
        "heartbeat_ages": {PEER: age},
    }
    fields.update(world)
    return Walk(AgentState(role=Role.PASSIVE), World(**fields))  # type: ignore[arg-type]


def fence_started(walk: Walk) -> None:
    decision = walk.see()
    assert decision.trigger is Trigger.PEER_SILENT
    assert decision.state.role is Role.PASSIVE
    [action] = decision.actions
    assert (action.step, action.fence, action.peer) == (Step.FENCE, (PEER,), PEER)
    assert action.epoch == 0  # a passive node has no term yet
    assert decision.state.silent_leader == (PEER, EPOCH)
    assert "heartbeats stopped 1.20s ago" in decision.note


def test_a_silent_leader_is_fenced_then_replaced_at_once() -> None:
    walk = silent_peer()
    fence_started(walk)
    walk.tick(0.3)
    decision = walk.finish(seconds=0.3, detail="fenced beta with lab")
    assert decision.trigger is Trigger.PEER_FENCED
    assert decision.state.role is Role.PROMOTING
    [action] = decision.actions
    assert action.step is Step.ACQUIRE
    assert action.stale_leader == (PEER, EPOCH)  # the znode to replace, checked by ZooKeeper
    assert decision.state.started == walk.now - 0.3  # the takeover began with the fence
    # ACQUIRE replaced the znode: the peer's member znode lives on with its session, holding,
    # but it was fenced already: the promotion's FENCE step has nobody left to fence.
    walk.world.leader = ours(EPOCH + 1)
    walk.world.epoch_node = NODE
    walk.tick(0.05)
    decision = walk.finish(epoch=EPOCH + 1, seconds=0.05)
    [action] = decision.actions
    assert (action.step, action.fence, action.peer) == (Step.FENCE, (), PEER)
    assert action.fenced == (PEER,)  # ... fenced by this term all the same (DRBD's fast path)
    while walk.state.role is Role.PROMOTING:
        walk.tick(0.05)
        walk.finish(seconds=0.05)
    assert walk.state.role is Role.ACTIVE
    assert walk.state.epoch == EPOCH + 1
    assert walk.state.silent_leader is None
    assert [step for step, _ in walk.state.steps] == [Step.FENCE, *PROMOTION]


@pytest.mark.parametrize("age", [None, 0.0, 0.5, 0.999])
def test_a_leader_heard_lately_or_never_is_left_alone(age: float | None) -> None:
    walk = silent_peer(heartbeat_ages={} if age is None else {PEER: age})
    decision = walk.see()
    assert decision.trigger is Trigger.NOTHING
    assert decision.actions == ()


CANNOT: dict[str, dict[str, object]] = {
    "paused": {"paused": PAUSE},
    "recent takeover": {"last_served": WALL - 1.0},
    "switchover": {"switchover": Switchover(PEER, NODE, WALL)},
    "stopping": {"stopping": True},
    "relay down": {"relay_running": False},
    "outdated": {"outdated": frozenset({NODE})},
    "split brain": {"split_brain": "r0"},
    "suspended": {"session": Session.SUSPENDED},
}


@pytest.mark.parametrize("why", sorted(CANNOT))
def test_no_fence_when_no_takeover_is_allowed(why: str) -> None:
    walk = silent_peer(**CANNOT[why])
    decision = walk.see()
    assert decision.trigger is not Trigger.PEER_SILENT
    assert all(action.step is not Step.FENCE for action in decision.actions)


def test_no_fence_while_cooling_down_or_with_the_fast_path_off() -> None:
    walk = silent_peer()
    walk.state = replace(walk.state, cooldown_until=NOW + 10)
    assert walk.see().trigger is Trigger.NOTHING
    off = silent_peer()
    off.policy = replace(POLICY, fast_takeover=False)
    assert off.see().trigger is Trigger.NOTHING


def test_a_failed_fence_changes_nothing_and_is_not_retried_at_once() -> None:
    walk = silent_peer()
    fence_started(walk)
    walk.tick(0.5)
    decision = walk.finish(success=False, detail="ipmi: no answer")
    assert decision.trigger is Trigger.FENCE_FAILED
    assert decision.state.role is Role.PASSIVE
    assert decision.actions == ()
    assert "not fenced (ipmi: no answer)" in decision.note
    assert decision.state.silent_fence_at == walk.now + POLICY.retry_interval
    walk.tick(1.0)
    assert walk.see().trigger is Trigger.NOTHING  # the leader znode still stands: no takeover
    # Today's path: the session expires, its znodes vanish, the lease rule follows.
    walk.world.leader = None
    walk.world.members = {}
    decision = walk.see()
    assert decision.trigger is Trigger.LEADER_VACANT
    assert decision.actions[0].stale_leader is None
    walk.tick(POLICY.retry_interval)
    again = silent_peer()
    again.state = replace(walk.state, role=Role.PASSIVE, step=None)
    again.now = walk.now
    assert again.see().trigger is Trigger.PEER_SILENT


HELD: dict[str, dict[str, object]] = {
    "paused meanwhile": {"paused": PAUSE},
    "heard again": {"heartbeat_ages": {PEER: 0.1}},
    "another term": {"leader": theirs(EPOCH + 1)},
    "ours": {"leader": ours(EPOCH)},
    "suspended": {"session": Session.SUSPENDED},
    "switchover": {"switchover": Switchover(PEER, NODE, WALL)},
}


@pytest.mark.parametrize("why", sorted(HELD))
def test_a_confirmed_fence_takes_over_only_if_still_allowed(why: str) -> None:
    walk = silent_peer()
    fence_started(walk)
    for name, value in HELD[why].items():
        setattr(walk.world, name, value)
    walk.tick(0.3)
    decision = walk.finish(seconds=0.3, detail="fenced")
    assert decision.trigger is Trigger.FENCED_HELD
    assert decision.state.role is Role.PASSIVE
    assert decision.actions == ()
    assert decision.state.silent_leader is None
    assert decision.state.silent_fence_at > walk.now


def test_a_leadership_vacated_during_the_fence_is_taken_plainly() -> None:
    walk = silent_peer()
    fence_started(walk)
    walk.world.leader = None  # the session expired meanwhile
    decision = walk.finish(seconds=0.3)
    assert decision.trigger is Trigger.PEER_FENCED
    assert decision.actions[0].stale_leader is None


def test_an_acquire_that_finds_the_znode_changed_ends_the_promotion() -> None:
    walk = silent_peer()
    fence_started(walk)
    walk.finish(seconds=0.3)
    walk.world.leader = theirs(EPOCH + 1)
    decision = walk.finish(success=False, detail="the leader znode changed")
    assert decision.trigger is Trigger.LEADERSHIP_NOT_TAKEN
    assert decision.state.role is Role.PASSIVE
    assert decision.state.silent_fence_at == walk.now + POLICY.retry_interval
    assert walk.see().actions == ()  # not fenced again at once


def test_the_silence_is_awaited_when_it_comes() -> None:
    walk = silent_peer(0.3)
    snapshot = walk.world.snapshot(WALL)
    assert silence_due(snapshot, POLICY) == pytest.approx(0.7)
    assert silent_leader(snapshot, POLICY) is None
    walk.world.heartbeat_ages = {}
    assert silence_due(walk.world.snapshot(WALL), POLICY) is None
    walk.world.leader = ours()
    walk.world.heartbeat_ages = {PEER: 5.0}
    assert silence_due(walk.world.snapshot(WALL), POLICY) is None
    assert silent_leader(walk.world.snapshot(WALL), POLICY) is None


def test_the_new_rows_are_in_the_table() -> None:
    assert TRANSITIONS[(Role.PASSIVE, Trigger.PEER_SILENT)].to is Role.PASSIVE
    assert TRANSITIONS[(Role.PASSIVE, Trigger.PEER_FENCED)].to is Role.PROMOTING
    assert TRANSITIONS[(Role.PASSIVE, Trigger.FENCED_HELD)].to is Role.PASSIVE
    assert TRANSITIONS[(Role.PASSIVE, Trigger.FENCE_FAILED)].to is Role.PASSIVE


# ---------------------------------------------------------------- the pair


def serving(pair: Pair) -> list[str]:
    """Nodes that may serve: alive, and past STORAGE in an active or promoting term."""
    return [
        name
        for name, state in pair.states.items()
        if name not in pair.dead
        and (
            state.role is Role.ACTIVE
            or (state.role is Role.PROMOTING and state.step not in (Step.ACQUIRE, Step.FENCE))
        )
    ]


@pytest.mark.parametrize("alive", [False, True])
def test_pair_a_silent_active_node_is_fenced_before_its_peer_serves(alive: bool) -> None:
    """``alive``: a stalled machine (its heartbeats and its pulse in ZooKeeper stopped): it
    still decides, still holds the leader znode and serves, until the fence powers it off."""
    pair = Pair({NODE: AgentState(role=Role.PASSIVE), PEER: AgentState(role=Role.PASSIVE)})
    pair.decide(NODE)
    pair.settle()
    assert pair.states[NODE].role is Role.ACTIVE and pair.leader == NODE
    pair.silent_since[NODE] = pair.pulse_since[NODE] = pair.now
    if not alive:
        pair.dead.add(NODE)
    pair.now += 0.5
    assert pair.decide(PEER).trigger is Trigger.NOTHING  # not yet peer_timeout
    pair.now += 0.5
    decision = pair.decide(PEER)
    assert decision.trigger is Trigger.PEER_SILENT
    for _ in range(40):
        assert len(serving(pair)) <= 1, pair.states
        for name in sorted(set(pair.states) - pair.dead):
            if pair.states[name].step is not None:
                pair.run(name)
            else:
                pair.decide(name)
        if pair.states[PEER].role is Role.ACTIVE:
            break
    assert pair.states[PEER].role is Role.ACTIVE
    assert NODE in pair.dead and pair.fenced[-2:] == [(NODE,), ()]  # fenced once, first
    assert pair.leader == PEER and pair.epoch == EPOCH + 1
    assert NODE in pair.connected  # its session never had to expire


def test_policy_defaults() -> None:
    policy = Policy(node=NODE)
    assert policy.fast_takeover and policy.peer_timeout == 1.0
