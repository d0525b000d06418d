"""The safety rules: when a node never promotes, how a failed promotion rolls back, DRBD's
marks, and which alarms preempt the step in flight."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from cluster.decision_data import (
    DEMOTION,
    PROMOTION,
    Action,
    AgentState,
    Decision,
    Role,
    Session,
    Step,
    Switchover,
    Takeover,
    Trigger,
)
from cluster.state import decide
from cluster.takeover import holds_resources
from tests.support.decisions import (
    EPOCH,
    LOSSES,
    NODE,
    NOW,
    OTHER,
    PAUSE,
    PEER,
    POLICY,
    RESTART,
    START,
    WALL,
    Walk,
    World,
    active,
    demoting,
    eligible,
    finish_demotion,
    graceful_drain,
    ours,
    promote,
    promote_until,
    promoting,
    ready_peer,
    set_leadership_lost,
    set_session_lost,
    set_session_suspended,
    start_promotion,
    theirs,
)

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
    walk.world.last_served = walk.wall - POLICY.min_failover_interval + 0.001


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
    walk.world.last_served = walk.wall - POLICY.min_failover_interval
    assert walk.see().trigger is Trigger.LEADER_VACANT


@pytest.mark.parametrize("target", [NODE, None], ids=["to-self", "to-anyone"])
def test_switchover_to_this_node_overrides_pause_and_interval(target: str | None) -> None:
    walk = eligible()
    walk.world.paused = PAUSE
    walk.world.last_served = walk.wall - 0.1
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


# ---------------------------------------- what preempts the step in flight


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


def test_an_aborted_promotion_does_not_hold_back_the_next_takeover() -> None:
    """The peer took the epoch a moment ago and died promoting: it served nothing, so the
    anti-flapping interval counts from the last takeover that served, long ago."""
    walk = eligible()
    walk.world.last_failover = walk.wall - 0.1  # the peer's aborted acquisition
    walk.world.last_served = walk.wall - 60.0
    decision = walk.see()
    assert decision.trigger is Trigger.LEADER_VACANT
    assert [a.step for a in decision.actions] == [Step.ACQUIRE]


def test_a_takeover_that_served_lately_holds_back_the_next() -> None:
    walk = eligible()
    walk.world.last_failover = walk.wall - 60.0
    walk.world.last_served = walk.wall - 0.1
    assert walk.see().trigger is Trigger.NOTHING
    walk.tick(POLICY.min_failover_interval)
    assert walk.see().trigger is Trigger.LEADER_VACANT
