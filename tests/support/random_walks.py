"""Random walks of one agent through a changing world, and the invariants checked at each step.

A seeded generator perturbs the world the way a real cluster does (sessions, leaders, pauses,
switchovers, DRBD's marks, the peer's records) and simulates the executor; ``check`` restates
the safety rules independently of the code under test and asserts them on every decision.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from cluster.decision_data import (
    DEMOTION,
    PROMOTION,
    AgentState,
    Decision,
    Leader,
    LocationVerdict,
    Member,
    Policy,
    Role,
    Session,
    Snapshot,
    Step,
    StepResult,
    Switchover,
    Takeover,
    Trigger,
)
from cluster.state import TRANSITIONS, classify, decide, refine
from cluster.takeover import heartbeat_age, holds_resources, lease_verdict, pulse_age
from tests.support.decisions import (
    NODE,
    NOW,
    OTHER,
    PAUSE,
    PEER,
    RESTART,
    START,
    UNREADY,
    WALL,
    World,
    graceful_drain,
    ours,
    ready,
    theirs,
    unready,
)

# ------------------------------------------------------------------ random walks

RANDOM_POLICY = Policy(
    node=NODE,
    relay_failure_limit=2,
    relay_restart_limit=1,
    relay_start_limit=2,
    retry_interval=2.0,
    min_failover_interval=3.0,
    cooldown=10.0,
    switchover_timeout=8.0,
    failsafe_peers=frozenset({PEER}),
)
FAILSAFE_TRIGGERS = (Trigger.FAILSAFE_ENTERED, Trigger.FAILSAFE_ENDED)


def failsafe_covers(snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """The failsafe rule, restated: suspended, and every other node (configured or known) holds
    this node a lease that ends after the urgent drain and the margin from now."""
    cluster = snapshot.cluster
    if not policy.failsafe or not policy.failsafe_peers or cluster.session is not Session.SUSPENDED:
        return False
    held = dict(snapshot.failsafe_held)
    needed = (policy.failsafe_peers | cluster.known_nodes) - {policy.node}
    margin = policy.urgent_drain_timeout + policy.session_margin
    return all(name in held and held[name] - now > margin for name in needed)


def random_leader(rng: random.Random, epoch: int) -> Leader | None:
    owner = rng.choice((None, NODE, PEER))
    if owner is None:
        return None
    return Leader(owner, epoch, since=WALL, ours=owner == NODE)


def random_switchover(rng: random.Random, wall: float) -> Switchover | None:
    if rng.random() < 0.5:
        return None
    source = rng.choice((NODE, PEER))
    target = rng.choice((None, NODE, PEER, OTHER))
    return Switchover(source, target, wall - rng.choice((0.0, 4.0, 8.0, 9.0)))


def random_members(rng: random.Random) -> dict[str, Member]:
    """The other nodes' records: present or not, ready to take over or not."""
    members: dict[str, Member] = {}
    for node, choices in ((PEER, ("ready",) * 6 + tuple(UNREADY)), (OTHER, ("ready", "failed"))):
        why = rng.choice((None, *choices))
        if why == "ready":
            members[node] = ready(node)
        elif why is not None:
            members[node] = unready(node, why)
    return members


def mark(rng: random.Random, world: World) -> None:
    """DRBD marks a replica outdated or reports a split brain, or an operator clears them (drawn
    from a generator of their own, so that the walks' other draws stay what they were)."""
    if rng.random() < (0.2 if world.outdated or world.split_brain else 0.01):
        marks: tuple[frozenset[str], ...] = (frozenset({NODE}), frozenset({PEER}), frozenset())
        world.outdated = frozenset() if world.outdated else rng.choice(marks)
        world.split_brain = "r0 diverged" if rng.random() < 0.2 else None


def gray(rng: random.Random, world: World, wall: float) -> None:
    """The check locations' verdicts change: some see the service down, since before or after
    the term began, some are stale (drawn from a generator of their own, like ``mark``)."""
    if rng.random() < 0.3:
        verdicts = []
        for index in range(rng.choice((0, 1, 2, 2, 2, 3, 3))):
            since = rng.choice((wall - 1.0, wall - 1.0, WALL - 100.0))
            down = (("vip-smtp", since),) if rng.random() < 0.8 else ()
            at = wall - rng.choice((0.0, 0.0, 1.0, RANDOM_POLICY.gray_verdict_max_age + 1))
            verdicts.append(LocationVerdict(f"loc{index}", at, ("vip-smtp",), down))
        world.locations = tuple(verdicts)
        if rng.random() < 0.5:  # a peer ready to take over, so that handovers happen too
            world.members[PEER] = ready(PEER)


def gray_seen(snapshot: Snapshot, policy: Policy) -> bool:
    """The gray failure rule, restated: at least two fresh locations, and more than half of
    those that watch the service, see it down since the term began."""
    leader = snapshot.cluster.leader
    if leader is None:
        return False
    known = [v for v in snapshot.location_verdicts if v.watched]
    fresh = [v for v in known if snapshot.wall - v.at <= policy.gray_verdict_max_age]
    seeing = [v for v in fresh if any(since >= leader.since for _, since in v.down)]
    return len(seeing) >= 2 and len(seeing) > len(known) / 2


def perturb(rng: random.Random, world: World, wall: float) -> None:
    """The world changes a little, the way a real cluster does, and sometimes a lot."""
    if rng.random() < 0.02:
        world.session = rng.choices(list(Session), weights=(6, 3, 1))[0]
        if world.session is Session.LOST and world.leader is not None and world.leader.ours:
            world.leader = None
    if world.leader is not None and not world.leader.ours:
        if rng.random() < 0.05:  # the peer dies or hands over
            world.leader = None
    elif rng.random() < 0.01:
        if rng.random() < 0.5:
            world.leader = None
        else:  # the peer takes over
            world.epoch += 1
            world.leader = theirs(world.epoch)
            world.epoch_node = PEER
            world.last_failover = wall
            if rng.random() < 0.7:  # ... and serves (or dies promoting: served nothing)
                world.last_served = wall
    if rng.random() < (0.1 if world.paused is not None else 0.01):
        world.paused = None if world.paused is not None else PAUSE
    if rng.random() < 0.02:
        world.switchover = random_switchover(rng, wall)
    if rng.random() < 0.05:
        world.members = random_members(rng)
    if rng.random() < 0.03:
        world.relay_running = not world.relay_running
    if rng.random() < 0.05:
        world.relay_failures = rng.randrange(4)
    if rng.random() < 0.006:  # SIGTERM: stays until the agent exits
        world.stopping = True


def arbitrary(rng: random.Random, wall: float, result: StepResult | None) -> Snapshot:
    """A snapshot with every field drawn independently: no coherence at all."""
    world = World(
        session=rng.choice(list(Session)),
        leader=random_leader(rng, rng.randrange(1, 20)),
        epoch=rng.randrange(20),
        epoch_node=rng.choice((None, NODE, PEER)),
        paused=rng.choice((None, PAUSE)),
        switchover=random_switchover(rng, wall),
        last_failover=rng.choice((None, wall, wall - 10)),
        last_served=rng.choice((None, wall, wall - 10)),
        relay_running=rng.random() < 0.7,
        relay_failures=rng.randrange(4),
        members=random_members(rng),
        stopping=rng.random() < 0.2,
    )
    return world.snapshot(wall, result)


def run_executor(
    rng: random.Random,
    step: Step,
    world: World,
    wall: float,
    stale: tuple[str, int] | None = None,
) -> StepResult:
    """The outcome of ``step``, and what it did to the world (``stale``: the leader znode an
    ACQUIRE after a confirmed fence may replace, if it is still that one)."""
    success = rng.random() < (0.6 if step in (START, RESTART) else 0.9)
    epoch = 0
    if step is Step.ACQUIRE:
        leader = world.leader
        replaceable = leader is None or (
            stale is not None and not leader.ours and (leader.node, leader.epoch) == stale
        )
        if success and replaceable:
            world.epoch += 1
            epoch = world.epoch
            world.leader = ours(epoch)
            world.epoch_node = NODE
            world.last_failover = wall
        else:
            success = False
    elif step is Step.PUBLISH and success:
        world.last_served = wall
    elif step is Step.RELEASE and success and world.leader is not None and world.leader.ours:
        world.leader = None
    elif step in (START, RESTART) and success:
        world.relay_running = True
        world.relay_failures = 0
    return StepResult(step, success, round(rng.random(), 3), epoch=epoch)


def may_take_over(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """The essay's rules for taking over, restated independently of the code under test."""
    cluster = snapshot.cluster
    if state.role is not Role.PASSIVE or cluster.session is not Session.CONNECTED:
        return False
    if cluster.leader is not None or not snapshot.local.relay_running:
        return False
    if now < state.cooldown_until or snapshot.local.stopping:
        return False
    if policy.node in cluster.outdated or cluster.split_brain is not None:
        return False
    request = cluster.switchover
    if request is not None and snapshot.wall - request.at <= policy.switchover_timeout:
        return request.source != policy.node and request.target in (None, policy.node)
    if cluster.paused is not None:
        return False
    last = cluster.last_served  # a takeover aborted before it served does not count
    return last is None or snapshot.wall - last >= policy.min_failover_interval


def eligible(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """The fast path's rules, restated: a passive, connected, warm node, not cooling down or
    stopping, its replica servable, no planned handover, not paused, no recent takeover."""
    cluster = snapshot.cluster
    if state.role is not Role.PASSIVE or cluster.session is not Session.CONNECTED:
        return False
    if not snapshot.local.relay_running or snapshot.local.stopping:
        return False
    if now < state.cooldown_until or policy.node in cluster.outdated:
        return False
    if cluster.split_brain is not None or cluster.paused is not None:
        return False
    request = cluster.switchover
    if request is not None and snapshot.wall - request.at <= policy.switchover_timeout:
        return False
    last = cluster.last_served
    return last is None or snapshot.wall - last >= policy.min_failover_interval


def pulse_fresh(snapshot: Snapshot, node: str, policy: Policy) -> bool:
    """``node``'s pulse in ZooKeeper advanced within ``peer_timeout``: it is alive."""
    age = pulse_age(snapshot, node)
    return age is not None and age < policy.peer_timeout


def may_fence_silent(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """A passive node fences the leader only when its heartbeats stopped ``peer_timeout`` ago
    and its pulse in ZooKeeper has not advanced for as long (a cut channel fences nobody)."""
    leader = snapshot.cluster.leader
    if leader is None or leader.ours or now < state.silent_fence_at:
        return False
    if pulse_fresh(snapshot, leader.node, policy):
        return False
    age = heartbeat_age(snapshot, leader.node)
    return age is not None and age >= policy.peer_timeout and eligible(state, snapshot, now, policy)


def may_take_over_fenced(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """ACQUIRE over a leader znode only after this node's confirmed fence of that very term."""
    result, leader, fenced = snapshot.result, snapshot.cluster.leader, state.silent_leader
    if result is None or result.step is not Step.FENCE or not result.ok or fenced is None:
        return False
    if leader is not None and (leader.ours or (leader.node, leader.epoch) != fenced):
        return False
    age = heartbeat_age(snapshot, fenced[0])
    heard = age is not None and age < policy.peer_timeout
    if heard or pulse_fresh(snapshot, fenced[0], policy):
        return False
    return eligible(state, snapshot, now, policy)


def session_gone(role: Role, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """The session rule, restated: a lost session is gone; a suspended one too, unless the node
    is active and the session surely lives on the server for longer than the urgent drain and
    the margin."""
    cluster = snapshot.cluster
    deadline = cluster.session_deadline
    if cluster.session is Session.CONNECTED and deadline is None:
        return False
    if role is Role.ACTIVE and failsafe_covers(snapshot, now, policy):
        return False
    if cluster.session is not Session.CONNECTED and (
        cluster.session is Session.LOST or deadline is None or role is not Role.ACTIVE
    ):
        return True
    assert deadline is not None
    return deadline - now <= policy.urgent_drain_timeout + policy.session_margin


def may_hand_over(snapshot: Snapshot, policy: Policy) -> bool:
    """A fresh request from this node names a member (or, with no target, some other member)
    that is passive, has its warm relay running and is not cooling down."""
    request = snapshot.cluster.switchover
    if request is None or request.source != policy.node:
        return False
    if snapshot.wall - request.at > policy.switchover_timeout:
        return False
    cluster = snapshot.cluster
    members = cluster.members
    names = {request.target} if request.target is not None else set(members)
    return cluster.split_brain is None and any(
        name != policy.node
        and name in members
        and members[name].role is Role.PASSIVE
        and members[name].relay_running
        and not members[name].cooldown
        and name not in cluster.outdated
        for name in names
    )


# What each step may take, and the step whose success lets go of it again.
TAKES: dict[Step, str] = {
    Step.STORAGE: "spool",
    Step.VIP: "address",
    Step.RELAY: "serving relay",
    RESTART: "serving relay",
}
LETS_GO: dict[Step, str] = {
    Step.STORAGE_DOWN: "spool",
    Step.VIP_DOWN: "address",
    Step.DRAIN: "serving relay",
}


@dataclass
class History:
    """What the checker remembers of the walk so far."""

    term_epoch: int = 0  # returned by the ACQUIRE of the current term, 0 outside a term
    promoted: list[Step] = field(default_factory=list)  # promotion steps done in this term
    demoted: list[Step] = field(default_factory=list)  # demotion steps done in this demotion
    demotion: tuple[Step, ...] = ()  # the steps the current demotion must run
    # What the node may hold on this machine: taken from the moment a step that takes it is
    # started (an abandoned or failed step may have done half of its work), until the step
    # that lets go of it succeeded.
    taken: set[str] = field(default_factory=set)
    seen: set[tuple[Role, Trigger]] = field(default_factory=set)
    activations: int = 0
    demotions: int = 0
    give_ups: int = 0
    preempted: int = 0  # steps in flight cut short by a lost session or leadership
    stops: int = 0  # handovers because the agent was stopping
    handovers: int = 0  # switchovers begun by this active node
    refused: int = 0  # decisions to stay active on a fresh request nobody could take
    exits: int = 0  # the agent stopped, holding nothing
    storage_checked: int = 0  # STORAGE started, with the replica's marks looked at
    rode_out: int = 0  # decisions that kept a suspended active node serving (deadline ahead)
    silent_fences: int = 0  # a passive node fenced a silent leader
    fast_takeovers: int = 0  # ... and, the fence confirmed, replaced its leader znode
    silent: int = 0  # ... that found a "connected" session's contact run out while holding
    grays: int = 0  # handovers begun because the check locations saw the service down
    gray_held: int = 0  # ... seen, but not acted on (paused, too soon, nobody to take over)
    failsafe: int = 0  # decisions that began serving in failsafe (every peer's lease held)
    failsafe_rides: int = 0  # active, suspended, past its session's deadline: on the leases
    past_grants: int = 0  # unfenced takeovers after a failsafe lease it granted had ended
    channel_cuts: int = 0  # a leader unheard on the channel but pulsing: said, not fenced


def check(
    history: History,
    before: AgentState,
    snapshot: Snapshot,
    now: float,
    policy: Policy,
    decision: Decision,
) -> None:
    """The invariants of one decision."""
    after = decision.state
    result = snapshot.result
    cluster = snapshot.cluster
    cause = classify(before, snapshot, now, policy)
    trigger = refine(cause, before, snapshot, now, policy)
    history.seen.add((before.role, trigger))
    # The table is the whole truth: the trigger logged is the one looked up, and the role after
    # the decision is its row's.
    assert decision.trigger is trigger
    if (before.role, trigger) in TRANSITIONS:
        assert after.role is TRANSITIONS[(before.role, trigger)].to
    else:
        assert after == before
    steps = [a.step for a in decision.actions]
    stopping = snapshot.local.stopping

    # What the node may hold: the last step's outcome, then the step it starts now.
    if result is not None and result.ok and result.step in LETS_GO:
        history.taken.discard(LETS_GO[result.step])
    history.taken.update(TAKES[step] for step in steps if step in TAKES)
    if history.taken:
        assert holds_resources(after), (history.taken, after)
    if after.role in (Role.STARTING, Role.PASSIVE, Role.FAILED):
        assert not history.taken
        assert not holds_resources(after)

    # Safety first: a node holding resources (active, or promoting in a term it took) that
    # lost its session or leadership lets go on this very snapshot, even with a step in flight.
    acquired = result is not None and result.step is Step.ACQUIRE and result.ok
    holding = before.role is Role.ACTIVE or (
        before.role is Role.PROMOTING and (before.epoch > 0 or acquired)
    )
    lost = session_gone(before.role, snapshot, now, policy) or not (
        cluster.leader and cluster.leader.ours
    )
    connected = cluster.session is Session.CONNECTED
    history.silent += connected and holding and session_gone(before.role, snapshot, now, policy)
    assert len(decision.actions) <= 1
    # Failsafe: the sub-state of an active node follows the leases, whatever step is in flight,
    # but never over a step's result (it would be lost).
    covered = before.role is Role.ACTIVE and failsafe_covers(snapshot, now, policy)
    if trigger in FAILSAFE_TRIGGERS:
        assert not (holding and lost) and result is None and decision.actions == ()
        entered = trigger is Trigger.FAILSAFE_ENTERED
        assert entered is covered
        assert after == replace(before, failsafe_since=now if entered else None)
        history.failsafe += entered
        return
    if after.role is Role.ACTIVE and result is None:
        assert (after.failsafe_since is not None) is covered
    if after.role is not Role.ACTIVE:
        assert after.failsafe_since is None
    if holding and lost:
        if before.step is not None and result is None:
            history.preempted += 1
        if before.role is Role.PROMOTING and before.epoch == 0:  # nothing taken but the znode
            assert after.role is Role.PASSIVE
            assert steps == []
        else:
            assert after.role is Role.DEMOTING
            assert after.step is Step.DRAIN
            assert decision.actions[0].timeout == policy.urgent_drain_timeout
            assert after.give_up is (before.role is Role.PROMOTING)
    elif graceful_drain(before) and result is None and cluster.session is not Session.CONNECTED:
        # A graceful drain is cut short: an urgent one replaces it, the give-up kept.
        assert trigger is Trigger.SESSION_LOST
        assert after.step is Step.DRAIN and after.give_up is before.give_up
        assert decision.actions[0].timeout == policy.urgent_drain_timeout
        return
    elif before.step is not None and result is None:
        # One step at a time: nothing else happens while a step is in flight.
        assert trigger is Trigger.WAITING
        assert decision.actions == ()
        assert after == before
        return
    if result is not None:
        assert result.step is before.step
    assert after.step == (steps[0] if steps else None)

    # A stopping agent hands over and never takes anything on.
    if stopping:
        assert Step.ACQUIRE not in steps
        assert not set(steps) & set(PROMOTION)
        assert after.role is not Role.ACTIVE
        if before.role is Role.PASSIVE:
            assert START not in steps
        if before.role in (Role.ACTIVE, Role.PROMOTING):
            assert after.role in (Role.DEMOTING, Role.PASSIVE)
            if not (holding and lost):
                assert cause is Trigger.STOP
                history.stops += 1
                if before.role is Role.ACTIVE:
                    assert not after.give_up
                    assert decision.actions[0].timeout == policy.drain_timeout

    # A switchover only to a member that can take it; otherwise the node stays active.
    if trigger is Trigger.SWITCHOVER:
        assert may_hand_over(snapshot, policy)
        history.handovers += 1
    # A gray failure hands over only when the locations see it, and as a failover may.
    if trigger in (Trigger.GRAY_FAILURE, Trigger.GRAY_FAILURE_HELD):
        assert before.role is Role.ACTIVE and gray_seen(snapshot, policy)
        assert snapshot.local.relay_ready and snapshot.local.relay_failures == 0
    if trigger is Trigger.GRAY_FAILURE:
        assert cluster.paused is None
        last = cluster.last_served
        assert last is None or snapshot.wall - last >= policy.min_failover_interval
        assert may_hand_over(replace_request(snapshot, policy), policy)
        history.grays += 1
    history.gray_held += trigger is Trigger.GRAY_FAILURE_HELD
    if before.role is Role.ACTIVE and trigger is Trigger.NOTHING and policy.gray_failure:
        local = snapshot.local
        if local.relay_ready and local.relay_failures == 0 and cluster.switchover is None:
            assert not gray_seen(snapshot, policy)
    if before.role is Role.ACTIVE and trigger in (Trigger.NOTHING, Trigger.SWITCHOVER_REFUSED):
        assert not may_hand_over(snapshot, policy)
        request = cluster.switchover
        pending = (
            request is not None
            and request.source == policy.node
            and snapshot.wall - request.at <= policy.switchover_timeout
        )
        assert pending is (trigger is Trigger.SWITCHOVER_REFUSED)
        if pending:
            assert decision.note.startswith("switchover refused: ")
        history.refused += pending

    # The current term: its epoch is the one ACQUIRE returned, and every action carries it.
    # The spool is taken only for a replica that may be served.
    if Step.STORAGE in steps:
        assert policy.node not in cluster.outdated and cluster.split_brain is None
        history.storage_checked += 1
    if Step.ACQUIRE in steps:
        stale = decision.actions[0].stale_leader
        if may_take_over(before, snapshot, now, policy):
            assert stale is None
        else:
            # A silent but perhaps alive leader: fenced, confirmed, before anything is taken.
            assert may_take_over_fenced(before, snapshot, now, policy)
            assert stale == (before.silent_leader if cluster.leader is not None else None)
            history.fast_takeovers += 1
        assert decision.actions[0].epoch == 0
        history.term_epoch = 0
        history.promoted = []
    if before.role is Role.PROMOTING and result is not None and result.ok:
        if result.step is Step.ACQUIRE:
            history.term_epoch = result.epoch
        if after.role in (Role.PROMOTING, Role.ACTIVE):
            history.promoted.append(result.step)
    if Step.STORAGE in steps and history.promoted == [Step.ACQUIRE]:
        # Past FENCE without a fence: only over nodes whose leases provably expired.
        assert policy.takeover is Takeover.FENCE_OR_LEASE
        at, why = lease_verdict(snapshot, now, policy)
        assert at is not None and at <= now, why
        # ... and never within a failsafe lease this node granted, nor its grace.
        granted = [until + policy.lease_grace for _, until in snapshot.failsafe_granted]
        assert all(end <= now for end in granted), (granted, now)
        history.past_grants += bool(granted)
        history.promoted.append(Step.FENCE)
    # A leader unheard on the peer channel whose pulse advances is never fenced by it.
    leader = cluster.leader
    if leader is not None and pulse_fresh(snapshot, leader.node, policy):
        assert all(leader.node not in a.fence for a in decision.actions if a.step is Step.FENCE)
        assert trigger is not Trigger.PEER_SILENT
    if trigger is Trigger.CHANNEL_SILENT:
        assert leader is not None and pulse_fresh(snapshot, leader.node, policy)
        assert after.channel_silent == leader.node != before.channel_silent
        assert decision.actions == ()
        history.channel_cuts += 1
    pre_fence = before.role is Role.PASSIVE and steps == [Step.FENCE]
    if pre_fence:
        assert may_fence_silent(before, snapshot, now, policy)
        assert cluster.leader is not None
        assert decision.actions[0].fence == (cluster.leader.node,)
        assert after.silent_leader == (cluster.leader.node, cluster.leader.epoch)
        history.silent_fences += 1
    for action in decision.actions:
        if action.step is not Step.ACQUIRE:
            assert action.epoch == history.term_epoch, (action, history.term_epoch)
    if after.role in (Role.ACTIVE, Role.DEMOTING) or (
        after.role is Role.PROMOTING and after.step is not Step.ACQUIRE
    ):
        assert after.epoch == history.term_epoch

    # Promotion steps are taken only while connected and holding the leader znode.
    if set(steps) & set(PROMOTION[1:]) and not pre_fence:
        assert cluster.session is Session.CONNECTED
        assert cluster.leader is not None and cluster.leader.ours

    # ACTIVE only after the complete promotion of this term, and never without a session but
    # while it surely lives on on the server, the urgent drain and the margin before its end.
    if after.role is Role.ACTIVE:
        assert not session_gone(Role.ACTIVE, snapshot, now, policy)
        if cluster.session is not Session.CONNECTED:
            history.rode_out += 1
            deadline = cluster.session_deadline
            margin = policy.urgent_drain_timeout + policy.session_margin
            history.failsafe_rides += deadline is None or deadline - now <= margin
        assert cluster.leader is not None and cluster.leader.ours
        if before.role is not Role.ACTIVE:
            assert before.role is Role.PROMOTING
            assert history.promoted == list(PROMOTION)
            history.activations += 1
        else:
            assert after.epoch == before.epoch

    # Demotion: every step in order, a failed one again, RELEASE last, cooldown iff giving up.
    if after.role is Role.DEMOTING and before.role is not Role.DEMOTING:
        history.demoted = []
        if before.role is Role.PASSIVE:
            history.demotion = (Step.RELEASE,)
            assert not after.give_up
        else:
            history.demotion = DEMOTION
            giving_up = before.role is Role.PROMOTING or decision.trigger in (
                Trigger.RELAY_UNHEALTHY,
                Trigger.GRAY_FAILURE,
            )
            assert after.give_up is giving_up
        assert steps == [history.demotion[0]]
    elif before.role is Role.DEMOTING:
        if result is not None and result.ok:
            history.demoted.append(result.step)
        for step in steps:
            assert step is history.demotion[len(history.demoted)]
        if before.step is None and result is None:
            # A failed step waits out retry_interval; giving up leadership waits only for
            # ZooKeeper to answer again.
            back = before.retry_step is Step.RELEASE and cluster.session is Session.CONNECTED
            assert bool(steps) is (now >= before.retry_at or back)
        if after.role is not Role.DEMOTING:
            assert after.role is Role.PASSIVE
            assert history.demoted == list(history.demotion)
            history.demotions += 1
            if before.give_up:
                history.give_ups += 1
                assert after.cooldown_until == now + policy.cooldown
            else:
                assert after.cooldown_until == before.cooldown_until
    if after.role in (Role.PASSIVE, Role.STARTING, Role.FAILED):
        assert after.epoch == 0
        assert not after.give_up
        history.term_epoch = 0

    # What the node publishes as ``holds``: from the leadership taken to the spool released.
    if after.role is Role.PROMOTING:
        assert holds_resources(after) is (after.step is not Step.ACQUIRE)
    if after.role is Role.DEMOTING:
        full = history.demotion == DEMOTION
        assert holds_resources(after) is (full and Step.STORAGE_DOWN not in history.demoted)


def replace_request(snapshot: Snapshot, policy: Policy) -> Snapshot:
    """``snapshot`` with this node asking for a handover to anyone (what a gray failure does)."""
    request = Switchover(policy.node, None, snapshot.wall)
    return replace(snapshot, cluster=replace(snapshot.cluster, switchover=request))


def random_walk(seed: int, steps: int) -> History:
    rng = random.Random(seed)
    marks = random.Random(-seed)
    deadlines = random.Random(seed + 1000)  # its own too: the session deadlines' draws
    grays = random.Random(seed + 2000)  # ... and the check locations' verdicts
    leases = random.Random(seed + 3000)  # ... and the failsafe leases'
    silence = random.Random(seed + 4000)  # ... and the peer's heartbeats'
    pulses = random.Random(seed + 5000)  # ... and its pulse in ZooKeeper's
    stale: tuple[str, int] | None = None  # the ACQUIRE in flight may replace this znode
    policy = RANDOM_POLICY
    world = World(relay_running=False, epoch=0, epoch_node=None, known=frozenset({NODE, PEER}))
    state = AgentState()
    history = History()
    now, wall = NOW, WALL
    for _ in range(steps):
        done = state.role in (Role.STARTING, Role.PASSIVE, Role.FAILED) and state.step is None
        exits = world.stopping and done
        if exits or rng.random() < 0.003:
            # The agent exits (stopped, holding nothing) or crashes, and starts again with a new
            # ZooKeeper session; its clean slate releases what a former run left held.
            history.exits += exits
            state = AgentState()
            history.term_epoch = 0
            history.taken.clear()
            world.stopping = False
            world.relay_running = rng.random() < 0.5
            if world.leader is not None and world.leader.ours:
                world.leader = None
        elapsed = rng.choice((0.0, 0.1, 0.5, 1.0, 2.5))
        now += elapsed
        wall += elapsed
        suspended = world.session is Session.SUSPENDED
        perturb(rng, world, wall)
        mark(marks, world)
        gray(grays, world, wall)
        if state.role is Role.ACTIVE and not suspended and deadlines.random() < 0.05:
            world.session = Session.SUSPENDED  # a ZooKeeper server restarted under it
        elif suspended and deadlines.random() < 0.3:
            world.session = Session.CONNECTED  # kazoo found another server
        if world.session is Session.SUSPENDED and not suspended:
            # The last answered read was a moment ago, or long enough ago to be past the margin.
            world.session_deadline = deadlines.choice((None, now + 3.0, now + 2.0, now + 0.8))
        elif world.session is Session.CONNECTED:
            # Contacts renewed as requests are answered; now and then a server gone silent that
            # kazoo has not noticed: the contact ages while the session looks connected.
            silent = state.role is Role.ACTIVE and deadlines.random() < 0.02
            world.session_deadline = now + 0.6 if silent else now + 2.0
        # Failsafe: while suspended, the peer answers an active node's asks (a grant renews the
        # lease, a refusal or silence lets it run out); now and then it granted one lately.
        if world.session is Session.SUSPENDED and state.role is Role.ACTIVE:
            answer = leases.random()
            if answer < 0.6:
                world.failsafe_held[PEER] = now + policy.failsafe_lease
            elif answer < 0.7:
                world.failsafe_held.pop(PEER, None)
        elif leases.random() < 0.05:
            world.failsafe_held.clear()
        if leases.random() < 0.02:
            world.failsafe_granted = {PEER: now + leases.choice((0.5, 3.0))}
        if state.step is Step.FENCE and deadlines.random() < 0.3:
            # The former active node's session ends while it is being fenced: if the fence
            # fails, its lease has yet to run out (the lease wait, and its RETRY).
            world.members.pop(PEER, None)
        # As the coordinator sees it: since when the peer has had no member znode.
        if PEER in world.members:
            world.absent_since = {}
        elif PEER not in world.absent_since:
            world.absent_since = {PEER: now - rng.choice((0.0, 0.0, 1.0, 3.0))}
        if state.role is Role.ACTIVE and rng.random() < 0.1:  # the operator asks it to hand over
            world.switchover = Switchover(NODE, rng.choice((None, PEER, OTHER)), wall)
        # This node's own record, as its agent publishes it.
        world.members[NODE] = Member(
            node=NODE,
            role=state.role,
            epoch=state.epoch,
            relay_running=world.relay_running,
            cooldown=now < state.cooldown_until,
            holds=holds_resources(state),
        )
        # The peer channel: the peer heard lately, long ago, or never (its own generator).
        if silence.random() < 0.1:
            age = silence.choice((None, 0.0, 0.5, 1.5, 4.0))
            world.heartbeat_ages = {} if age is None else {PEER: age}
        # Its pulse in ZooKeeper: advancing (a cut channel, or all well), stopped lately or long
        # ago, or no pulse znode at all (given only while connected, as the coordinator does).
        if pulses.random() < 0.1:
            pulse = pulses.choice((None, 0.0, 0.2, 0.5, 1.5, 4.0))
            world.pulse_ages = {} if pulse is None else {PEER: pulse}
        if world.session is not Session.CONNECTED:
            world.pulse_ages = {}
        result = None
        if state.step is not None and rng.random() < 0.5:
            result = run_executor(rng, state.step, world, wall, stale)
        snapshot = world.snapshot(wall, result)
        if rng.random() < 0.05:
            snapshot = arbitrary(rng, wall, result)
            ages = silence.choice(((), ((PEER, 2.0),), ((PEER, 0.2),)))
            pulse_ages = pulses.choice(((), ((PEER, 2.0),), ((PEER, 0.2),)))
            snapshot = replace(snapshot, heartbeat_ages=ages, pulse_ages=pulse_ages)
        decision = decide(state, snapshot, now, policy)
        try:
            check(history, state, snapshot, now, policy, decision)
        except AssertionError as error:
            raise AssertionError(
                f"seed {seed}: {state}\n{snapshot}\nnow={now}\n-> {decision}"
            ) from error
        state = decision.state
        if decision.actions:
            stale = decision.actions[0].stale_leader
    return history


SEEDS = (1, 2, 3, 4, 5, 6, 7, 8)
_WALKS: dict[int, History] = {}


def walked(seed: int) -> History:
    """The history of the walk for ``seed`` (each walk runs once per test session)."""
    if seed not in _WALKS:
        _WALKS[seed] = random_walk(seed, 4000)
    return _WALKS[seed]
