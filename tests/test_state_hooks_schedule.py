"""The decisions behind issue 20's control surface: the pre_promote hook as a promotion step,
and a scheduled switchover that becomes the usual request once its time has come."""

from __future__ import annotations

from dataclasses import replace

from cluster.decision_data import (
    PROMOTION,
    AgentState,
    Role,
    ScheduledSwitchover,
    Step,
    Trigger,
)
from tests.support.decisions import (
    EPOCH,
    NODE,
    PEER,
    POLICY,
    WALL,
    Walk,
    World,
    active,
    eligible,
    promote_until,
    ready,
    ready_peer,
    theirs,
)

HOOKED = replace(POLICY, pre_promote=True)


# ------------------------------------------------------------------ pre_promote


def test_the_hook_runs_after_fence_and_before_the_spool_is_taken() -> None:
    assert HOOKED.promotion == (*PROMOTION[:2], Step.PRE_PROMOTE, *PROMOTION[2:])
    walk = Walk(AgentState(role=Role.PASSIVE), policy=HOOKED)
    promote_until(walk, Step.PRE_PROMOTE)
    (action,) = walk.log[-1].actions
    assert action.step is Step.PRE_PROMOTE
    assert action.reason == "leader vacant"  # the hook is told why
    assert action.timeout == HOOKED.timeout(Step.PRE_PROMOTE)
    walk.tick()
    decision = walk.finish()
    assert [a.step for a in decision.actions] == [Step.STORAGE]
    # Its time is part of the promotion's record.
    assert Step.PRE_PROMOTE in dict(decision.state.steps)


def test_without_a_hook_the_promotion_never_waits_for_one() -> None:
    walk = eligible()
    promote_until(walk, Step.PUBLISH)
    assert Step.PRE_PROMOTE not in [a.step for a in walk.actions()]


def test_a_refusing_hook_abandons_the_promotion_before_the_spool() -> None:
    walk = Walk(AgentState(role=Role.PASSIVE), policy=HOOKED)
    promote_until(walk, Step.PRE_PROMOTE)
    walk.tick()
    decision = walk.finish(False, detail="pre_promote exited 3: storage array says no")

    assert decision.trigger is Trigger.STEP_FAILED
    assert decision.state.role is Role.DEMOTING
    assert [a.step for a in decision.actions] == [Step.DRAIN]
    assert decision.state.give_up  # a cooldown follows: no retry loop against a "no"
    assert "pre_promote exited 3" in decision.note
    assert Step.STORAGE not in [a.step for a in walk.actions()]


def test_after_a_lease_wait_the_hook_still_runs_before_the_spool() -> None:
    walk = Walk(AgentState(role=Role.PASSIVE), policy=HOOKED)
    walk.world.known = frozenset({PEER})
    promote_until(walk, Step.FENCE)
    walk.world.absent_since = {PEER: walk.now - 10}
    walk.tick()
    decision = walk.finish(False, detail="no fence agent")
    assert decision.trigger is Trigger.FENCE_FAILED
    assert [a.step for a in decision.actions] == [Step.PRE_PROMOTE]
    assert decision.actions[0].reason == "leader vacant"


# ------------------------------------------------------------------ scheduled switchover


def scheduled(due: float, target: str | None = PEER, source: str = NODE) -> ScheduledSwitchover:
    return ScheduledSwitchover(source, target, due, at=due - 600, by="ops")


def active_walk(due: float) -> Walk:
    world = World(leader=replace(theirs(EPOCH), node=NODE, ours=True), members=ready_peer())
    world.scheduled = scheduled(due)
    return Walk(active(), world)


def test_an_active_node_hands_over_when_the_scheduled_time_comes() -> None:
    walk = active_walk(WALL + 60)
    assert walk.see().trigger is Trigger.NOTHING  # not yet
    walk.tick(61)
    decision = walk.see()
    assert decision.trigger is Trigger.SWITCHOVER
    assert decision.state.role is Role.DEMOTING
    assert [a.step for a in decision.actions] == [Step.DRAIN]


def test_a_scheduled_switchover_missed_by_more_than_the_timeout_is_ignored() -> None:
    walk = active_walk(WALL - POLICY.switchover_timeout - 1)
    assert walk.see().trigger is Trigger.NOTHING


def test_when_due_only_the_target_takes_over_and_never_the_node_that_left() -> None:
    def vacant(node: str, target: str | None, source: str) -> Trigger:
        walk = Walk(AgentState(role=Role.PASSIVE), World(members={PEER: ready(PEER)}))
        walk.policy = replace(POLICY, node=node)
        walk.world.scheduled = scheduled(WALL - 1, target, source)
        return walk.see().trigger

    assert vacant(NODE, NODE, PEER) is Trigger.LEADER_VACANT
    assert vacant(NODE, "gamma", PEER) is Trigger.NOTHING  # someone else's turn
    assert vacant(NODE, None, NODE) is Trigger.NOTHING  # the node that handed over


def test_a_scheduled_switchover_not_yet_due_changes_nothing_for_the_passive_node() -> None:
    walk = Walk(AgentState(role=Role.PASSIVE), World(members={PEER: ready(PEER)}))
    walk.world.scheduled = scheduled(WALL + 60, NODE, PEER)
    walk.world.last_served = WALL - 1  # the anti-flapping interval holds a plain takeover back
    assert walk.see().trigger is Trigger.NOTHING
    walk.tick(61)
    decision = walk.see()  # due: a planned hand-over is not held back by the interval
    assert decision.trigger is Trigger.LEADER_VACANT
    assert decision.state.reason == "switchover"
