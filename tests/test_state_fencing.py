"""Taking over without a fence (the lease rule), what a node holds, and whom to fence."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cluster.decision_data import (
    DEMOTION,
    PROMOTION,
    AgentState,
    ClusterView,
    LocalView,
    Member,
    Role,
    Session,
    Snapshot,
    Step,
    Switchover,
    Takeover,
    Trigger,
)
from cluster.state import decide
from cluster.takeover import fence_targets, holds_resources, lease_verdict
from tests.support.decisions import (
    EPOCH,
    NODE,
    NOW,
    OTHER,
    PEER,
    POLICY,
    RESTART,
    START,
    WALL,
    Pair,
    Walk,
    World,
    acquire,
    active,
    demoting,
    eligible,
    ok,
    ours,
    promote_until,
    promoting,
    ready,
    ready_peer,
    start_promotion,
)

# ---------------------------------------------------------------- takeover without a fence


def fencing_fails(absent_for: float | None, *, holds: bool = False) -> Walk:
    """A promotion whose FENCE of the peer is in flight; the peer left ``absent_for`` ago.

    ``absent_for`` None: the peer is still connected, publishing ``holds``.
    """
    walk = eligible()
    walk.world.known = frozenset({NODE, PEER})
    promote_until(walk, Step.FENCE)
    if absent_for is None:
        walk.world.members = {PEER: replace(ready(PEER), role=Role.DEMOTING, holds=holds)}
    else:
        walk.world.absent_since = {PEER: walk.now - absent_for}
    return walk


def test_an_unfenced_peer_whose_lease_expired_long_ago_is_passed_over() -> None:
    walk = fencing_fails(POLICY.lease_grace + 1)
    decision = walk.finish(False, detail="ipmi: timed out")
    assert decision.trigger is Trigger.FENCE_FAILED
    assert [a.step for a in decision.actions] == [Step.STORAGE]
    assert decision.note.startswith("ipmi: timed out; going on: leases expired (beta 3.0s ago")


def test_the_promotion_waits_out_the_grace_then_counts_the_wait_as_fencing() -> None:
    walk = fencing_fails(0.5)
    decision = walk.finish(False, seconds=0.25, detail="no fence agent configured")
    assert decision.actions == () and walk.state.role is Role.PROMOTING
    assert walk.state.retry_at == walk.now + POLICY.lease_grace - 0.5
    assert "waiting for the leases to expire (beta 0.5s ago; grace 2s)" in decision.note
    assert holds_resources(walk.state)  # leadership is held while it waits
    walk.tick(1.0)
    assert walk.see().trigger is Trigger.NOTHING
    walk.tick(0.5)
    decision = walk.see()
    assert decision.trigger is Trigger.RETRY
    assert [a.step for a in decision.actions] == [Step.STORAGE]
    assert walk.state.steps[-1] == (Step.FENCE, 0.25 + 1.5)


def test_losing_the_session_while_waiting_for_a_lease_rolls_back() -> None:
    walk = fencing_fails(0.0)
    walk.finish(False, detail="no fence agent configured")
    walk.tick(0.5)
    walk.world.session = Session.SUSPENDED
    decision = walk.see()
    assert decision.trigger is Trigger.SESSION_LOST
    assert [a.step for a in decision.actions] == [Step.DRAIN]


def test_a_connected_peer_still_holding_is_never_passed_over() -> None:
    walk = fencing_fails(None, holds=True)
    decision = walk.finish(False, detail="ssh: connection refused")
    assert decision.trigger is Trigger.LEASE_REFUSED
    assert walk.state.role is Role.DEMOTING and walk.state.give_up
    assert "beta still connected to ZooKeeper and holding" in decision.note


def test_fence_only_never_passes_over_an_unfenced_peer() -> None:
    walk = fencing_fails(60.0)
    walk.policy = replace(POLICY, takeover=Takeover.FENCE_ONLY)
    decision = walk.finish(False, detail="ipmi: power status unknown")
    assert walk.state.role is Role.DEMOTING
    assert "takeover is fence-only" in decision.note


def test_lease_verdict_takes_the_latest_departure() -> None:
    world = World(absent_since={PEER: NOW - 5, OTHER: NOW - 1}, known=frozenset({PEER, OTHER}))
    snapshot = world.snapshot(WALL)
    at, why = lease_verdict(snapshot, NOW, POLICY)
    assert at == NOW - 1 + POLICY.lease_grace
    assert "beta 5.0s ago, gamma 1.0s ago" in why


# ---------------------------------------------------------------- what a node holds


@pytest.mark.parametrize(
    ("state", "holds"),
    [
        (AgentState(), False),
        (AgentState(step=START), False),
        (AgentState(role=Role.FAILED, attempts=3), False),
        (AgentState(role=Role.PASSIVE), False),
        (AgentState(role=Role.PASSIVE, step=START, cooldown_until=NOW + 5), False),
        # promoting: nothing before the leadership is taken, everything may follow after it
        (promoting(Step.ACQUIRE), False),
        (promoting(Step.FENCE), True),
        (promoting(Step.STORAGE), True),
        (promoting(Step.PUBLISH), True),
        (active(), True),
        (active(step=RESTART, attempts=1), True),
        # demoting: until the spool is released (the relay and the address go before it)
        (demoting(Step.DRAIN), True),
        (demoting(Step.VIP_DOWN, steps=((Step.DRAIN, 0.1),)), True),
        (demoting(Step.STORAGE_DOWN, steps=((Step.DRAIN, 0.1), (Step.VIP_DOWN, 0.1))), True),
        (
            demoting(
                None,
                steps=((Step.DRAIN, 0.1), (Step.VIP_DOWN, 0.1)),
                retry_step=Step.STORAGE_DOWN,
                attempts=2,
            ),
            True,
        ),
        (demoting(Step.RELEASE, steps=tuple((s, 0.1) for s in DEMOTION[:-1])), False),
        (
            demoting(None, steps=tuple((s, 0.1) for s in DEMOTION[:-1]), retry_step=Step.RELEASE),
            False,
        ),
        # releasing a stray leadership: a passive node took nothing else
        (demoting(Step.RELEASE, reason="stray leader", epoch=0), False),
        (demoting(None, reason="stray leader", epoch=0, retry_step=Step.RELEASE), False),
    ],
)
def test_holds_resources(state: AgentState, holds: bool) -> None:
    assert holds_resources(state) is holds


def test_holds_resources_along_a_promotion_and_a_demotion() -> None:
    """Holding begins with the leadership and ends when the spool is released."""
    walk = eligible()
    start_promotion(walk)
    assert not holds_resources(walk.state)  # ACQUIRE in flight: it may lose the race
    acquire(walk)
    for _ in PROMOTION[1:]:
        assert holds_resources(walk.state), walk.state.step
        walk.tick()
        walk.finish()
    assert walk.log[-1].state.role is Role.ACTIVE
    assert holds_resources(walk.state)
    walk.world.members = ready_peer()
    walk.world.switchover = Switchover(NODE, PEER, walk.wall)
    assert walk.see().state.role is Role.DEMOTING
    held: list[tuple[Step | None, bool]] = []
    while walk.state.role is Role.DEMOTING:
        held.append((walk.state.step, holds_resources(walk.state)))
        if walk.state.step is Step.RELEASE:
            walk.world.leader = None
        walk.tick()
        walk.finish()
    assert held == [
        (Step.DRAIN, True),
        (Step.VIP_DOWN, True),
        (Step.STORAGE_DOWN, True),
        (Step.RELEASE, False),
    ]
    assert not holds_resources(walk.state)


# ---------------------------------------------------------------- whom to fence


def fence_world(
    known: set[str], members: dict[str, tuple[Role, bool]], epoch_node: str | None = None
) -> Snapshot:
    """The view when leadership was just taken; ``members``: each record's role and ``holds``."""
    view = ClusterView(
        session=Session.CONNECTED,
        leader=ours(),
        epoch=EPOCH,
        epoch_node=epoch_node,
        members={
            name: Member(node=name, role=role, holds=holds)
            for name, (role, holds) in members.items()
        },
        known_nodes=frozenset(known),
    )
    return Snapshot(cluster=view, local=LocalView(relay_running=True), wall=WALL)


TAKING = (Role.PROMOTING, True)  # this node, as it publishes itself once it took leadership


@pytest.mark.parametrize(
    ("known", "members", "epoch_node", "expected"),
    [
        # The former active node crashed: its member znode is gone.
        ({NODE, PEER}, {NODE: TAKING}, PEER, (PEER,)),
        # A failed fence, then a retry: the epoch record names this node, the peer is still gone.
        ({NODE, PEER}, {NODE: TAKING}, NODE, (PEER,)),
        # A switchover: the peer is connected and passive, it holds nothing.
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.PASSIVE, False)}, PEER, ()),
        # ... or still demoting, with everything but leadership released.
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.DEMOTING, False)}, PEER, ()),
        # A cold start: the peer lost the race for leadership, it took nothing.
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.PROMOTING, False)}, NODE, ()),
        # Connected but holding by its own account: it may hold the spool.
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.DEMOTING, True)}, PEER, (PEER,)),
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.ACTIVE, True)}, PEER, (PEER,)),
        ({NODE, PEER}, {NODE: TAKING, PEER: (Role.PROMOTING, True)}, PEER, (PEER,)),
        # Every node that is not provably clean, in a stable order; never this node.
        ({NODE, PEER, OTHER}, {NODE: TAKING, OTHER: (Role.FAILED, False)}, None, (PEER,)),
        ({NODE, OTHER}, {NODE: TAKING}, PEER, (PEER, OTHER)),
        ({NODE}, {NODE: TAKING}, None, ()),
    ],
)
def test_fence_targets_are_every_node_not_known_to_hold_nothing(
    known: set[str],
    members: dict[str, tuple[Role, bool]],
    epoch_node: str | None,
    expected: tuple[str, ...],
) -> None:
    assert fence_targets(fence_world(known, members, epoch_node), POLICY) == expected


@pytest.mark.parametrize("holds", [False, True], ids=["clean", "holding"])
@pytest.mark.parametrize("role", list(Role), ids=str)
def test_a_member_is_clean_exactly_when_it_says_it_holds_nothing(role: Role, holds: bool) -> None:
    """The record's ``holds`` decides, not its role: the publisher knows what it took."""
    snapshot = fence_world({NODE, PEER}, {NODE: TAKING, PEER: (role, holds)}, PEER)
    assert fence_targets(snapshot, POLICY) == ((PEER,) if holds else ())


def test_the_fence_action_names_the_targets_seen_when_leadership_was_taken() -> None:
    state = promoting(Step.ACQUIRE, epoch=0)
    snapshot = replace(
        fence_world({NODE, PEER}, {NODE: TAKING}, NODE), result=ok(Step.ACQUIRE, EPOCH)
    )
    decision = decide(state, snapshot, NOW, POLICY)
    (action,) = decision.actions
    assert action.step is Step.FENCE and action.fence == (PEER,) and action.epoch == EPOCH


@pytest.mark.parametrize("loser_heard_first", [False, True], ids=["loser-acquiring", "loser-back"])
def test_the_loser_of_a_cold_start_race_is_not_fenced(loser_heard_first: bool) -> None:
    pair = Pair({NODE: AgentState(role=Role.PASSIVE), PEER: AgentState(role=Role.PASSIVE)})
    for node in (NODE, PEER):  # both see the vacant leadership and try to take it
        assert pair.decide(node).trigger is Trigger.LEADER_VACANT
    loser = pair.record(PEER)  # what the winner sees of the loser while both are acquiring
    assert (loser.role, loser.holds) == (Role.PROMOTING, False)
    won, lost = pair.execute(NODE), pair.execute(PEER)
    assert won.ok and not lost.ok
    if loser_heard_first:
        assert pair.decide(PEER, lost).state.role is Role.PASSIVE
    decision = pair.decide(NODE, won)
    (fence,) = decision.actions
    assert fence.step is Step.FENCE
    assert fence.fence == ()  # the loser is connected and holds nothing: no shooting it
    if not loser_heard_first:
        assert pair.decide(PEER, lost).state.role is Role.PASSIVE
    pair.settle()
    assert pair.states[NODE].role is Role.ACTIVE
    assert pair.states[PEER] == AgentState(role=Role.PASSIVE)
    assert pair.fenced == [()]


def test_a_node_releasing_a_stray_leadership_is_not_fenced() -> None:
    """ACQUIRE won, but the session was suspended when its result came: the node rolled back to
    passive, and gives the leader znode up once connected again. The peer takes over the moment
    the znode is gone, while the node still publishes DEMOTING: it must not be fenced."""
    pair = Pair({NODE: AgentState(role=Role.PASSIVE), PEER: AgentState(role=Role.PASSIVE)})
    assert pair.decide(NODE).trigger is Trigger.LEADER_VACANT
    won = pair.execute(NODE)
    pair.suspended.add(NODE)
    assert pair.decide(NODE, won).state.role is Role.PASSIVE
    pair.suspended.clear()
    decision = pair.decide(NODE)
    assert decision.trigger is Trigger.LEADER_STRAY
    assert [a.step for a in decision.actions] == [Step.RELEASE]
    assert pair.record(NODE).role is Role.DEMOTING
    assert not pair.record(NODE).holds
    released = pair.execute(NODE)  # the znode is gone; the node has not heard back yet
    assert pair.decide(PEER).trigger is Trigger.LEADER_VACANT
    decision = pair.run(PEER)
    assert [a.step for a in decision.actions] == [Step.FENCE]
    assert pair.fenced == [()]
    assert pair.decide(NODE, released).state == AgentState(
        role=Role.PASSIVE, steps=((Step.RELEASE, 0.1),)
    )
    pair.settle()
    assert pair.states[PEER].role is Role.ACTIVE
    assert pair.fenced == [()]


def two_nodes_one_active() -> Pair:
    pair = Pair({NODE: AgentState(role=Role.PASSIVE), PEER: AgentState(role=Role.PASSIVE)})
    assert pair.decide(NODE).trigger is Trigger.LEADER_VACANT
    pair.settle()
    assert pair.states[NODE].role is Role.ACTIVE
    assert pair.states[PEER].role is Role.PASSIVE
    pair.fenced.clear()
    pair.now += POLICY.min_failover_interval
    pair.wall += POLICY.min_failover_interval
    return pair


def test_a_node_that_stepped_down_cleanly_is_not_fenced() -> None:
    pair = two_nodes_one_active()
    pair.switchover = Switchover(NODE, PEER, pair.wall)
    assert pair.decide(NODE).trigger is Trigger.SWITCHOVER
    held = []
    while pair.states[NODE].step is not None:
        held.append(pair.record(NODE).holds)
        assert pair.decide(PEER).actions == ()  # the leadership is still taken
        pair.run(NODE)
    assert held == [True, True, True, False]  # DRAIN, VIP_DOWN, STORAGE_DOWN, RELEASE
    assert pair.decide(PEER).trigger is Trigger.LEADER_VACANT
    pair.settle()
    assert pair.states[PEER].role is Role.ACTIVE
    assert pair.states[NODE].role is Role.PASSIVE
    assert pair.fenced == [()]


def test_a_node_that_vanished_while_holding_is_fenced() -> None:
    pair = two_nodes_one_active()
    pair.connected.discard(NODE)  # it crashed: its session expired, its znodes are gone
    pair.leader = None
    assert pair.decide(PEER).trigger is Trigger.LEADER_VACANT
    pair.settle()
    assert pair.states[PEER].role is Role.ACTIVE
    assert pair.fenced == [(NODE,)]


@pytest.mark.parametrize(
    ("trigger", "urgent"),
    [
        (Trigger.SESSION_LOST, True),
        (Trigger.LEADERSHIP_LOST, True),
        (Trigger.SWITCHOVER, False),
        (Trigger.STOP, False),
        (Trigger.RELAY_UNHEALTHY, False),
    ],
)
def test_the_drain_is_short_when_another_node_may_be_taking_over(
    trigger: Trigger, urgent: bool
) -> None:
    expected = POLICY.urgent_drain_timeout if urgent else POLICY.drain_timeout
    assert POLICY.drain_time(trigger.value) == expected
    assert POLICY.urgent_drain_timeout < POLICY.drain_timeout
