"""Who may take over the active role, and what must be fenced before a node takes the spool.

The one rule of who may take over (``takeover_refusal``) is applied in three places, and all
three read it from here: by the operator's switchover command to its target, by the active node
before it hands over (``hand_over_refusal``: never demote into a cluster where nobody takes
over) and by a passive node to itself before it promotes (``cluster.state.classify``). What a
promotion must fence first (``fence_targets``), and when it may go on without a fence
(``lease_verdict``) or not at all (``replica_refusal``), is decided here too; ``holds_resources``
is what each node publishes about itself (``Member.holds``) for its peers' ``fence_targets``
and what arms its watchdog. Pure functions of ``cluster.decision_data``; standard library only.
"""

from __future__ import annotations

import math

from cluster.decision_data import (
    AgentState,
    ClusterView,
    Leader,
    Member,
    Policy,
    Role,
    Session,
    Snapshot,
    Step,
    Switchover,
    Takeover,
)


def holds_resources(state: AgentState) -> bool:
    """Whether a node in ``state`` may hold the spool, the virtual IP or a serving relay."""
    if state.role is Role.ACTIVE:
        return True
    if state.role is Role.PROMOTING:
        return state.epoch > 0  # leadership taken: the next steps take the rest
    if state.role is Role.DEMOTING:
        # A stray leadership's release (epoch 0) follows no promotion: it took nothing else.
        return state.epoch > 0 and not any(step is Step.STORAGE_DOWN for step, _ in state.steps)
    return False


def fence_targets(snapshot: Snapshot, policy: Policy) -> tuple[str, ...]:
    """The nodes to fence before taking the spool: every other node not known to hold nothing.

    A node holds nothing when its agent is connected (its ephemeral member znode exists) and
    says so (``Member.holds`` is false: passive, starting, failed, promoting before it took
    leadership, or demoting with everything but leadership released, as after a planned
    switchover: no need to shoot a node that stepped down cleanly). Any other node (gone, or
    holding by its own account) might still have the spool mounted or the virtual IP up. The
    former epoch holder is not enough: after a failed fence and a retry, the epoch record names
    this very node, while the peer that crashed still holds what it held.
    """
    cluster = snapshot.cluster
    candidates = set(cluster.known_nodes)
    if cluster.epoch_node:
        candidates.add(cluster.epoch_node)
    candidates.discard(policy.node)
    clean = {name for name, member in cluster.members.items() if not member.holds}
    return tuple(sorted(candidates - clean))


def lease_verdict(snapshot: Snapshot, now: float, policy: Policy) -> tuple[float | None, str]:
    """After a failed FENCE: when the promotion may go on without it, and why.

    Returns ``(now, why)`` to go on at once, ``(later, why)`` to wait until ``later``, or
    ``(None, why)`` to give up the promotion. A node may be passed over unfenced only when
    the policy allows it and its lease has provably expired: it has had no member znode (its
    ZooKeeper session ended on the server) for ``lease_grace``. A node still connected and
    holding by its own account is alive and unfenced: taking over would make two active nodes.
    """
    if policy.takeover is Takeover.FENCE_ONLY:
        return None, "takeover is fence-only"
    cluster = snapshot.cluster
    targets = fence_targets(snapshot, policy)
    alive = [name for name in targets if name in cluster.members]
    if alive:
        return None, f"{', '.join(alive)} still connected to ZooKeeper and holding"
    # A failsafe lease this node granted (cluster.failsafe): the node it granted it to may
    # serve until it ends, its session gone or not; it has let go ``lease_grace`` later.
    granted = max(snapshot.failsafe_granted, key=lambda item: item[1], default=None)
    granted_at = granted[1] + policy.lease_grace if granted is not None else -math.inf
    granted_why = ""
    if granted is not None and granted_at > now:
        granted_why = (
            f"; the failsafe lease granted to {granted[0]} ends in {granted[1] - now:.1f}s"
        )
    if not targets:
        if granted_at > now:
            return granted_at, f"waiting: nobody holds anything{granted_why}"
        return now, "no node holds anything any more"
    since = {name: cluster.absent_since.get(name, now) for name in targets}
    ready_at = max(max(since.values()) + policy.lease_grace, granted_at)
    expired = ", ".join(f"{name} {now - at:.1f}s ago" for name, at in sorted(since.items()))
    grace = f"grace {policy.lease_grace:g}s"
    if now >= ready_at:
        return now, f"leases expired ({expired}; {grace})"
    return ready_at, f"waiting for the leases to expire ({expired}; {grace}{granted_why})"


def heartbeat_age(snapshot: Snapshot, node: str) -> float | None:
    """Seconds since ``node``'s last authenticated heartbeat; None when never heard."""
    return dict(snapshot.heartbeat_ages).get(node)


def pulse_age(snapshot: Snapshot, node: str) -> float | None:
    """Seconds since ``node``'s pulse in ZooKeeper last advanced, as this node saw it while
    connected; None when it has no pulse znode (its session ended, or it never pulsed)."""
    return dict(snapshot.pulse_ages).get(node)


def pulsing(state: AgentState) -> bool:
    """Whether a node in ``state`` advances its pulse in ZooKeeper: whenever it may hold the
    leader znode (from ACQUIRE to RELEASE), so that its peer can tell a cut channel from a dead
    node before fencing it (``silent_leader``). A passive node's pulse would be read by nobody."""
    return state.role in (Role.PROMOTING, Role.ACTIVE, Role.DEMOTING)


def unheard_leader(snapshot: Snapshot, policy: Policy) -> Leader | None:
    """The other node's leader znode, when its heartbeats over the peer channel have stopped for
    ``peer_timeout``. A node never heard, or heard within ``peer_timeout``, is not unheard. None
    with ``fast_takeover`` off."""
    leader = snapshot.cluster.leader
    if not policy.fast_takeover or leader is None or leader.ours or leader.node == policy.node:
        return None
    age = heartbeat_age(snapshot, leader.node)
    return leader if age is not None and age >= policy.peer_timeout else None


def _pulse_fresh(snapshot: Snapshot, node: str, policy: Policy) -> bool:
    """``node``'s pulse advanced within ``peer_timeout``, seen over a connected session."""
    if snapshot.cluster.session is not Session.CONNECTED:
        return False
    age = pulse_age(snapshot, node)
    return age is not None and age < policy.peer_timeout


def silent_leader(snapshot: Snapshot, policy: Policy) -> Leader | None:
    """The other node's leader znode, when both its channels have gone quiet: its heartbeats
    over the peer channel for ``peer_timeout`` (``unheard_leader``) and its pulse in ZooKeeper
    for ``peer_timeout`` too, while this node's session is connected (the snapshot gives pulse
    ages only then).

    Its session may live on in ZooKeeper for the session timeout, and its znode with it; its
    silence alone proves nothing (a stalled machine): it is a reason to fence it, never to take
    over unfenced. A silence on the channel alone while the pulse advances is a cut channel, not
    a dead node (``alive_unheard_leader``): no fence. A leader without a pulse znode (its
    session just ended, or an agent that does not pulse) is judged on its heartbeats alone, as
    before the pulse. None with ``fast_takeover`` off.
    """
    leader = unheard_leader(snapshot, policy)
    if leader is None or _pulse_fresh(snapshot, leader.node, policy):
        return None
    return leader


def _pulsed_since_silence(snapshot: Snapshot, node: str, policy: Policy) -> bool:
    """``node``'s pulse advanced after its heartbeats had already been silent ``peer_timeout``:
    proof of life after the channel went quiet. A pulse that is merely fresh proves less: a node
    switched off pulses last a moment after its last heartbeat (one heartbeat interval, plus
    ZooKeeper's delivery), so for that moment its pulse is fresh while it is dead."""
    heard, pulse = heartbeat_age(snapshot, node), pulse_age(snapshot, node)
    return heard is not None and pulse is not None and pulse < heard - policy.peer_timeout


def alive_unheard_leader(snapshot: Snapshot, policy: Policy) -> Leader | None:
    """The leader whose heartbeats stopped while its pulse in ZooKeeper still advances (fresh,
    and advanced after the silence: ``_pulsed_since_silence``): the peer channel is cut (a
    firewall, a link), not the node. Never fenced for it; said once. Until such a pulse the
    leader is neither alive nor silent: the warning waits for it, the fence for
    ``silent_leader``."""
    leader = unheard_leader(snapshot, policy)
    if leader is None or not _pulse_fresh(snapshot, leader.node, policy):
        return None
    return leader if _pulsed_since_silence(snapshot, leader.node, policy) else None


def silence_due(snapshot: Snapshot, policy: Policy) -> float | None:
    """Seconds from ``snapshot`` until the leader is ``silent_leader``: its heartbeats and its
    pulse both ``peer_timeout`` old, so the agent looks again then (no wake-up comes with a
    silence, and a pulse's advance wakes nobody); None when nothing is awaited."""
    leader = snapshot.cluster.leader
    if not policy.fast_takeover or leader is None or leader.ours or leader.node == policy.node:
        return None
    age = heartbeat_age(snapshot, leader.node)
    if age is None:
        return None
    due = max(policy.peer_timeout - age, 0.0)
    pulse = pulse_age(snapshot, leader.node)
    return due if pulse is None else max(due, policy.peer_timeout - pulse)


def replica_refusal(node: str, cluster: ClusterView) -> str | None:
    """Why ``node``'s replica may not be served, or None: marked outdated by DRBD's fence-peer
    handler (it missed writes), or a split brain reported that waits for an operator."""
    if node in cluster.outdated:
        return "its replica is marked outdated (it missed writes)"
    if cluster.split_brain is not None:
        return f"a split brain is reported ({cluster.split_brain})"
    return None


def takeover_refusal(
    member: Member, cluster: ClusterView, wall: float, stale_after: float = math.inf
) -> str | None:
    """Why ``member`` may not take over the active role, or None when it may.

    The one rule, applied by the operator's switchover command to its target, by the active
    node before it hands over (never demote into a cluster where nobody takes over) and by a
    passive node to itself before it promotes. A node takes over only when it is passive, its
    warm relay runs, it is not cooling down after giving up, its replica is not marked outdated
    (it missed writes) and no split brain waits for an operator: stale or diverged mail is
    never served. ``stale_after``: how old (by ``wall``) its heartbeat may be; the operator
    checks it, the agents do not (a live member znode already says its session lives, and a
    peer's wall clock may run ahead or behind).
    """
    reasons = []
    if member.role is not Role.PASSIVE:
        reasons.append(f"it is {member.role.value}")
    if not member.relay_running:
        reasons.append("its relay is not running")
    if member.cooldown:
        reasons.append("it is cooling down after a failure")
    data = replica_refusal(member.node, cluster)
    if data is not None:
        reasons.append(data)
    age = wall - member.heartbeat
    if age > stale_after:
        reasons.append(f"its last heartbeat is {age:.0f}s old")
    return ", ".join(reasons) or None


def hand_over_refusal(request: Switchover, snapshot: Snapshot) -> str | None:
    """Why the active node may not hand over as asked, or None: never demote into a cluster
    where nobody takes over (``takeover_refusal``)."""
    cluster = snapshot.cluster
    if request.target == request.source:
        return f"{request.source} cannot hand over to itself"
    if request.target is not None:
        member = cluster.members.get(request.target)
        if member is None:
            return f"{request.target} is not connected"
        why = takeover_refusal(member, cluster, snapshot.wall)
        return None if why is None else f"{request.target} cannot take over: {why}"
    others = sorted(name for name in cluster.members if name != request.source)
    refusals = [
        (name, takeover_refusal(cluster.members[name], cluster, snapshot.wall)) for name in others
    ]
    if any(why is None for _, why in refusals):
        return None
    details = "; ".join(f"{name}: {why}" for name, why in refusals)
    return f"no other node can take over ({details or 'none is connected'})"
