"""Failsafe: a suspended active node serves on while every peer holds it a lease (issue 17, 1).

Plain decisions over snapshots (cluster.failsafe, cluster.state, cluster.takeover); the pair
simulation is tests/test_failsafe_pair.py.
"""

from __future__ import annotations

from dataclasses import replace

from cluster.decision_data import AgentState, Role, Session, Step, Trigger
from cluster.failsafe import cut_off, failsafe_due, grant, leave_server, should_ask
from cluster.state import demotion_due
from cluster.takeover import lease_verdict
from tests.support.decisions import (
    NOW,
    OTHER,
    PEER,
    POLICY,
    WALL,
    Walk,
    World,
    active,
    demoting,
    ours,
    promoting,
)

LEAD = POLICY.urgent_drain_timeout + POLICY.session_margin
LEASE = POLICY.failsafe_lease


def outage(held: dict[str, float], **changes: object) -> Walk:
    """An active node whose ZooKeeper is gone: its session suspended, its deadline near."""
    world = World(
        leader=ours(),
        session=Session.SUSPENDED,
        session_deadline=NOW + 1.0,
        failsafe_held=dict(held),
    )
    return Walk(active(**changes), world)


def test_every_lease_held_it_serves_past_its_session_deadline_and_says_so() -> None:
    walk = outage({PEER: NOW + LEASE})
    decision = walk.see()
    assert decision.trigger is Trigger.FAILSAFE_ENTERED
    assert walk.state.failsafe_since == NOW
    assert decision.note.startswith("serving in failsafe: ZooKeeper lost, leases held from beta")
    # Renewed at every heartbeat: it serves on for as long as the outage lasts.
    for _ in range(100):
        walk.tick(0.5)
        walk.world.failsafe_held = {PEER: walk.now + LEASE}
        assert walk.see().trigger is Trigger.NOTHING
    assert walk.state.role is Role.ACTIVE and walk.state.failsafe_since == NOW


def test_a_lease_not_renewed_ends_serving_before_it_runs_out() -> None:
    walk = outage({PEER: NOW + LEASE})
    walk.see()
    walk.tick(LEASE - LEAD - 0.01)
    assert walk.see().trigger is Trigger.NOTHING
    walk.tick(0.01)
    decision = walk.see()
    assert decision.trigger is Trigger.SESSION_LOST
    assert walk.state.role is Role.DEMOTING and walk.state.failsafe_since is None
    assert [(a.step, a.timeout) for a in decision.actions] == [
        (Step.DRAIN, POLICY.urgent_drain_timeout)
    ]


def test_a_peer_that_refuses_leaves_the_session_deadline_in_force() -> None:
    walk = outage({PEER: NOW + LEASE})
    walk.see()
    walk.world.failsafe_held = {}  # it answered: connected to ZooKeeper
    decision = walk.see()
    assert decision.trigger is Trigger.FAILSAFE_ENDED
    assert decision.note == "failsafe over after 0.0s: a peer's lease is gone (none held from beta)"
    walk.tick(1.0 - LEAD)  # the session's own deadline, as without failsafe
    assert walk.see().trigger is Trigger.SESSION_LOST


def test_every_member_must_hold_a_lease() -> None:
    # A third node that joined the cluster holds none: no failsafe, whatever the peer says.
    walk = outage({PEER: NOW + LEASE})
    walk.world.known = frozenset({PEER, OTHER})
    assert walk.see().trigger is Trigger.NOTHING
    assert walk.state.failsafe_since is None
    walk.tick(1.0 - LEAD)
    assert walk.see().trigger is Trigger.SESSION_LOST


def test_failsafe_off_or_no_peer_configured_changes_nothing() -> None:
    for policy in (replace(POLICY, failsafe=False), replace(POLICY, failsafe_peers=frozenset())):
        walk = outage({PEER: NOW + LEASE})
        walk.policy = policy
        walk.tick(1.0 - LEAD)
        assert walk.see().trigger is Trigger.SESSION_LOST


def test_leases_count_only_while_suspended() -> None:
    world = World(leader=ours(), session=Session.LOST, failsafe_held={PEER: NOW + LEASE})
    assert demotion_due(world.snapshot(WALL), POLICY) == float("-inf")  # expired: at once
    world = World(leader=ours(), session_deadline=NOW + 2, failsafe_held={PEER: NOW + LEASE})
    assert failsafe_due(world.snapshot(WALL), POLICY) is None  # connected: the session's rule
    assert demotion_due(world.snapshot(WALL), POLICY) == NOW + 2 - LEAD


def test_without_a_known_deadline_the_leases_still_cover_it() -> None:
    walk = outage({PEER: NOW + LEASE})
    walk.world.session_deadline = None
    assert walk.see().trigger is Trigger.FAILSAFE_ENTERED


def test_a_promotion_never_rides_on_leases() -> None:
    world = World(leader=ours(), session=Session.SUSPENDED, failsafe_held={PEER: NOW + LEASE})
    walk = Walk(promoting(Step.STORAGE), world)
    assert walk.see().trigger is Trigger.SESSION_LOST


def test_who_asks_and_who_grants() -> None:
    fresh = 0.1  # seconds since a server last answered
    assert should_ask(active(), Session.SUSPENDED, fresh, POLICY)
    assert not should_ask(active(), Session.CONNECTED, fresh, POLICY)
    assert not should_ask(AgentState(role=Role.PASSIVE), Session.SUSPENDED, fresh, POLICY)
    passive = AgentState(role=Role.PASSIVE)
    assert grant(passive, Session.SUSPENDED, fresh, POLICY) is None
    assert grant(passive, Session.LOST, None, POLICY) is None
    assert grant(passive, Session.CONNECTED, fresh, POLICY) == "connected to ZooKeeper"
    assert grant(active(), Session.SUSPENDED, fresh, POLICY) == "it holds resources itself (active)"
    assert grant(demoting(Step.VIP_DOWN), Session.SUSPENDED, fresh, POLICY) is not None
    off = replace(POLICY, failsafe=False)
    assert grant(passive, Session.SUSPENDED, fresh, off) == "failsafe is off here"


def test_servers_silent_past_the_patience_count_as_cut_off_before_kazoo_says_so() -> None:
    patience = POLICY.zookeeper_patience
    passive = AgentState(role=Role.PASSIVE)
    assert not cut_off(Session.CONNECTED, patience, POLICY)  # a slow answer is no cut
    assert cut_off(Session.CONNECTED, patience + 0.01, POLICY)
    assert not cut_off(Session.CONNECTED, None, POLICY)  # a new session: kazoo's word only
    assert should_ask(active(), Session.CONNECTED, patience + 0.01, POLICY)
    assert grant(passive, Session.CONNECTED, patience + 0.01, POLICY) is None


def test_a_server_silent_past_the_patience_is_left_while_kazoo_says_connected() -> None:
    patience = POLICY.zookeeper_patience
    for role in (Role.PASSIVE, Role.ACTIVE, Role.DEMOTING):
        assert leave_server(role, Session.CONNECTED, patience + 0.01, POLICY)
        assert not leave_server(role, Session.CONNECTED, patience, POLICY)  # slow: stay
        # Not connected (kazoo is moving already), or connected a moment ago: nothing to leave.
        assert not leave_server(role, Session.SUSPENDED, patience + 5, POLICY)
        assert not leave_server(role, Session.LOST, patience + 5, POLICY)
        assert not leave_server(role, Session.CONNECTED, None, POLICY)
    # A promotion would give up at the suspension a move makes: its steps' limits decide.
    assert not leave_server(Role.PROMOTING, Session.CONNECTED, patience + 5, POLICY)


def test_a_lease_granted_holds_back_an_unfenced_takeover_until_it_ends_and_its_grace() -> None:
    granted = NOW + 2.0
    world = World(
        leader=ours(),
        known=frozenset({PEER}),
        absent_since={PEER: NOW - 10},  # its session ended long ago
        failsafe_granted={PEER: granted},
    )
    at, why = lease_verdict(world.snapshot(WALL), NOW, POLICY)
    assert at == granted + POLICY.lease_grace
    assert why.endswith("the failsafe lease granted to beta ends in 2.0s)")
    # Once it and its grace are over, the takeover goes on.
    at, _ = lease_verdict(world.snapshot(WALL), granted + POLICY.lease_grace, POLICY)
    assert at == granted + POLICY.lease_grace


def test_a_promotion_waits_for_the_lease_it_granted_after_a_failed_fence() -> None:
    world = World(
        leader=ours(),
        known=frozenset({PEER}),
        absent_since={PEER: NOW - 10},
        failsafe_granted={PEER: NOW + 2.0},
    )
    walk = Walk(promoting(Step.FENCE), world)
    decision = walk.finish(False, detail="no fence agent")
    assert decision.trigger is Trigger.FENCE_FAILED
    assert walk.state.retry_at == NOW + 2.0 + POLICY.lease_grace
    walk.tick(2.0 + POLICY.lease_grace)
    decision = walk.see()
    assert decision.trigger is Trigger.RETRY
    assert [a.step for a in decision.actions] == [Step.STORAGE]


def test_a_fenced_asker_is_passed_at_once() -> None:
    world = World(leader=ours(), known=frozenset({PEER}), failsafe_granted={PEER: NOW + 2.0})
    walk = Walk(promoting(Step.FENCE), world)
    decision = walk.finish(True)
    assert [a.step for a in decision.actions] == [Step.STORAGE]
