"""Who may take over, as the operator's switchover command, the active node and the target see it.

Plain data: a cluster view, the operator's target choice and the two nodes' decisions. A
switchover the command accepts must be one the active node hands over and the target takes;
one that nobody can take is refused by the command and, should a request get through anyway
(an older client, a race), by the active node, which stays active and says why.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.decision_data import (
    PROMOTION,
    AgentState,
    ClusterView,
    Leader,
    LocalView,
    Member,
    Policy,
    Role,
    Session,
    Snapshot,
    Switchover,
    Trigger,
)
from cluster.operator import OperatorError, choose_switchover_target
from cluster.state import decide

ACTIVE, TARGET = "alpha", "beta"
NOW = 1000.0  # monotonic
WALL = 1_700_000_000.0
EPOCH = 7
HEARTBEAT = 1.0
STALE_AFTER = 30.0


def ready(node: str) -> Member:
    return Member(node, Role.PASSIVE, relay_running=True, relay_ready=False, heartbeat=WALL)


def serving() -> Member:
    return Member(ACTIVE, Role.ACTIVE, EPOCH, True, True, heartbeat=WALL, holds=True)


def active_state() -> AgentState:
    steps = tuple((step, 0.5) for step in PROMOTION)
    return AgentState(role=Role.ACTIVE, epoch=EPOCH, started=NOW - 10, steps=steps)


def view(**changes: object) -> ClusterView:
    base = ClusterView(
        session=Session.CONNECTED,
        leader=Leader(ACTIVE, EPOCH, WALL - 100, ours=True),  # as the active node sees it
        epoch=EPOCH,
        epoch_node=ACTIVE,
        members={ACTIVE: serving(), TARGET: ready(TARGET)},
        known_nodes=frozenset({ACTIVE, TARGET}),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


# Ways the target is in the cluster yet may not take over.
REFUSALS: dict[str, dict[str, object]] = {
    "target outdated": {"outdated": frozenset({TARGET})},
    "split brain reported": {"split_brain": f"{ACTIVE} and {TARGET} diverged"},
}


def accepted(cluster: ClusterView, target: str | None) -> str | None:
    """The target the operator's command would ask for, or None when it refuses."""
    try:
        return choose_switchover_target(cluster, target, HEARTBEAT, STALE_AFTER, WALL)
    except OperatorError:
        return None


def active_node_decides(cluster: ClusterView) -> Role:
    snapshot = Snapshot(cluster, LocalView(True, True), WALL)
    return decide(active_state(), snapshot, NOW, Policy(node=ACTIVE)).state.role


def target_takes_over(cluster: ClusterView) -> bool:
    """Whether the target starts a promotion once the active node has let go."""
    members = {TARGET: cluster.members[TARGET]}
    vacant = replace(cluster, leader=None, members=members)
    snapshot = Snapshot(vacant, LocalView(True, False), WALL + 1)
    state = AgentState(role=Role.PASSIVE)
    decision = decide(state, snapshot, NOW + 1, Policy(node=TARGET))
    return decision.trigger is Trigger.LEADER_VACANT


@pytest.mark.parametrize("target", [TARGET, None], ids=["to-target", "to-anyone"])
@pytest.mark.parametrize("why", list(REFUSALS))
def test_a_switchover_nobody_can_take_is_refused_by_the_command_and_the_active_node(
    why: str, target: str | None
) -> None:
    """The bug of issue 16: the command accepted it, the active node demoted, and the target
    refused: nobody served mail until the request expired."""
    cluster = view(**REFUSALS[why])
    assert not target_takes_over(replace(cluster, switchover=Switchover(ACTIVE, TARGET, WALL)))
    assert accepted(cluster, target) is None
    request = Switchover(ACTIVE, target, WALL)
    assert active_node_decides(replace(cluster, switchover=request)) is Role.ACTIVE


@pytest.mark.parametrize("target", [TARGET, None], ids=["to-target", "to-anyone"])
def test_a_switchover_to_a_ready_target_is_accepted_handed_over_and_taken(
    target: str | None,
) -> None:
    cluster = view()
    assert accepted(cluster, target) == TARGET
    with_request = replace(cluster, switchover=Switchover(ACTIVE, TARGET, WALL))
    assert active_node_decides(with_request) is Role.DEMOTING
    assert target_takes_over(with_request)
