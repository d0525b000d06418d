"""Pause and switchover: what an operator's requests make the active node and its peers do."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.decision_data import Action, Member, Role, Step, Switchover, Trigger
from cluster.state import decide
from tests.support.decisions import (
    EPOCH,
    NODE,
    NOW,
    OTHER,
    PAUSE,
    PEER,
    POLICY,
    RESTART,
    UNREADY,
    WALL,
    World,
    active,
    eligible,
    fail_the_restart,
    finish_demotion,
    ours,
    promote,
    ready,
    ready_peer,
    unready,
)


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


def test_a_switchover_never_hands_over_to_the_node_that_asks_to_leave() -> None:
    # A stale record of this node itself looking ready must not count as a target.
    members = {NODE: ready(NODE)}
    for target in (NODE, None):
        world = World(leader=ours(), switchover=Switchover(NODE, target, WALL), members=members)
        decision = decide(active(), world.snapshot(WALL), NOW, POLICY)
        assert decision.trigger is Trigger.SWITCHOVER_REFUSED and decision.actions == ()
