"""Whole walks of one agent: starting, promotion, demotion (retried, never skipped), in-place
relay restarts, and stopping."""

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
    Policy,
    Role,
    Session,
    Step,
    Switchover,
    Trigger,
)
from cluster.state import decide
from cluster.takeover import holds_resources
from tests.support.decisions import (
    EPOCH,
    LOSSES,
    NODE,
    NOW,
    PAUSE,
    PEER,
    POLICY,
    RESTART,
    START,
    WALL,
    Walk,
    World,
    demoting,
    eligible,
    fail_the_restart,
    finish_demotion,
    ours,
    promote,
    promote_until,
    ready_peer,
    set_leadership_lost,
    set_session_lost,
    set_session_suspended,
    start_promotion,
    theirs,
)

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


# ------------------------------------------------------------------ a failed demotion step


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


@pytest.mark.parametrize("role", [Role.STARTING, Role.FAILED, Role.PASSIVE])
def test_a_stopping_agent_does_not_start_its_relay(role: Role) -> None:
    world = World(relay_running=False, stopping=True)
    decision = decide(AgentState(role=role), world.snapshot(WALL), NOW, POLICY)
    assert decision.actions == ()
