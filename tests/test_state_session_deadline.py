"""Demotion by a deadline: a suspended active node serves on while its session surely lives on
the server, and stops serving before the session may expire (issue 17, section 3)."""

from __future__ import annotations

import random

import pytest

from cluster.decision_data import Role, Session, Step, Trigger
from cluster.state import demotion_due
from tests.support.decisions import NOW, POLICY, WALL, Walk, World, active, ours, promoting

# Where the urgent demotion begins, before the deadline.
LEAD = POLICY.urgent_drain_timeout + POLICY.session_margin


def suspended(deadline: float | None, **changes: object) -> Walk:
    """An active node whose connection to ZooKeeper just dropped."""
    world = World(leader=ours(), session=Session.SUSPENDED, session_deadline=deadline)
    return Walk(active(**changes), world)


def test_suspended_with_a_far_deadline_the_active_node_serves_on() -> None:
    walk = suspended(NOW + 2.0)
    decision = walk.see()
    assert decision.trigger is Trigger.NOTHING
    assert decision.actions == ()
    assert walk.state.role is Role.ACTIVE


def test_at_the_deadline_less_the_drain_and_margin_it_demotes_urgently() -> None:
    walk = suspended(NOW + 2.0)
    walk.tick(2.0 - LEAD - 0.01)
    assert walk.see().trigger is Trigger.NOTHING
    walk.tick(0.01)
    decision = walk.see()
    assert decision.trigger is Trigger.SESSION_LOST
    assert walk.state.role is Role.DEMOTING
    assert [(a.step, a.timeout) for a in decision.actions] == [
        (Step.DRAIN, POLICY.urgent_drain_timeout)
    ]


def test_a_session_back_before_the_deadline_changes_nothing() -> None:
    walk = suspended(NOW + 2.0)
    for _ in range(4):
        walk.tick(0.25)
        walk.see()
    walk.world.session = Session.CONNECTED
    walk.world.session_deadline = walk.now + 2.0  # answered again: the contact renewed
    walk.tick(1.0)  # past the deadline of the suspension: it no longer matters
    walk.see()
    assert walk.state.role is Role.ACTIVE
    assert all(d.trigger is Trigger.NOTHING and not d.actions for d in walk.log)


def test_without_a_known_deadline_it_demotes_at_the_first_suspension() -> None:
    walk = suspended(None)
    assert walk.see().trigger is Trigger.SESSION_LOST
    assert walk.state.role is Role.DEMOTING


def test_an_expired_session_is_lost_at_once_whatever_the_deadline() -> None:
    walk = suspended(NOW + 60.0)
    walk.world.session = Session.LOST
    walk.world.leader = None
    assert walk.see().trigger is Trigger.SESSION_LOST
    assert walk.state.role is Role.DEMOTING


def test_a_promotion_still_rolls_back_at_the_first_suspension() -> None:
    world = World(leader=ours(), session=Session.SUSPENDED, session_deadline=NOW + 60.0)
    walk = Walk(promoting(Step.STORAGE), world)
    assert walk.see().trigger is Trigger.SESSION_LOST
    assert walk.state.role is Role.DEMOTING


def test_a_step_in_flight_goes_on_while_the_deadline_is_ahead() -> None:
    walk = suspended(NOW + 2.0, step=Step.RESTART_RELAY)
    assert walk.see().trigger is Trigger.WAITING
    walk.tick(2.0 - LEAD)
    assert walk.see().trigger is Trigger.SESSION_LOST  # safety preempts the restart


def test_a_silent_server_demotes_a_connected_node_when_the_contact_runs_out() -> None:
    """kazoo may not notice a silent server before the session expires (it does not while
    requests keep flowing): the deadline holds while the session looks connected, too."""
    walk = suspended(NOW + 2.0)
    walk.world.session = Session.CONNECTED
    walk.tick(2.0 - LEAD - 0.01)
    assert walk.see().trigger is Trigger.NOTHING
    walk.tick(0.01)
    assert walk.see().trigger is Trigger.SESSION_LOST
    assert walk.state.role is Role.DEMOTING


def test_demotion_due() -> None:
    world = World(session=Session.CONNECTED, session_deadline=None)
    assert demotion_due(world.snapshot(WALL), POLICY) is None
    world.session_deadline = NOW + 2.0
    assert demotion_due(world.snapshot(WALL), POLICY) == pytest.approx(NOW + 2.0 - LEAD)
    world.session = Session.SUSPENDED
    assert demotion_due(world.snapshot(WALL), POLICY) == pytest.approx(NOW + 2.0 - LEAD)
    world.session_deadline = None
    assert demotion_due(world.snapshot(WALL), POLICY) == float("-inf")
    world.session, world.session_deadline = Session.LOST, NOW + 2.0
    assert demotion_due(world.snapshot(WALL), POLICY) == float("-inf")


# ------------------------------------------------------------------ the timed model


def serving_ends_before_expiry(seed: int) -> tuple[bool, bool]:
    """One suspension of an active node, timed: (its relay stopped serving before the server
    could expire its session, it demoted at all).

    The server expires the session no earlier than ``timeout`` after it last heard from it,
    which is no earlier than the send time of the last answered read (the coordinator's
    contact). The agent decides at least every ``health_interval`` and at ``demotion_due`` (its
    loop wakes then), each time up to ``lag`` late; the drain ends within its time limit (the
    executor kills what overruns it, ``kill`` seconds). The peer cannot serve before the session
    expired on the server, so the pair never serves twice iff the relay stops before expiry.
    """
    rng = random.Random(seed)
    timeout, health_interval, lag, kill = 2.0, 0.5, 0.05, 0.05
    contact = NOW - rng.uniform(0.0, health_interval + 0.1)  # the last answered read
    heard = contact + rng.uniform(0.0, 0.3)  # the server heard from it then, or later
    expiry = heard + timeout + rng.uniform(0.0, 0.2)
    back = NOW + rng.choice((0.005, 0.05, 0.3, 0.9, float("inf")))  # reconnected (same session)
    walk = suspended(contact + timeout)
    while walk.now < expiry:
        if walk.now >= back:  # the same session, answered again: its expiry moves on too
            walk.world.session = Session.CONNECTED
            walk.world.session_deadline = walk.now + timeout
            walk.see()
            return walk.state.role is Role.ACTIVE, False
        decision = walk.see()
        if decision.trigger is Trigger.SESSION_LOST:
            (drain,) = decision.actions
            stopped = walk.now + rng.uniform(0.0, drain.timeout) + kill
            return stopped < expiry, True
        due = demotion_due(walk.world.snapshot(walk.wall), POLICY)
        wake = walk.now + health_interval
        if due is not None and due > walk.now:
            wake = min(wake, due)
        walk.tick(max(wake - walk.now, 0.001) + rng.uniform(0.0, lag))
    return False, False  # still serving at expiry


def test_the_relay_always_stops_before_the_session_may_expire() -> None:
    outcomes = [serving_ends_before_expiry(seed) for seed in range(2000)]
    assert all(safe for safe, _ in outcomes)
    demoted = sum(1 for _, d in outcomes if d)
    assert 0 < demoted < len(outcomes)  # some rode the suspension out, some did not


def test_a_reconnect_within_milliseconds_never_demotes() -> None:
    """A ZooKeeper server restarted: kazoo is on another server within milliseconds."""
    for seed in range(200):
        walk = suspended(NOW + 2.0 - random.Random(seed).uniform(0.0, 0.6))
        walk.tick(0.005)
        walk.world.session = Session.CONNECTED
        walk.see()
        assert walk.state.role is Role.ACTIVE
        assert not walk.actions()
