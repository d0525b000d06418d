"""A cut of the peer channel alone fences nobody: the leader's silence on the channel is
corroborated by its pulse in ZooKeeper before the fast takeover fences it (issue 17)."""

from __future__ import annotations

import pytest

from cluster.decision_data import AgentState, Role, Session, Step, Trigger
from cluster.state import TRANSITIONS
from cluster.takeover import alive_unheard_leader, pulsing, silence_due, silent_leader
from tests.support.decisions import EPOCH, NODE, PEER, POLICY, WALL, Pair, Walk, theirs
from tests.test_state_fast_takeover import serving, silent_peer


def unheard(heard: float = 1.2, pulse: float | None = 0.1, /, **world: object) -> Walk:
    """A passive node; the peer leads in EPOCH, last heard ``heard`` ago over the channel, its
    pulse last advanced ``pulse`` ago (None: it has no pulse znode)."""
    return silent_peer(heard, pulse_ages={} if pulse is None else {PEER: pulse}, **world)


def test_a_silent_channel_with_a_fresh_pulse_fences_nobody_and_says_so_once() -> None:
    walk = unheard(1.2, 0.1)
    decision = walk.see()
    assert decision.trigger is Trigger.CHANNEL_SILENT
    assert decision.trigger.value == "peer_channel_silent_leader_alive"
    assert decision.state.role is Role.PASSIVE
    assert decision.actions == ()
    assert decision.state.channel_silent == PEER
    assert "heartbeats stopped 1.20s ago" in decision.note
    assert "pulse in ZooKeeper advanced 0.10s ago" in decision.note
    assert "not fencing" in decision.note
    # Minutes of a cut channel: the pulse keeps advancing, nothing more is done or said.
    for _ in range(600):
        walk.tick(0.25)
        walk.world.heartbeat_ages = {PEER: walk.world.heartbeat_ages[PEER] + 0.25}
        walk.world.pulse_ages = {PEER: (walk.world.pulse_ages[PEER] + 0.25) % 0.25}
        decision = walk.see()
        assert decision.trigger is Trigger.NOTHING, decision
        assert decision.actions == () and decision.note == ""
    # The channel is back: one line, and a later cut is said again.
    walk.world.heartbeat_ages = {PEER: 0.05}
    decision = walk.see()
    assert decision.trigger is Trigger.CHANNEL_HEARD
    assert decision.note == f"peer channel to {PEER}: heard again over the peer channel"
    assert decision.state.channel_silent == ""
    assert walk.see().trigger is Trigger.NOTHING
    walk.world.heartbeat_ages = {PEER: 3.0}
    assert walk.see().trigger is Trigger.CHANNEL_SILENT


def test_both_silent_the_leader_is_fenced() -> None:
    walk = unheard(1.2, 1.0)
    decision = walk.see()
    assert decision.trigger is Trigger.PEER_SILENT
    [action] = decision.actions
    assert (action.step, action.fence) == (Step.FENCE, (PEER,))


def test_a_cut_channel_then_a_dead_leader_is_fenced_once_its_pulse_stops() -> None:
    walk = unheard(5.0, 0.2)
    assert walk.see().trigger is Trigger.CHANNEL_SILENT
    walk.world.pulse_ages = {PEER: 0.99}
    assert walk.see().trigger is Trigger.NOTHING
    walk.world.pulse_ages = {PEER: 1.0}
    decision = walk.see()
    assert decision.trigger is Trigger.PEER_SILENT
    assert decision.actions[0].fence == (PEER,)


def test_a_leader_switched_off_is_not_called_alive_by_its_last_pulse() -> None:
    """Switched off, the leader pulsed last a moment after its last heartbeat: when the
    heartbeats are a ``peer_timeout`` old its pulse is still fresh, yet it advanced before the
    silence, not after. No "channel cut" then (CI saw one, before the fence); the fence once the
    pulse is old too."""
    walk = unheard(1.0, 0.85)
    decision = walk.see()
    assert decision.trigger is Trigger.NOTHING, decision
    assert decision.state.channel_silent == ""
    walk.world.heartbeat_ages = {PEER: 1.15}
    walk.world.pulse_ages = {PEER: 1.0}
    decision = walk.see()
    assert decision.trigger is Trigger.PEER_SILENT
    assert decision.actions[0].fence == (PEER,)


def test_a_pulse_after_the_silence_is_proof_of_life() -> None:
    walk = unheard(1.3, 0.35)
    assert walk.see().trigger is Trigger.NOTHING  # advanced 0.95 s after the last heartbeat
    walk.world.pulse_ages = {PEER: 0.25}
    assert walk.see().trigger is Trigger.CHANNEL_SILENT  # 1.05 s after: after the silence


def test_without_a_pulse_znode_the_heartbeats_decide_as_before() -> None:
    """The pulse source is gone (the leader's session ended: its ephemeral znodes go with it,
    the leader znode too, seen a moment apart), or its agent does not pulse: today's path."""
    walk = unheard(1.2, None)
    assert walk.see().trigger is Trigger.PEER_SILENT
    gone = unheard(1.2, None, leader=None, members={})
    decision = gone.see()
    assert decision.trigger is Trigger.LEADER_VACANT
    assert decision.actions[0].step is Step.ACQUIRE
    assert decision.actions[0].stale_leader is None


def test_a_cut_channel_whose_leader_goes_away_is_said_over() -> None:
    walk = unheard(1.2, 0.1, paused=None)
    walk.see()
    walk.world.leader = None
    walk.world.members = {}
    walk.world.last_served = WALL  # no takeover allowed now: the line comes first
    decision = walk.see()
    assert decision.trigger is Trigger.CHANNEL_HEARD
    assert decision.note == f"peer channel to {PEER}: it no longer leads"


@pytest.mark.parametrize("session", [Session.SUSPENDED, Session.LOST], ids=["suspended", "lost"])
def test_no_fence_and_no_line_without_a_session(session: Session) -> None:
    # Cut off from ZooKeeper, this node sees no pulse (the snapshot gives none) and fences none.
    walk = unheard(5.0, None, session=session)
    decision = walk.see()
    assert decision.trigger not in (Trigger.PEER_SILENT, Trigger.CHANNEL_SILENT)
    assert decision.actions == ()


def test_a_pulse_after_the_confirmed_fence_holds_the_takeover_back() -> None:
    walk = unheard(1.2, 1.1)
    assert walk.see().trigger is Trigger.PEER_SILENT
    walk.world.pulse_ages = {PEER: 0.05}
    decision = walk.finish(seconds=0.3, detail="fenced")
    assert decision.trigger is Trigger.FENCED_HELD
    assert decision.state.role is Role.PASSIVE


def test_the_silence_is_awaited_until_both_are_old() -> None:
    snapshot = unheard(0.3, 0.1).world.snapshot(WALL)
    assert silence_due(snapshot, POLICY) == pytest.approx(0.9)  # the pulse is the later
    snapshot = unheard(0.3, 0.5).world.snapshot(WALL)
    assert silence_due(snapshot, POLICY) == pytest.approx(0.7)  # the heartbeats are
    snapshot = unheard(2.0, 0.4).world.snapshot(WALL)
    assert silence_due(snapshot, POLICY) == pytest.approx(0.6)
    assert silent_leader(snapshot, POLICY) is None
    assert alive_unheard_leader(snapshot, POLICY) == theirs(EPOCH)
    snapshot = unheard(2.0, None).world.snapshot(WALL)
    assert silence_due(snapshot, POLICY) == 0.0
    assert silent_leader(snapshot, POLICY) == theirs(EPOCH)
    assert alive_unheard_leader(snapshot, POLICY) is None


def test_who_pulses() -> None:
    on = {Role.PROMOTING, Role.ACTIVE, Role.DEMOTING}
    for role in Role:
        assert pulsing(AgentState(role=role)) is (role in on)


def test_the_new_rows_are_in_the_table() -> None:
    assert TRANSITIONS[(Role.PASSIVE, Trigger.CHANNEL_SILENT)].to is Role.PASSIVE
    assert TRANSITIONS[(Role.PASSIVE, Trigger.CHANNEL_HEARD)].to is Role.PASSIVE


# ---------------------------------------------------------------- the pair


def test_pair_a_cut_channel_fences_nobody_and_a_kill_still_takes_the_fast_path() -> None:
    pair = Pair({NODE: AgentState(role=Role.PASSIVE), PEER: AgentState(role=Role.PASSIVE)})
    pair.decide(NODE)
    pair.settle()
    assert pair.states[NODE].role is Role.ACTIVE and pair.leader == NODE
    # The channel cut both ways: each hears nothing of the other; both pulse as their roles say.
    pair.silent_since[NODE] = pair.silent_since[PEER] = pair.now
    triggers = []
    for _ in range(100):  # 10 s of decisions, far past peer_timeout and the session timeout
        pair.now += 0.1
        triggers.append(pair.decide(PEER).trigger)
        pair.decide(NODE)
    assert pair.fenced == [()]  # the first promotion's FENCE step, with nobody to fence
    assert triggers.count(Trigger.CHANNEL_SILENT) == 1
    assert Trigger.PEER_SILENT not in triggers
    assert serving(pair) == [NODE] and pair.leader == NODE
    # Then the active node dies (its pulse stops too): fenced, and replaced before its session
    # expires.
    pair.dead.add(NODE)
    pair.pulse_since[NODE] = pair.now
    for _ in range(9):
        pair.now += 0.1
        assert pair.decide(PEER).trigger is Trigger.NOTHING
    pair.now += 0.1
    assert pair.decide(PEER).trigger is Trigger.PEER_SILENT
    for _ in range(40):
        assert len(serving(pair)) <= 1, pair.states
        if pair.states[PEER].step is not None:
            pair.run(PEER)
        else:
            pair.decide(PEER)
        if pair.states[PEER].role is Role.ACTIVE:
            break
    assert pair.states[PEER].role is Role.ACTIVE
    assert pair.leader == PEER and pair.epoch == EPOCH + 1
    assert NODE in pair.connected  # its session never had to expire
