"""The plain data of the agent's decisions: what ``cluster.state.decide`` looks at and returns.

Every type here is immutable and holds no behaviour beyond arithmetic on its own fields: what
the agent sees (``Snapshot``: the ``ClusterView`` read from ZooKeeper, the ``LocalView`` of the
relay, the ``StepResult`` of the step that just ended), its tunables (``Policy``), what it is
doing (``AgentState``), the one thing that happened (``Trigger``, chosen by ``classify``) and
what it does about it (``Decision``, with its ``Action`` steps). The coordinator, the executor,
the operator's commands and the tests build and read these; the rules that use them live in
``cluster.state`` (the table and ``decide``) and ``cluster.takeover`` (who may take over, and
what must be fenced first). Standard library only.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Final

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
    # Only when ``[hooks] pre_promote`` is set (``Policy.pre_promote``): after FENCE, before
    # STORAGE, the operator's go/no-go; a non-zero exit or a timeout abandons the promotion.
    PRE_PROMOTE = "pre_promote"


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
    api: str = ""  # the agent's HTTP API ("http://address:port"), "" when it has none
    vip: str = ""  # the pair's virtual IP ("198.18.0.100/24"), for the fleet's view (none: "")
    # The leader it hears nothing from over the peer channel while that leader's pulse in
    # ZooKeeper advances: a cut channel, for ``hamta cluster status`` ("": none).
    channel_silent: str = ""

    def says_the_same(self, other: Member | None) -> bool:
        """Whether ``other`` tells its readers what this record does: the same in all but the
        time it was published (the agent then need not write it again between two steps)."""
        return other is not None and self == replace(other, heartbeat=self.heartbeat)


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
class ScheduledSwitchover:
    """A switchover asked for at a later time (``due``, wall clock); kept in ZooKeeper, so that
    it survives an agent's restart, and turned into the usual request by
    ``cluster.state.scheduled_switchover_due`` once its time has come."""

    source: str
    target: str | None
    due: float  # wall clock at which the hand-over begins
    at: float  # wall clock of the request
    by: str = ""


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
    last_failover: float | None = None  # wall clock of the last takeover (acquisition)
    # Wall clock of the last takeover that served (reached ACTIVE and published it): an aborted
    # promotion took the epoch but served nothing. The coordinator gives the last acquisition
    # when no takeover was recorded as serving yet. None: no takeover at all.
    last_served: float | None = None
    known_nodes: frozenset[str] = frozenset()  # every node that ever joined (persistent)
    # Monotonic time (this agent's clock) since which each other known node has had no member
    # znode, i.e. its ZooKeeper session had ended on the server: the lease it held has expired.
    absent_since: Mapping[str, float] = field(default_factory=dict)
    # DRBD resource-level fencing: nodes whose replica missed writes (not to be promoted until
    # resynced), and a split brain DRBD reported (no automatic failover until it is resolved).
    outdated: frozenset[str] = frozenset()
    split_brain: str | None = None
    # The last moment (this agent's monotonic clock) at which this agent's session is surely
    # still alive on the server: the send time of the last request a server answered, plus the
    # session timeout. None when unknown (no request answered in this session). A suspended
    # session is not lost before it (``cluster.state.session_doomed``); a failsafe lease may
    # later extend it.
    session_deadline: float | None = None
    scheduled_switchover: ScheduledSwitchover | None = None


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
class LocationVerdict:
    """One check location's view of the service, as its monitor last published it
    (``monitors/<location>``; read by the active node's agent, parsed by
    ``cluster.gray_failure.location_verdict``)."""

    location: str
    at: float  # wall clock of the monitor's publication: older than the policy's age is stale
    watched: tuple[str, ...] = ()  # its SMTP checks of the service (the virtual IP)
    # ... those it sees down, with since when (the monitor's wall clock)
    down: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one decision looks at."""

    cluster: ClusterView
    local: LocalView
    wall: float  # wall clock, for ages of records written by other nodes
    result: StepResult | None = None
    # What the check locations see of the service (gray failure); read while active only.
    location_verdicts: tuple[LocationVerdict, ...] = ()
    # The peer channel (cluster.peer_channel): for each peer node heard at least once, the
    # seconds since its last authenticated heartbeat, by this agent's monotonic clock.
    heartbeat_ages: tuple[tuple[str, float], ...] = ()
    # Failsafe (cluster.failsafe), on this agent's monotonic clock. Held: for each peer whose
    # last answer granted one, when the lease it granted this node ends (the ask's send time
    # plus the lease: the peer started counting later). Granted: for each node this node
    # granted a lease to, when it ends: this node does not take over unfenced before then.
    failsafe_held: tuple[tuple[str, float], ...] = ()
    failsafe_granted: tuple[tuple[str, float], ...] = ()
    # The leader's pulse in ZooKeeper (``pulses/<node>``, advanced every ``peer_timeout / 4``
    # by a node that may hold the leader znode): for each peer whose pulse znode exists, the
    # seconds since this agent last saw it advance, by its own monotonic clock when the change
    # arrived, counted only while its own session is connected (a reconnection starts the count
    # afresh: changes missed while cut off prove nothing). Given only while connected. It
    # corroborates a silence on the peer channel (``cluster.takeover.silent_leader``).
    pulse_ages: tuple[tuple[str, float], ...] = ()


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
    # A suspended active node demotes this long, plus the urgent drain, before its session
    # deadline: the relay has stopped serving before the session may expire on the server.
    session_margin: float = 0.25
    takeover: Takeover = Takeover.FENCE_OR_LEASE
    lease_grace: float = 2.0  # after a node's session ended, before its lease counts as expired
    # Fenced immediate takeover: a passive node that has not heard the leader's heartbeats for
    # ``peer_timeout`` fences it and, once the fence is confirmed, replaces its leader znode
    # without waiting for its session to expire (``cluster.takeover.silent_leader``).
    fast_takeover: bool = True
    peer_timeout: float = 1.0
    # Failsafe: a suspended active node serves on while every peer holds it a lease.
    failsafe: bool = True
    failsafe_peers: frozenset[str] = frozenset()  # the nodes of [agent] peers
    failsafe_lease: float = 3.0
    # No answer from a server for this long counts as cut off from ZooKeeper for the failsafe
    # (``cluster.failsafe.cut_off``): a quarter of the session timeout.
    zookeeper_patience: float = 0.5
    step_timeouts: Mapping[Step, float] = field(default_factory=dict)
    pre_promote: bool = False  # a ``[hooks] pre_promote`` command runs as a promotion step
    # Gray failure: hand over when this many check locations (and a majority of those known)
    # see the service down while this node thinks itself healthy; verdicts older are stale.
    gray_failure: bool = True
    gray_failure_locations: int = 2
    gray_verdict_max_age: float = 30.0

    @property
    def promotion(self) -> tuple[Step, ...]:
        """This node's promotion steps: ``PROMOTION``, with PRE_PROMOTE after FENCE if set."""
        if not self.pre_promote:
            return PROMOTION
        at = PROMOTION.index(Step.FENCE) + 1
        return (*PROMOTION[:at], Step.PRE_PROMOTE, *PROMOTION[at:])

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
    Step.PRE_PROMOTE: 30.0,  # ``[hooks] timeout`` when configured
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
    # FENCE: the node this takeover fenced before ACQUIRE (the fast path): not fenced twice, yet
    # fenced by this term all the same (DRBD's fast fence-peer path answers for it).
    fenced: tuple[str, ...] = ()
    reason: str = ""
    steps: tuple[tuple[Step, float], ...] = ()  # PUBLISH: the promotion's timings, for history
    # ACQUIRE after a confirmed fence: the silent leader's znode (node, epoch) that may be
    # replaced in the same transaction; None: only a vacant leadership is taken.
    stale_leader: tuple[str, int] | None = None

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
    # ACTIVE: why a gray failure seen was not acted on, and since when it was seen, as last
    # logged (one line per reason and episode, not one per tick).
    gray_held: str = ""
    # The silent leader's znode (node, epoch) this node is fencing (PASSIVE, its FENCE step in
    # flight) or fenced before ACQUIRE (PROMOTING: not fenced twice); PASSIVE: no silent leader
    # is fenced again before ``silent_fence_at`` (after a failed fence or a takeover refused).
    silent_leader: tuple[str, int] | None = None
    silent_fence_at: float = 0.0
    # ACTIVE: since when it has served in failsafe (its session suspended, every peer's lease
    # held); None when not.
    failsafe_since: float | None = None
    # PASSIVE: the leader whose heartbeats stopped while its pulse in ZooKeeper still advances
    # (the peer channel is cut, not the node), as last logged: one line when it begins, one
    # when it ends (``Trigger.CHANNEL_SILENT``, ``Trigger.CHANNEL_HEARD``); "" when none.
    channel_silent: str = ""


# ------------------------------------------------------------------ what the agent decided


class Trigger(enum.StrEnum):
    """One thing that happened, chosen from a snapshot by ``cluster.state.classify``."""

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
    GRAY_FAILURE = "gray_failure"  # check locations see the service down; this node looks fine
    GRAY_FAILURE_HELD = "gray_failure_held"  # ... but no handover now (``refine``)
    PEER_SILENT = "peer_silent"  # the leader's heartbeats stopped: fence it (``silent_leader``)
    PEER_FENCED = "peer_fenced"  # ... fenced, confirmed: take over at once
    FENCED_HELD = "fenced_held"  # ... fenced, but a takeover is not allowed now (``refine``)
    FAILSAFE_ENTERED = "failsafe_entered"  # active, suspended, every peer holds it a lease
    FAILSAFE_ENDED = "failsafe_ended"  # ... no longer: the session is back, or a lease is gone
    # The leader's heartbeats stopped but its pulse in ZooKeeper advances: not fenced (``refine``)
    CHANNEL_SILENT = "peer_channel_silent_leader_alive"
    CHANNEL_HEARD = "peer_channel_heard"  # ... no longer so: heard again, or another leader
    NOTHING = "nothing"


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
