"""The agent's decisions: one pure function over immutable snapshots, and its transition table.

Why it is shaped this way
-------------------------
A failover manager earns trust by being predictable. Every decision the agent takes is made here,
by ``decide(state, snapshot, now, policy)``: a pure function of what the agent was doing
(``AgentState``), what it sees (``Snapshot``: the ZooKeeper session, the leader znode, the epoch,
the members, the pause flag, a switchover request, the local relay, the outcome of the last step),
and the monotonic time. It returns the next state and the actions to run. It does no I/O, reads no
clock and imports no kazoo, pyroute2, asyncio or subprocess, so that every transition is tested
with plain data and no patching, and so that the JSON line logged for each decision is the whole
story of why the node did what it did.

The snapshot is first reduced to one ``Trigger`` (``classify``), in a fixed order of priority:
safety first (a lost session or lost leadership beats everything a node holding resources
does), then the outcome of the step that just ended, then health, then opportunity (a vacant
leadership). A few named special rules (``refine``, written beside the table, as h11 writes the
rules that do not fit its table outside it) then tell apart what the role alone cannot: the last
step of a promotion or a demotion, a promotion that ends at ACQUIRE, a failed fence that the
lease rule refuses to pass, the last relay start allowed, a relay that died once too often. The
pair (role, trigger) is then looked up in ``TRANSITIONS``, the one table of the state machine,
and the table is the whole truth: the role after a decision is always its row's ``to`` (no
effect chooses one), and the trigger logged is the one looked up. A pair missing from the table
means "nothing to do": the node waits for the next snapshot, which comes with every ZooKeeper
watch, every step that ends and every heartbeat tick.

Long actions are states, not calls. Promotion is the sequence ``PROMOTION`` (take leadership and
a new epoch, fence the former active node, promote storage, write the epoch onto the spool, add
the virtual IP, activate the relay, probe it over SMTP, publish), demotion the sequence
``DEMOTION`` (drain the relay, drop the virtual IP, release storage, give up leadership). The
executor runs one step at a time in the background and reports its outcome in a later snapshot;
meanwhile the agent goes on heartbeating and observing, and a safety trigger still takes effect
when the running step ends (each step has a time limit, enforced by the executor). A failed
promotion step rolls back through the whole demotion, whose steps are idempotent: releasing what
is not held is a no-op.

Safety rules encoded here (the fencing issue adds the layers below the agent):
- A node promotes only while its ZooKeeper session is connected and it holds the leader znode,
  created in the same transaction that incremented the epoch: every term has a unique number.
- A node that holds or is taking resources demotes as soon as its session is suspended, not when
  it expires: kazoo notices a silent server after two thirds of the session timeout, and the
  peer may take over once the session has expired, so the remaining third is all there is.
- Leadership is given up last, after the spool is released, so the peer cannot mount it early.
- A node whose replica DRBD's fence-peer handler marked outdated never takes over (not even by
  switchover) until a resync clears the mark, and nobody takes over while a split brain that
  DRBD reported waits for an operator: stale or diverged mail is never served.
- Pause stops automatic failover (no promotion, no giving up for relay health) but not
  self-fencing: a node that loses its session still demotes, because safety beats availability.
- A promotion goes past FENCE only when every node that may still hold something was fenced,
  or (``Takeover.FENCE_OR_LEASE``, the default) when each such node's session has ended on the
  server and ``lease_grace`` has passed since this agent saw it end (``lease_verdict``). A node
  still connected and holding is never passed over. The wait is a state, not a sleep: the
  promotion holds leadership, and a lost session still rolls it back.
- Below the agent, a newer term's epoch on the spool stops a zombie relay (``hamta.epoch_token``)
  and a watchdog fed by the agent stops the relay and drops the virtual IP when the agent hangs
  (``fencing.watchdog``). docs/fencing.md puts the layers together.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final, NamedTuple

# ------------------------------------------------------------------ what the agent sees


class Role(enum.StrEnum):
    """What a node is doing in the pair."""

    STARTING = "starting"  # starting its warm relay
    PASSIVE = "passive"  # ready to take over; holds nothing
    PROMOTING = "promoting"  # running the promotion steps
    ACTIVE = "active"  # holds leadership, spool, virtual IP and the serving relay
    DEMOTING = "demoting"  # running the demotion steps
    FAILED = "failed"  # its relay cannot start; never eligible, retries by itself


class Session(enum.StrEnum):
    """The agent's ZooKeeper session, as kazoo reports it."""

    CONNECTED = "connected"
    SUSPENDED = "suspended"  # connection lost; the session may still be alive on the server
    LOST = "lost"  # expired or closed: ephemeral znodes are gone


class Step(enum.StrEnum):
    """One long action; the executor runs it with a time limit and reports its outcome."""

    ACQUIRE = "acquire"
    FENCE = "fence"
    STORAGE = "storage"
    EPOCH = "epoch"
    VIP = "vip"
    RELAY = "relay"
    PROBE = "probe"
    PUBLISH = "publish"
    DRAIN = "drain"
    VIP_DOWN = "vip_down"
    STORAGE_DOWN = "storage_down"
    RELEASE = "release"
    START_RELAY = "start_relay"
    RESTART_RELAY = "restart_relay"


PROMOTION: Final = (
    Step.ACQUIRE,
    Step.FENCE,
    Step.STORAGE,
    Step.EPOCH,
    Step.VIP,
    Step.RELAY,
    Step.PROBE,
    Step.PUBLISH,
)
DEMOTION: Final = (Step.DRAIN, Step.VIP_DOWN, Step.STORAGE_DOWN, Step.RELEASE)


@dataclass(frozen=True, slots=True)
class Member:
    """A node's heartbeat, as published in its ephemeral member znode."""

    node: str
    role: Role
    epoch: int = 0
    relay_running: bool = False
    relay_ready: bool = False
    queue_depth: int = 0
    heartbeat: float = 0.0  # wall clock of the publisher
    smtp: str = ""  # where its relay listens when active
    cooldown: bool = False  # it gave up lately and will not take over for a while
    holds: bool = False  # may hold the spool, the virtual IP or a serving relay right now


@dataclass(frozen=True, slots=True)
class Leader:
    """The ephemeral leader znode: who leads, in which term, and whether it is this session's."""

    node: str
    epoch: int
    since: float  # wall clock of the takeover
    ours: bool = False  # owned by this agent's ZooKeeper session


@dataclass(frozen=True, slots=True)
class Pause:
    """Maintenance mode: no automatic failover while it is set."""

    by: str
    at: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Switchover:
    """An operator's request to move the active role (``target`` None: any healthy peer)."""

    source: str
    target: str | None
    at: float  # wall clock of the request


@dataclass(frozen=True, slots=True)
class ClusterView:
    """What ZooKeeper says, read in one go by the coordinator."""

    session: Session
    leader: Leader | None = None
    epoch: int = 0  # the cluster's current (highest) epoch
    epoch_node: str | None = None  # who took that epoch: the former active node after a loss
    members: Mapping[str, Member] = field(default_factory=dict)
    paused: Pause | None = None
    switchover: Switchover | None = None
    last_failover: float | None = None  # wall clock of the last takeover
    known_nodes: frozenset[str] = frozenset()  # every node that ever joined (persistent)
    # Monotonic time (this agent's clock) since which each other known node has had no member
    # znode, i.e. its ZooKeeper session had ended on the server: the lease it held has expired.
    absent_since: Mapping[str, float] = field(default_factory=dict)
    # DRBD resource-level fencing: nodes whose replica missed writes (not to be promoted until
    # resynced), and a split brain DRBD reported (no automatic failover until it is resolved).
    outdated: frozenset[str] = frozenset()
    split_brain: str | None = None


@dataclass(frozen=True, slots=True)
class LocalView:
    """The local relay, as the executor's health checks see it."""

    relay_running: bool = False  # the process answers on its control socket
    relay_ready: bool = False  # listening with a writable spool
    relay_failures: int = 0  # consecutive failed readiness checks while active
    queue_depth: int = 0
    stopping: bool = False  # the agent was asked to stop (SIGTERM): hand over, then exit


@dataclass(frozen=True, slots=True)
class StepResult:
    """The outcome of the step the executor ran last."""

    step: Step
    ok: bool
    seconds: float
    detail: str = ""
    epoch: int = 0  # ACQUIRE: the epoch of the new term


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one decision looks at."""

    cluster: ClusterView
    local: LocalView
    wall: float  # wall clock, for ages of records written by other nodes
    result: StepResult | None = None


class Takeover(enum.StrEnum):
    """When a promotion may go on after FENCE (``[fencing] takeover``)."""

    # Only when a fence agent fenced every node that may still hold something.
    FENCE_ONLY = "fence-only"
    # Or, when fencing failed (or none is configured), once every such node's ZooKeeper session
    # has ended on the server and a grace period has passed: the node demoted itself by then,
    # unless it is frozen, and a frozen relay is stopped by the epoch token on the spool.
    FENCE_OR_LEASE = "fence-or-lease"


@dataclass(frozen=True, slots=True)
class Policy:
    """The agent's tunables (from its configuration)."""

    node: str
    relay_failure_limit: int = 3  # failed readiness checks in a row before giving up
    relay_restart_limit: int = 2  # in-place relay restarts while active before giving up ...
    relay_restart_window: float = 300.0  # ... within this long of the previous one
    relay_start_limit: int = 3  # failed warm starts in a row before FAILED
    retry_interval: float = 5.0  # before a failed start or demotion step is tried again
    min_failover_interval: float = 5.0  # between two automatic takeovers in the cluster
    cooldown: float = 30.0  # a node that gave up takes no leadership for this long
    switchover_timeout: float = 30.0  # a request older than this is ignored
    drain_timeout: float = 10.0  # in-flight deliveries get this long on demotion
    # ... unless another node may be taking over right now (session or leadership lost): then
    # the relay must let go of the spool at once; what it was delivering stays queued.
    urgent_drain_timeout: float = 0.5
    takeover: Takeover = Takeover.FENCE_OR_LEASE
    lease_grace: float = 2.0  # after a node's session ended, before its lease counts as expired
    step_timeouts: Mapping[Step, float] = field(default_factory=dict)

    def timeout(self, step: Step) -> float:
        """The time limit of ``step``."""
        return self.step_timeouts.get(step, DEFAULT_STEP_TIMEOUTS[step])

    def drain_time(self, reason: str) -> float:
        """The DRAIN time limit of a demotion begun for ``reason`` (a trigger's value)."""
        urgent = reason in (Trigger.SESSION_LOST.value, Trigger.LEADERSHIP_LOST.value)
        return self.urgent_drain_timeout if urgent else self.drain_timeout


DEFAULT_STEP_TIMEOUTS: Final[Mapping[Step, float]] = {
    Step.ACQUIRE: 5.0,
    Step.FENCE: 30.0,
    Step.STORAGE: 60.0,
    Step.EPOCH: 5.0,
    Step.VIP: 5.0,
    Step.RELAY: 60.0,
    Step.PROBE: 10.0,
    Step.PUBLISH: 5.0,
    Step.DRAIN: 30.0,
    Step.VIP_DOWN: 5.0,
    Step.STORAGE_DOWN: 30.0,
    Step.RELEASE: 5.0,
    Step.START_RELAY: 30.0,
    Step.RESTART_RELAY: 60.0,
}

# ------------------------------------------------------------------ what the agent does


@dataclass(frozen=True, slots=True)
class Action:
    """A step for the executor to run, with its time limit and the term it belongs to."""

    step: Step
    timeout: float
    epoch: int = 0
    peer: str | None = None  # FENCE, PUBLISH: the former active node (for the record)
    fence: tuple[str, ...] = ()  # FENCE: every node that may still hold something
    reason: str = ""
    steps: tuple[tuple[Step, float], ...] = ()  # PUBLISH: the promotion's timings, for history

    # How a step's time limit is shared among its parts is decided here, not by the executor.

    @property
    def fence_timeout(self) -> float:
        """FENCE: the time limit of each node's fence chain. Most of the step's time, so that
        the chain reports which agent failed (and kills what hangs) before the step's own limit
        cuts it off without a word."""
        return self.timeout * 0.9 / max(len(self.fence), 1)

    @property
    def graceful_timeout(self) -> float:
        """DRAIN: the relay's graceful deactivation; whatever is left is for killing it."""
        return self.timeout * 0.8

    @property
    def deliveries_timeout(self) -> float:
        """DRAIN: the relay's own budget for the deliveries under way, within its graceful stop."""
        return self.graceful_timeout * 0.75


@dataclass(frozen=True, slots=True)
class AgentState:
    """What the agent is doing: its role and the step in flight, with its bookkeeping."""

    role: Role = Role.STARTING
    epoch: int = 0  # the term this node leads (promoting or active)
    step: Step | None = None  # the step in flight, if any
    started: float = 0.0  # when the current promotion or demotion began (monotonic)
    steps: tuple[tuple[Step, float], ...] = ()  # its steps so far, with their durations
    reason: str = ""  # why the current promotion or demotion began
    previous: str | None = None  # the former active node (promotion) for FENCE and history
    give_up: bool = False  # the current demotion ends with a cooldown
    cooldown_until: float = 0.0
    attempts: int = 0  # failures in a row of the retried step (start, restart, demotion)
    retry_at: float = 0.0
    retry_step: Step | None = None  # DEMOTING: the failed step to run again at ``retry_at``
    # PROMOTING with ``retry_step`` FENCE: fencing failed and the promotion waits, since this
    # time, for the leases of the nodes it could not fence to expire.
    waiting_since: float = 0.0
    restarted_at: float = 0.0  # ACTIVE: the last in-place relay restart (``attempts`` counts them)


@dataclass(frozen=True, slots=True)
class Decision:
    """The result of one decision: the next state, the actions to run, and why."""

    state: AgentState
    actions: tuple[Action, ...]
    trigger: Trigger
    note: str

    @property
    def changed(self) -> bool:
        """Worth a log line: something was started or the role moved."""
        return bool(self.actions) or self.note != ""


# ------------------------------------------------------------------ triggers


class Trigger(enum.StrEnum):
    """One thing that happened, chosen from a snapshot by ``classify``."""

    WAITING = "waiting"  # a step is in flight
    SESSION_LOST = "session_lost"  # suspended or lost while holding or taking resources
    LEADERSHIP_LOST = "leadership_lost"  # the leader znode is no longer this node's
    STEP_DONE = "step_done"
    STEP_FAILED = "step_failed"
    PROMOTED = "promoted"  # the promotion's last step is done
    DEMOTED = "demoted"  # the demotion's last step is done
    LEADERSHIP_NOT_TAKEN = "leadership_not_taken"  # a promotion ends at ACQUIRE (``refine``)
    RELAY_START_EXHAUSTED = "relay_start_exhausted"  # the last start allowed failed (``refine``)
    RELAY_DOWN = "relay_down"  # the relay process does not answer
    RELAY_WARM = "relay_warm"  # the relay process answers (starting, failed)
    RELAY_UNHEALTHY = "relay_unhealthy"  # active, but not ready N checks in a row
    SWITCHOVER = "switchover"  # an operator asked this active node to hand over
    SWITCHOVER_REFUSED = "switchover_refused"  # ... to a node that may not take over
    LEADER_VACANT = "leader_vacant"  # no leader, and this node may take over
    LEADER_STRAY = "leader_stray"  # this session holds the leader znode but is not promoting
    RETRY = "retry"  # a failed step may be tried again (or a lease wait is over)
    FENCE_FAILED = "fence_failed"  # no fence agent fenced a node that may hold something
    LEASE_REFUSED = "lease_refused"  # ... and ``lease_verdict`` forbids going on (``refine``)
    REPLICA_REFUSED = "replica_refused"  # the spool is next, but this replica is not to be served
    STOP = "stop"  # the agent is stopping: hand over first
    NOTHING = "nothing"


def _holds_leadership(snapshot: Snapshot) -> bool:
    leader = snapshot.cluster.leader
    return leader is not None and leader.ours


def _switchover_pending(snapshot: Snapshot, policy: Policy) -> Switchover | None:
    request = snapshot.cluster.switchover
    if request is None or snapshot.wall - request.at > policy.switchover_timeout:
        return None
    return request


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
    if not targets:
        return now, "no node holds anything any more"
    since = {name: cluster.absent_since.get(name, now) for name in targets}
    ready_at = max(since.values()) + policy.lease_grace
    expired = ", ".join(f"{name} {now - at:.1f}s ago" for name, at in sorted(since.items()))
    if now >= ready_at:
        return now, f"leases expired ({expired}; grace {policy.lease_grace:g}s)"
    return ready_at, f"waiting for the leases to expire ({expired}; grace {policy.lease_grace:g}s)"


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


def _may_take_over(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    cluster = snapshot.cluster
    if cluster.session is not Session.CONNECTED or cluster.leader is not None:
        return False
    if snapshot.local.stopping:
        return False
    itself = Member(
        policy.node,
        state.role,
        relay_running=snapshot.local.relay_running,
        cooldown=now < state.cooldown_until,
    )
    if takeover_refusal(itself, cluster, snapshot.wall) is not None:
        return False
    request = _switchover_pending(snapshot, policy)
    if request is not None:
        # A planned handover goes to its target only, and never back to the node that left.
        return request.target in (None, policy.node) and request.source != policy.node
    if cluster.paused is not None:
        return False
    last = cluster.last_failover
    return last is None or snapshot.wall - last >= policy.min_failover_interval


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


def classify(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> Trigger:
    """Reduce a snapshot to the one trigger that matters most for this role."""
    role = state.role
    cluster = snapshot.cluster
    local = snapshot.local
    result = snapshot.result
    # A promotion holds the leader znode from the moment ACQUIRE succeeds: the step after it
    # (FENCE) must not run on a session or a znode that is already gone.
    acquired = result is not None and result.step is Step.ACQUIRE and result.ok
    holding = role is Role.ACTIVE or (role is Role.PROMOTING and (state.steps != () or acquired))
    # Safety preempts a step in flight (a restart, a mount): the executor abandons it, and the
    # relay must stop serving before the peer may take over.
    if holding and cluster.session is not Session.CONNECTED:
        return Trigger.SESSION_LOST
    if holding and not _holds_leadership(snapshot):
        return Trigger.LEADERSHIP_LOST
    # A graceful drain (switchover, stop, giving up) is cut short the same way: the peer may
    # take over once the session expires, and the relay still holds the spool.
    draining = role is Role.DEMOTING and state.step is Step.DRAIN and result is None
    graceful = policy.drain_time(state.reason) > policy.urgent_drain_timeout
    if draining and graceful and cluster.session is not Session.CONNECTED:
        return Trigger.SESSION_LOST
    if result is None and state.step is not None:
        return Trigger.WAITING
    if local.stopping and role in (Role.ACTIVE, Role.PROMOTING):
        return Trigger.STOP
    if result is not None:
        if result.step is Step.FENCE and not result.ok:
            return Trigger.FENCE_FAILED
        return Trigger.STEP_DONE if result.ok else Trigger.STEP_FAILED
    if role is Role.PROMOTING and state.retry_step is Step.FENCE:
        return Trigger.RETRY if now >= state.retry_at else Trigger.NOTHING
    if role in (Role.STARTING, Role.FAILED):
        if local.relay_running:
            return Trigger.RELAY_WARM
        due = now >= state.retry_at and not local.stopping
        return Trigger.RELAY_DOWN if due else Trigger.NOTHING
    if role is Role.DEMOTING:
        # Giving up leadership cannot wait out the retry interval once ZooKeeper is back.
        back = state.retry_step is Step.RELEASE and cluster.session is Session.CONNECTED
        return Trigger.RETRY if now >= state.retry_at or back else Trigger.NOTHING
    if role is Role.ACTIVE:
        if not local.relay_running:
            return Trigger.RELAY_DOWN
        if local.relay_failures >= policy.relay_failure_limit and cluster.paused is None:
            return Trigger.RELAY_UNHEALTHY
        request = _switchover_pending(snapshot, policy)
        if request is not None and request.source == policy.node:
            refused = hand_over_refusal(request, snapshot) is not None
            return Trigger.SWITCHOVER_REFUSED if refused else Trigger.SWITCHOVER
        return Trigger.NOTHING
    if role is Role.PASSIVE:
        if not local.relay_running and now >= state.retry_at and not local.stopping:
            return Trigger.RELAY_DOWN
        if _holds_leadership(snapshot):
            return Trigger.LEADER_STRAY
        if _may_take_over(state, snapshot, now, policy):
            return Trigger.LEADER_VACANT
    return Trigger.NOTHING


# ------------------------------------------------------------------ the special rules


# Triggers that end a promotion: at ACQUIRE they leave nothing to roll back.
_PROMOTION_ENDERS: Final = frozenset(
    {Trigger.STEP_FAILED, Trigger.STOP, Trigger.SESSION_LOST, Trigger.LEADERSHIP_LOST}
)


def _recent_restarts(state: AgentState, now: float, policy: Policy) -> int:
    """In-place relay restarts so far, counted within a window, not reset by a restart that
    worked: a relay that dies a minute after every restart still makes the node give up."""
    recent = now - state.restarted_at <= policy.relay_restart_window
    return state.attempts if recent else 0


def _restarts_exhausted(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """The active relay died once more than ``relay_restart_limit`` allows (never while paused)."""
    restarts = _recent_restarts(state, now, policy)
    return restarts >= policy.relay_restart_limit and snapshot.cluster.paused is None


def refine(
    trigger: Trigger, state: AgentState, snapshot: Snapshot, now: float, policy: Policy
) -> Trigger:
    """The few moves that depend on more than (role, trigger), named here beside the table.

    ``classify`` says what happened; these rules say which row it leads to when the role alone
    cannot tell, so that every row of ``TRANSITIONS`` is true: the role after a decision is
    always its row's ``to``, and the trigger logged is the one looked up.
    """
    role, result = state.role, snapshot.result
    if role is Role.PROMOTING and trigger in _PROMOTION_REFINABLE:
        return _refine_promotion(trigger, result, snapshot, now, policy)
    done = result.step if result is not None and trigger is Trigger.STEP_DONE else None
    if role is Role.DEMOTING and done is DEMOTION[-1]:
        return Trigger.DEMOTED
    # The start that fails for the ``relay_start_limit``-th time in a row: FAILED.
    starting = role in (Role.STARTING, Role.PASSIVE) and trigger is Trigger.STEP_FAILED
    if starting and state.attempts + 1 >= policy.relay_start_limit:
        return Trigger.RELAY_START_EXHAUSTED
    # The relay died again after its restarts: giving up, as when it stays unready.
    died = role is Role.ACTIVE and trigger is Trigger.RELAY_DOWN
    if died and _restarts_exhausted(state, snapshot, now, policy):
        return Trigger.RELAY_UNHEALTHY
    return trigger


_PROMOTION_REFINABLE: Final = _PROMOTION_ENDERS | {
    Trigger.STEP_DONE,
    Trigger.FENCE_FAILED,
    Trigger.RETRY,
}


def _refine_promotion(
    trigger: Trigger, result: StepResult | None, snapshot: Snapshot, now: float, policy: Policy
) -> Trigger:
    """``refine`` for a promoting node."""
    # A promotion that ends at ACQUIRE (lost the race, or lost the session or the znode, or
    # was stopped, right after winning it) took nothing else: back to passive, no demotion.
    if result is not None and result.step is Step.ACQUIRE and trigger in _PROMOTION_ENDERS:
        return Trigger.LEADERSHIP_NOT_TAKEN
    # Not fenced, and the lease rule forbids going on: the promotion is abandoned.
    unfenced = trigger in (Trigger.FENCE_FAILED, Trigger.RETRY)
    verdict = lease_verdict(snapshot, now, policy)[0] if unfenced else None
    if unfenced and verdict is None:
        return Trigger.LEASE_REFUSED
    done = result.step if result is not None and trigger is Trigger.STEP_DONE else None
    # The spool is next (fenced, or the leases expired), but DRBD marked this replica outdated
    # or reported a split brain since the decision to take over. This snapshot was read after
    # ACQUIRE, and only the leader marks a replica outdated: no mark can come later.
    fenced = done is Step.FENCE or (verdict is not None and verdict <= now)
    if fenced and replica_refusal(policy.node, snapshot.cluster) is not None:
        return Trigger.REPLICA_REFUSED
    if done is PROMOTION[-1]:
        return Trigger.PROMOTED
    return trigger


# ------------------------------------------------------------------ the table


class Then(enum.Enum):
    """What a transition does besides changing the role."""

    NOTHING = "nothing"
    BEGIN_PROMOTION = "begin promotion"
    NEXT_PROMOTION_STEP = "next promotion step"
    BEGIN_DEMOTION = "begin demotion"  # graceful: drain first
    BEGIN_GIVING_UP = "begin giving up"  # demotion ending in a cooldown
    NEXT_DEMOTION_STEP = "next demotion step"
    ROLL_BACK = "roll back"  # a promotion step failed: demote, then cool down
    CHECK_LEASES = "check leases"  # not fenced: go on, wait, or roll back (``Takeover``)
    RETRY_DEMOTION_STEP = "retry demotion step"
    CUT_DRAIN_SHORT = "cut drain short"  # a graceful drain becomes an urgent one
    REFUSE_SWITCHOVER = "refuse switchover"  # stay active, and say why
    FINISH_PROMOTION = "finish promotion"
    FINISH_DEMOTION = "finish demotion"
    FORGET_PROMOTION = "forget promotion"  # it ended at ACQUIRE: nothing else was taken
    ABANDON_UNFENCED = "abandon unfenced"  # not fenced, and no lease to go on: roll back
    ABANDON_REPLICA = "abandon replica"  # the replica is not to be served: roll back
    RELEASE_ONLY = "release only"
    START_RELAY = "start relay"
    RESTART_RELAY = "restart relay"
    RELAY_STARTED = "relay started"
    RELAY_START_FAILED = "relay start failed"


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of the table: the role to move to and what to do on the way."""

    to: Role
    then: Then = Then.NOTHING


_P, _A, _D, _F = Role.PROMOTING, Role.ACTIVE, Role.DEMOTING, Role.FAILED

TRANSITIONS: Final[Mapping[tuple[Role, Trigger], Transition]] = {
    # starting: bring the warm relay up, then wait as passive
    (Role.STARTING, Trigger.RELAY_DOWN): Transition(Role.STARTING, Then.START_RELAY),
    (Role.STARTING, Trigger.RELAY_WARM): Transition(Role.PASSIVE, Then.RELAY_STARTED),
    (Role.STARTING, Trigger.STEP_DONE): Transition(Role.PASSIVE, Then.RELAY_STARTED),
    (Role.STARTING, Trigger.STEP_FAILED): Transition(Role.STARTING, Then.RELAY_START_FAILED),
    (Role.STARTING, Trigger.RELAY_START_EXHAUSTED): Transition(_F, Then.RELAY_START_FAILED),
    # passive: keep the warm relay up, take over a vacant leadership
    (Role.PASSIVE, Trigger.RELAY_DOWN): Transition(Role.PASSIVE, Then.START_RELAY),
    (Role.PASSIVE, Trigger.STEP_DONE): Transition(Role.PASSIVE, Then.RELAY_STARTED),
    (Role.PASSIVE, Trigger.STEP_FAILED): Transition(Role.PASSIVE, Then.RELAY_START_FAILED),
    (Role.PASSIVE, Trigger.RELAY_START_EXHAUSTED): Transition(_F, Then.RELAY_START_FAILED),
    (Role.PASSIVE, Trigger.LEADER_VACANT): Transition(_P, Then.BEGIN_PROMOTION),
    (Role.PASSIVE, Trigger.LEADER_STRAY): Transition(_D, Then.RELEASE_ONLY),
    # promoting: one step after another; any failure or loss rolls everything back
    (_P, Trigger.STEP_DONE): Transition(_P, Then.NEXT_PROMOTION_STEP),
    (_P, Trigger.PROMOTED): Transition(_A, Then.FINISH_PROMOTION),
    (_P, Trigger.STEP_FAILED): Transition(_D, Then.ROLL_BACK),
    (_P, Trigger.LEADERSHIP_NOT_TAKEN): Transition(Role.PASSIVE, Then.FORGET_PROMOTION),
    (_P, Trigger.FENCE_FAILED): Transition(_P, Then.CHECK_LEASES),  # go on, or wait
    (_P, Trigger.RETRY): Transition(_P, Then.CHECK_LEASES),
    (_P, Trigger.LEASE_REFUSED): Transition(_D, Then.ABANDON_UNFENCED),
    (_P, Trigger.REPLICA_REFUSED): Transition(_D, Then.ABANDON_REPLICA),
    (_P, Trigger.SESSION_LOST): Transition(_D, Then.ROLL_BACK),
    (_P, Trigger.LEADERSHIP_LOST): Transition(_D, Then.ROLL_BACK),
    (_P, Trigger.STOP): Transition(_D, Then.ROLL_BACK),
    # active: restart a dead relay in place; hand over on request; give up when it stays sick
    (_A, Trigger.SESSION_LOST): Transition(_D, Then.BEGIN_DEMOTION),
    (_A, Trigger.LEADERSHIP_LOST): Transition(_D, Then.BEGIN_DEMOTION),
    (_A, Trigger.SWITCHOVER): Transition(_D, Then.BEGIN_DEMOTION),
    (_A, Trigger.SWITCHOVER_REFUSED): Transition(_A, Then.REFUSE_SWITCHOVER),
    (_A, Trigger.STOP): Transition(_D, Then.BEGIN_DEMOTION),
    (_A, Trigger.RELAY_UNHEALTHY): Transition(_D, Then.BEGIN_GIVING_UP),
    (_A, Trigger.RELAY_DOWN): Transition(_A, Then.RESTART_RELAY),
    (_A, Trigger.STEP_DONE): Transition(_A, Then.RELAY_STARTED),
    (_A, Trigger.STEP_FAILED): Transition(_A, Then.RELAY_START_FAILED),
    # demoting: every step in turn; a failed one is retried, never skipped
    (_D, Trigger.STEP_DONE): Transition(_D, Then.NEXT_DEMOTION_STEP),
    (_D, Trigger.DEMOTED): Transition(Role.PASSIVE, Then.FINISH_DEMOTION),
    (_D, Trigger.STEP_FAILED): Transition(_D, Then.RETRY_DEMOTION_STEP),
    (_D, Trigger.RETRY): Transition(_D, Then.RETRY_DEMOTION_STEP),
    (_D, Trigger.SESSION_LOST): Transition(_D, Then.CUT_DRAIN_SHORT),
    # failed: the relay would not start; it is tried again now and then
    (Role.FAILED, Trigger.RELAY_DOWN): Transition(Role.FAILED, Then.START_RELAY),
    (Role.FAILED, Trigger.RELAY_WARM): Transition(Role.PASSIVE, Then.RELAY_STARTED),
    (Role.FAILED, Trigger.STEP_DONE): Transition(Role.PASSIVE, Then.RELAY_STARTED),
    (Role.FAILED, Trigger.STEP_FAILED): Transition(Role.FAILED, Then.RELAY_START_FAILED),
}


# ------------------------------------------------------------------ decide


class _Context(NamedTuple):
    """One decision's inputs, so that the transition effects stay short."""

    state: AgentState
    snapshot: Snapshot
    now: float
    policy: Policy
    trigger: Trigger  # the one looked up in the table (after ``refine``)
    cause: Trigger  # what ``classify`` saw, for the notes (a lost session, a stop, ...)

    def run(self, step: Step, **fields: object) -> Action:
        # A retried DRAIN gets the drain time the first one had.
        drain = step is Step.DRAIN
        reason = self.state.reason
        timeout = self.policy.drain_time(reason) if drain else self.policy.timeout(step)
        return Action(step, timeout, epoch=self.state.epoch, **fields)  # type: ignore[arg-type]

    def timed_steps(self) -> tuple[tuple[Step, float], ...]:
        result = self.snapshot.result
        if result is None:
            return self.state.steps
        return (*self.state.steps, (result.step, round(result.seconds, 4)))


Effect = tuple[AgentState, tuple[Action, ...], str]


def _begin_demotion(ctx: _Context, *, give_up: bool, note: str) -> Effect:
    state = replace(
        ctx.state,
        step=Step.DRAIN,
        started=ctx.now,
        steps=(),
        reason=ctx.trigger.value,
        give_up=give_up,
        attempts=0,
    )
    timeout = ctx.policy.drain_time(state.reason)
    return state, (Action(Step.DRAIN, timeout, epoch=ctx.state.epoch, reason=note),), note


def _effect(transition: Transition, ctx: _Context) -> Effect:
    state, policy, now = ctx.state, ctx.policy, ctx.now
    result = ctx.snapshot.result
    match transition.then:
        case Then.NOTHING:
            return replace(state, step=None), (), ""
        case Then.START_RELAY:
            return replace(state, step=Step.START_RELAY), (ctx.run(Step.START_RELAY),), ""
        case Then.RESTART_RELAY:
            restarts = _recent_restarts(state, now, policy)  # ``refine`` saw them not exhausted
            note = "the relay process is gone; restarting it on the spool"
            new = replace(state, step=Step.RESTART_RELAY, attempts=restarts + 1, restarted_at=now)
            return new, (ctx.run(Step.RESTART_RELAY),), note
        case Then.RELAY_STARTED:
            if state.role is Role.ACTIVE:  # restarts are counted by RESTART_RELAY's window
                return replace(state, step=None), (), "relay up"
            return replace(state, step=None, attempts=0), (), "relay up"
        case Then.RELAY_START_FAILED:
            attempts = state.attempts + 1
            detail = result.detail if result else ""
            if state.role is Role.ACTIVE:  # the next snapshot finds it down: RESTART_RELAY counts
                return replace(state, step=None), (), f"restart failed: {detail}"
            retry_at = now + policy.retry_interval
            new = replace(state, step=None, attempts=attempts, retry_at=retry_at)
            return new, (), f"relay start failed ({attempts}): {detail}"
        case Then.BEGIN_PROMOTION:
            cluster = ctx.snapshot.cluster
            previous = cluster.epoch_node if cluster.epoch_node != policy.node else None
            request = _switchover_pending(ctx.snapshot, policy)
            reason = "switchover" if request is not None else "leader vacant"
            new = AgentState(
                epoch=0,
                step=Step.ACQUIRE,
                started=now,
                reason=reason,
                previous=previous,
                cooldown_until=state.cooldown_until,
            )
            return new, (Action(Step.ACQUIRE, policy.timeout(Step.ACQUIRE), reason=reason),), reason
        case Then.NEXT_PROMOTION_STEP:
            assert result is not None
            steps = ctx.timed_steps()
            epoch = state.epoch
            if result.step is Step.ACQUIRE:
                epoch = result.epoch
            step = PROMOTION[PROMOTION.index(result.step) + 1]
            new = replace(state, step=step, steps=steps, epoch=epoch)
            fields: dict[str, object] = {}
            if step is Step.FENCE:
                fields = {"peer": state.previous, "fence": fence_targets(ctx.snapshot, policy)}
            if step is Step.PUBLISH:
                fields = {"peer": state.previous, "reason": state.reason, "steps": steps}
            action = Action(step, policy.timeout(step), epoch=epoch, **fields)  # type: ignore[arg-type]
            return new, (action,), ""
        case Then.FINISH_PROMOTION:
            total = round(now - state.started, 4)
            new = replace(state, step=None, steps=ctx.timed_steps(), attempts=0)
            return new, (), f"active in epoch {state.epoch} after {total}s"
        case Then.CHECK_LEASES:
            steps = ctx.timed_steps()
            if result is not None:  # FENCE just failed: its time counts, then any wait
                waiting_since, fenced = now, result.detail
            else:
                waiting_since, fenced = state.waiting_since, "not fenced"
            at, why = lease_verdict(ctx.snapshot, now, policy)
            assert at is not None  # ``refine`` made it LEASE_REFUSED
            if at > now:
                new = replace(
                    state,
                    step=None,
                    steps=steps,
                    retry_step=Step.FENCE,
                    retry_at=at,
                    waiting_since=waiting_since,
                )
                return new, (), f"{fenced}; {why}"
            if state.retry_step is Step.FENCE and steps:  # the wait is part of FENCE's time
                waited = round(now - state.waiting_since, 4)
                steps = (*steps[:-1], (Step.FENCE, round(steps[-1][1] + waited, 4)))
            step = PROMOTION[PROMOTION.index(Step.FENCE) + 1]
            new = replace(state, step=step, steps=steps, retry_step=None, waiting_since=0.0)
            return new, (ctx.run(step),), f"{fenced}; going on: {why}"
        case Then.ABANDON_UNFENCED:
            fenced = result.detail if result is not None else "not fenced"
            _, why = lease_verdict(ctx.snapshot, now, policy)
            note = f"promotion abandoned ({fenced}; {why}); rolling back"
            return _begin_demotion(ctx, give_up=True, note=note)
        case Then.ABANDON_REPLICA:
            refusal = replica_refusal(policy.node, ctx.snapshot.cluster)
            note = f"promotion abandoned (not taking the spool: {refusal}); rolling back"
            return _begin_demotion(ctx, give_up=True, note=note)
        case Then.FORGET_PROMOTION:
            # Lost the race, or the session or znode right after winning it: nothing else is
            # held, and a leader znode still ours is released as a stray one.
            assert result is not None
            new = AgentState(cooldown_until=state.cooldown_until)
            why = result.detail if not result.ok else ctx.cause.value.replace("_", " ")
            return new, (), f"leadership not taken: {why}"
        case Then.ROLL_BACK:
            why = f"{result.step.value} failed: {result.detail}" if result and not result.ok else ""
            note = f"promotion abandoned ({why or ctx.trigger.value}); rolling back"
            return _begin_demotion(ctx, give_up=True, note=note)
        case Then.BEGIN_DEMOTION:
            return _begin_demotion(ctx, give_up=False, note=ctx.trigger.value.replace("_", " "))
        case Then.CUT_DRAIN_SHORT:
            note = "session lost during a graceful drain: cutting it short"
            return _begin_demotion(ctx, give_up=state.give_up, note=note)
        case Then.REFUSE_SWITCHOVER:
            request = _switchover_pending(ctx.snapshot, policy)
            assert request is not None
            refusal = hand_over_refusal(request, ctx.snapshot)
            return replace(state, step=None), (), f"switchover refused: {refusal}"
        case Then.BEGIN_GIVING_UP:
            if ctx.snapshot.local.relay_running:
                note = "relay unhealthy; giving up leadership"
            else:  # ``refine``: it died again after its restarts
                restarts = _recent_restarts(state, now, policy)
                note = f"the relay died again after {restarts} restarts; giving up leadership"
            return _begin_demotion(ctx, give_up=True, note=note)
        case Then.RELEASE_ONLY:
            new = replace(state, step=Step.RELEASE, started=now, steps=(), reason="stray leader")
            action = ctx.run(Step.RELEASE)
            return new, (action,), "holding a leadership it does not use; releasing it"
        case Then.NEXT_DEMOTION_STEP:
            assert result is not None
            steps = ctx.timed_steps()
            step = DEMOTION[DEMOTION.index(result.step) + 1]
            new = replace(state, step=step, steps=steps, attempts=0)
            return new, (ctx.run(step),), ""
        case Then.FINISH_DEMOTION:
            cooldown = now + policy.cooldown if state.give_up else state.cooldown_until
            total = round(now - state.started, 4)
            new = AgentState(cooldown_until=cooldown, steps=ctx.timed_steps())
            return new, (), f"passive after {total}s"
        case Then.RETRY_DEMOTION_STEP:
            if result is not None:  # it just failed: wait a little before trying again
                attempts = state.attempts + 1
                retry_at = now + policy.retry_interval
                new = replace(
                    state, step=None, attempts=attempts, retry_at=retry_at, retry_step=result.step
                )
                return new, (), f"{result.step.value} failed ({attempts}): {result.detail}"
            step = state.retry_step or Step.DRAIN
            new = replace(state, step=step, retry_step=None)
            return new, (ctx.run(step),), f"retrying {step.value}"
    raise AssertionError(transition)  # pragma: no cover - the match is exhaustive


def decide(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> Decision:
    """The next state and actions for ``snapshot`` seen at monotonic time ``now``."""
    cause = classify(state, snapshot, now, policy)
    trigger = refine(cause, state, snapshot, now, policy)
    transition = TRANSITIONS.get((state.role, trigger))
    if transition is None:
        return Decision(state, (), trigger, "")
    new, actions, note = _effect(transition, _Context(state, snapshot, now, policy, trigger, cause))
    # The row is the whole truth about the role: no effect chooses one.
    if new.role is not transition.to:
        new = replace(new, role=transition.to)
    return Decision(new, actions, trigger, note)
