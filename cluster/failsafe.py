"""Failsafe: an active node serves through a ZooKeeper outage on its peers' leases (pure).

ZooKeeper is needed to *change* who is active, not to go on being active. When the active
node's session is suspended, it asks every peer over the peer channel (``cluster.peer_channel``),
every heartbeat, whether it too has lost ZooKeeper. A peer that has (``grant``) answers with a
lease: it will not take over before the lease ends, unless it fences the asker first. The asker
counts each lease from the moment it sent the ask (the peer started counting later, so the
asker's end comes first), and serves on past its own session's deadline only while every peer
holds it a lease (``failsafe_due``): it then demotes early enough that its relay has let go
before the first of them ends. A peer that can still reach ZooKeeper refuses (the asker may be
the one cut off, and it demotes as it would without failsafe); a peer that does not answer holds
no lease. A peer that regains ZooKeeper stops granting, and its promotion waits for the last
lease it granted to end, and ``lease_grace`` more, unless the FENCE step fenced the asker
(``cluster.takeover.lease_verdict``). docs/fencing.md has the whole safety argument.

Standard library only, like ``cluster.state``: the agent sends, receives and keeps the leases.
"""

from __future__ import annotations

from cluster.decision_data import AgentState, Policy, Role, Session, Snapshot
from cluster.takeover import holds_resources


def members(snapshot: Snapshot, policy: Policy) -> frozenset[str]:
    """Every other node whose lease the asker needs: the configured peers and every node that
    ever joined the cluster (one missing from ``[agent] peers`` cannot be asked, so it
    holds no lease, and no failsafe is possible: safety beats availability)."""
    return (policy.failsafe_peers | snapshot.cluster.known_nodes) - {policy.node}


def held_until(snapshot: Snapshot, policy: Policy) -> float | None:
    """Until when every peer holds this node a lease (the earliest end); None when failsafe is
    off, no peer is configured, or some peer holds none."""
    if not policy.failsafe or not policy.failsafe_peers:
        return None
    held = dict(snapshot.failsafe_held)
    needed = members(snapshot, policy)
    if not needed <= held.keys():
        return None
    return min(held[name] for name in needed)


def failsafe_due(snapshot: Snapshot, policy: Policy) -> float | None:
    """When a suspended active node serving on its peers' leases must begin its urgent
    demotion: its relay has stopped serving (urgent drain, and a margin) before the first lease
    ends. None: no lease covers it (see ``held_until``)."""
    until = held_until(snapshot, policy)
    if until is None or snapshot.cluster.session is not Session.SUSPENDED:
        return None
    return until - (policy.urgent_drain_timeout + policy.session_margin)


def serving_in_failsafe(snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """Whether an active node serves on its peers' leases right now."""
    due = failsafe_due(snapshot, policy)
    return due is not None and now < due


def cut_off(session: Session, confirmed_age: float | None, policy: Policy) -> bool:
    """Whether this node counts itself cut off from ZooKeeper, for asking and granting leases.

    Named rule (``silent_server``): kazoo says so, or the ensemble's leader has confirmed
    nothing of this node's for ``policy.zookeeper_patience`` (``confirmed_age``: since a sync
    was last answered). A server that went silent (a partition that drops packets, not one that
    resets connections) is noticed by kazoo only at its read timeout, two thirds of the
    session; an active node must demote a quarter of a second after that (its drain and margin
    before the session deadline), too late to ask for a lease, and its peer, cut off by the
    same partition, would still refuse as "connected". A stopped leader is the same to every
    node: its followers answer reads from memory until they elect another, seconds later, yet
    nothing can be committed meanwhile, neither the active node's heartbeat nor a takeover, so
    a peer whose reads are answered is cut off all the same (the CI's chaos run saw an active
    node demote on its peer's "connected" refusal). The agent dates the confirmation every
    tenth of the session, so one older than a quarter of it is no slow answer. None: nothing
    confirmed yet (a new session), nothing to go by but kazoo.
    """
    if session is not Session.CONNECTED:
        return True
    return confirmed_age is not None and confirmed_age > policy.zookeeper_patience


def leave_server(role: Role, session: Session, silence: float | None, policy: Policy) -> bool:
    """Whether the agent leaves the ZooKeeper server it is connected to for another one.

    Named rule (``unanswering_server``): kazoo says connected, yet the server has answered
    nothing on this connection for ``policy.zookeeper_patience`` (``silence``: since its last
    answer, or since the connection was made if later; None while not connected). kazoo pings
    only after half its read timeout without a request, and the agent's touches and reads are
    requests: so kazoo never notices a server that stopped answering (stopped, switched off,
    its packets dropped) until TCP gives up, minutes later. The Vagrant fleet saw a passive
    node keep such a server for 4.4 minutes while its peer lay dead. Leaving is what kazoo's
    own ping would have done: it reconnects to the next server in the same session, within the
    session's life (an active node must have a server again before ``demotion_due``). The
    agent's touches are syncs, answered within milliseconds while the ensemble has a leader,
    so an answer this late is a server (or its leader) in trouble; a follower whose leader
    stopped is left too, and it would drop its clients itself once it gives up on the leader.
    The cost of a wrong call is one reconnection, never the session.

    Never while promoting: a promotion gives up at the first suspension (``session_doomed``),
    so an answer only slow under load (a starved guest) would abort a takeover. A promotion on
    a silent server fails by its steps' time limits instead, and the node, passive again,
    leaves the server then.
    """
    return (
        role is not Role.PROMOTING
        and session is Session.CONNECTED
        and silence is not None
        and silence > policy.zookeeper_patience
    )


def should_ask(
    state: AgentState, session: Session, confirmed_age: float | None, policy: Policy
) -> bool:
    """Whether the agent asks its peers for leases at this heartbeat: active and cut off."""
    return state.role is Role.ACTIVE and cut_off(session, confirmed_age, policy)


def grant(
    state: AgentState, session: Session, confirmed_age: float | None, policy: Policy
) -> str | None:
    """Why this node refuses a peer's ask, or None when it grants ``policy.failsafe_lease``.

    It grants only while it is cut off from ZooKeeper too (``cut_off``: it cannot take over
    then anyway) and holds nothing itself; it refuses while connected: the asker may be the one
    cut off, and this node may take over once the asker's session has expired. A grant on a
    contact that was only slow costs no safety: the lease binds this node all the same
    (``cluster.takeover.lease_verdict``), it only delays a takeover by the lease.
    """
    if not policy.failsafe:
        return "failsafe is off here"
    if not cut_off(session, confirmed_age, policy):
        return "connected to ZooKeeper"
    if holds_resources(state):
        return f"it holds resources itself ({state.role.value})"
    return None
