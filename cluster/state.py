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

The decision spans three modules, each read in one sitting, all on the standard library only.
``cluster.decision_data`` holds the plain data it works on and returns (``Role``, ``Step``, the
``PROMOTION`` and ``DEMOTION`` sequences, ``Snapshot`` and its views, ``Policy``, ``AgentState``,
``Action``, ``Decision``, and ``Trigger``, which a ``Decision`` carries and by which ``Policy``
times a drain). ``cluster.takeover`` says who may take over (``takeover_refusal``,
``hand_over_refusal``) and what must be fenced first (``fence_targets``, ``lease_verdict``,
``replica_refusal``, ``holds_resources``). This module holds the rest: ``classify``, the named
special rules, the table and ``decide``.

The snapshot is first reduced to one ``Trigger`` (``classify``), in a fixed order of priority:
safety first (a lost session or lost leadership beats everything a node holding resources
does), then the outcome of the step that just ended, then health, then opportunity (a vacant
leadership). A few named special rules (``refine``, written beside the table, as h11 writes the
rules that do not fit its table outside it) then tell apart what the role alone cannot: the last
step of a promotion or a demotion, a promotion that ends at ACQUIRE, a failed fence that the
lease rule refuses to pass, the last relay start allowed, a relay that died once too often, a
gray failure (``cluster.gray_failure``: clients cannot reach a node that looks healthy) that
may not move the service now. The
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
- A node that holds resources demotes before its session may expire on the server, and as late
  as that allows (``session_doomed``): the coordinator knows the send time of the last request a
  server answered (the server heard from this session then, or later), so the session is alive
  on the server at least until that time plus the session timeout (``session_deadline``). A
  suspended ACTIVE node begins its urgent demotion at that deadline less the urgent drain and
  ``session_margin``, so its relay has stopped serving before the session may expire, and the
  peer may take over only after it has expired (and, without a fence, ``lease_grace`` later,
  which covers dropping the virtual IP and the spool). A session back to CONNECTED before that
  changes nothing: a ZooKeeper server's restart costs no demotion. The deadline holds while the
  session looks connected too (a silent server is noticed by kazoo late, if ever, while requests
  flow; so the agent leaves a server silent for ``zookeeper_patience`` for another, in the same
  session: the named rule ``unanswering_server``, ``cluster.failsafe.leave_server``). Without
  a known deadline, a lost (expired) session, or while promoting, the node demotes at the
  first suspension.
- Failsafe (``cluster.failsafe``): a suspended ACTIVE node serves on past its session deadline
  only while every other member holds it a lease (it lost ZooKeeper too, and will not take over
  before the lease ends and ``lease_grace`` more, unless it fences this node first); it demotes
  the urgent drain and the margin before the first lease held ends. Serving so is the sub-state
  ``AgentState.failsafe_since``, entered and left by rows of the table.
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
- Fenced immediate takeover: a passive node that has not heard the leader's authenticated
  heartbeats for ``peer_timeout``, nor seen its pulse in ZooKeeper advance for as long while its
  own session is connected, fences it first (``PEER_SILENT``: a FENCE step while still
  passive, under every rule a takeover obeys), and only once the fence is confirmed replaces the
  leader znode in one transaction with the epoch increment, checked to be the very znode fenced
  (``PEER_FENCED``), without waiting for the old session to expire. A failed fence changes
  nothing: the old session's expiry and the lease rule follow as before. A node heard again, a
  pause, a switchover or a znode changed meanwhile holds the takeover back (``FENCED_HELD``).
  Heartbeats stopped while the pulse advances is a cut peer channel, not a dead node: no fence,
  a warning once (``CHANNEL_SILENT``, then ``CHANNEL_HEARD`` when it ends). Only a pulse that
  advanced after the heartbeats had been silent for ``peer_timeout`` counts as one
  (``cluster.takeover._pulsed_since_silence``): a node switched off pulses last a moment after
  its last heartbeat.
- Below the agent, a newer term's epoch on the spool stops a zombie relay (``hamta.epoch_token``)
  and a watchdog fed by the agent stops the relay and drops the virtual IP when the agent hangs
  (``fencing.watchdog``). docs/fencing.md puts the layers together.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final, NamedTuple

from cluster.decision_data import (
    DEMOTION,
    PROMOTION,
    Action,
    AgentState,
    Decision,
    Member,
    Policy,
    Role,
    Session,
    Snapshot,
    Step,
    StepResult,
    Switchover,
    Trigger,
)
from cluster.failsafe import failsafe_due, held_until, members, serving_in_failsafe
from cluster.gray_failure import gray_refusal, gray_sighting
from cluster.takeover import (
    alive_unheard_leader,
    fence_targets,
    hand_over_refusal,
    heartbeat_age,
    lease_verdict,
    pulse_age,
    replica_refusal,
    silent_leader,
    takeover_refusal,
)

# ------------------------------------------------------------------ triggers


def _holds_leadership(snapshot: Snapshot) -> bool:
    leader = snapshot.cluster.leader
    return leader is not None and leader.ours


def scheduled_switchover_due(snapshot: Snapshot) -> Switchover | None:
    """Named rule: a scheduled switchover whose time has come is the usual request, dated at
    its due time, so that it goes stale after ``switchover_timeout`` like any other (a pair that
    was down at that time does not hand over hours later)."""
    scheduled = snapshot.cluster.scheduled_switchover
    if scheduled is None or snapshot.wall < scheduled.due:
        return None
    return Switchover(scheduled.source, scheduled.target, scheduled.due)


def _switchover_pending(snapshot: Snapshot, policy: Policy) -> Switchover | None:
    for request in (snapshot.cluster.switchover, scheduled_switchover_due(snapshot)):
        if request is not None and snapshot.wall - request.at <= policy.switchover_timeout:
            return request
    return None


def _may_take_over(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    cluster = snapshot.cluster
    if cluster.session is not Session.CONNECTED or cluster.leader is not None:
        return False
    return _eligible(state, snapshot, now, policy)


def _may_fence_silent(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """The fast path's first half: fence the leader whose heartbeats stopped (``silent_leader``),
    under every rule a takeover obeys, but never for a planned handover (its leader drains and
    releases on its own) and not again soon after a fence that failed or led nowhere."""
    if snapshot.cluster.session is not Session.CONNECTED or now < state.silent_fence_at:
        return False
    if silent_leader(snapshot, policy) is None or _switchover_pending(snapshot, policy):
        return False
    return _eligible(state, snapshot, now, policy)


def _may_take_over_fenced(
    state: AgentState, snapshot: Snapshot, now: float, policy: Policy
) -> bool:
    """The fast path's second half: the silent leader was fenced, the fence confirmed. Take over
    at once if the leader znode is still the one fenced (or vacant), the fenced node has stayed
    silent (a heartbeat or an advance of its pulse now would prove the fence wrong) and a
    takeover is allowed now."""
    cluster, fenced = snapshot.cluster, state.silent_leader
    if cluster.session is not Session.CONNECTED or fenced is None:
        return False
    leader = cluster.leader
    if leader is not None and (leader.ours or (leader.node, leader.epoch) != fenced):
        return False
    age = heartbeat_age(snapshot, fenced[0])
    if age is not None and age < policy.peer_timeout:
        return False
    pulse = pulse_age(snapshot, fenced[0])
    if pulse is not None and pulse < policy.peer_timeout:
        return False
    if _switchover_pending(snapshot, policy) is not None:
        return False
    return _eligible(state, snapshot, now, policy)


def _eligible(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """Whether this node may take over, its leadership aside: the rules both paths obey."""
    cluster = snapshot.cluster
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
    # The anti-flapping interval counts from the last takeover that served: a promotion aborted
    # (its node killed, its session lost) served nothing, and must not hold back the next one.
    last = cluster.last_served
    return last is None or snapshot.wall - last >= policy.min_failover_interval


def demotion_due(snapshot: Snapshot, policy: Policy) -> float | None:
    """When a node holding resources must begin its urgent demotion: early enough that the
    drain (and a margin) ends before its session may expire on the server. Minus infinity when
    the session is lost (the expired session's ephemeral znodes are gone already) or suspended
    with no known deadline; None when connected with no known deadline.

    It holds while kazoo still says connected, too: a server that went silent (a partition,
    a stall) is noticed by kazoo late, or not at all while requests keep flowing, but a
    contact that is not renewed runs out all the same.
    """
    cluster = snapshot.cluster
    deadline = cluster.session_deadline
    if cluster.session is Session.LOST:
        return float("-inf")
    due: float | None
    if deadline is None:
        due = None if cluster.session is Session.CONNECTED else float("-inf")
    else:
        due = deadline - (policy.urgent_drain_timeout + policy.session_margin)
    # Suspended, every peer's failsafe lease held: it serves on until the first one would end.
    leased = failsafe_due(snapshot, policy)
    if leased is not None and (due is None or leased > due):
        return leased
    return due


def session_doomed(role: Role, snapshot: Snapshot, now: float, policy: Policy) -> bool:
    """Whether a node holding resources must treat its session as lost now.

    Only an ACTIVE node rides out a suspension until ``demotion_due``: a ZooKeeper server's
    restart drops the connection, and kazoo reconnects to another server within milliseconds,
    the session never in danger. A promotion still gives up at the first suspension: it serves
    nothing yet, and going on without a session would prove nothing.
    """
    if snapshot.cluster.session is not Session.CONNECTED and role is not Role.ACTIVE:
        return True
    due = demotion_due(snapshot, policy)
    return due is not None and now >= due


def classify(state: AgentState, snapshot: Snapshot, now: float, policy: Policy) -> Trigger:
    """Reduce a snapshot to the one trigger that matters most for this role."""
    role = state.role
    cluster = snapshot.cluster
    local = snapshot.local
    result = snapshot.result
    # A promotion holds the leader znode from the moment ACQUIRE succeeds: the step after it
    # (FENCE) must not run on a session or a znode that is already gone.
    acquired = result is not None and result.step is Step.ACQUIRE and result.ok
    # (Its epoch is the term's from then on: ``steps`` may time a fence made before ACQUIRE.)
    holding = role is Role.ACTIVE or (role is Role.PROMOTING and (state.epoch > 0 or acquired))
    # Safety preempts a step in flight (a restart, a mount): the executor abandons it, and the
    # relay must stop serving before the peer may take over.
    if holding and session_doomed(role, snapshot, now, policy):
        return Trigger.SESSION_LOST
    if holding and not _holds_leadership(snapshot):
        return Trigger.LEADERSHIP_LOST
    # A graceful drain (switchover, stop, giving up) is cut short the same way: the peer may
    # take over once the session expires, and the relay still holds the spool.
    draining = role is Role.DEMOTING and state.step is Step.DRAIN and result is None
    graceful = policy.drain_time(state.reason) > policy.urgent_drain_timeout
    if draining and graceful and cluster.session is not Session.CONNECTED:
        return Trigger.SESSION_LOST
    # The failsafe sub-state of an active node changes whatever step is in flight
    # (Never over a step's result: the result would be lost.)
    failsafe = serving_in_failsafe(snapshot, now, policy)
    if role is Role.ACTIVE and result is None and (state.failsafe_since is None) == failsafe:
        return (
            Trigger.FAILSAFE_ENDED if state.failsafe_since is not None else Trigger.FAILSAFE_ENTERED
        )
    if result is None and state.step is not None:
        return Trigger.WAITING
    if local.stopping and role in (Role.ACTIVE, Role.PROMOTING):
        return Trigger.STOP
    if result is not None:
        if result.step is Step.FENCE and not result.ok:
            return Trigger.FENCE_FAILED
        if result.step is Step.FENCE and role is Role.PASSIVE:  # a silent leader's fence
            return Trigger.PEER_FENCED
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
        # Healthy by its own account, yet its clients cannot reach it (cluster.gray_failure).
        healthy = local.relay_ready and local.relay_failures == 0
        if healthy and gray_sighting(snapshot, policy) is not None:
            return Trigger.GRAY_FAILURE
        return Trigger.NOTHING
    if role is Role.PASSIVE:
        if not local.relay_running and now >= state.retry_at and not local.stopping:
            return Trigger.RELAY_DOWN
        if _holds_leadership(snapshot):
            return Trigger.LEADER_STRAY
        if _may_take_over(state, snapshot, now, policy):
            return Trigger.LEADER_VACANT
        if _may_fence_silent(state, snapshot, now, policy):
            return Trigger.PEER_SILENT
        # Unheard on the channel, yet its pulse in ZooKeeper advances (``refine`` says it once).
        if alive_unheard_leader(snapshot, policy) is not None:
            return Trigger.CHANNEL_SILENT
        if state.channel_silent:
            return Trigger.CHANNEL_HEARD
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
    # The silent leader is fenced, the fence confirmed: take over at once, unless a takeover
    # is no longer allowed (paused meanwhile, the znode changed, the node heard again, ...).
    fenced = role is Role.PASSIVE and trigger is Trigger.PEER_FENCED
    if fenced and not _may_take_over_fenced(state, snapshot, now, policy):
        return Trigger.FENCED_HELD
    # A leader unheard on the peer channel whose pulse in ZooKeeper still advances is alive:
    # the channel is cut. Never fenced for it (``silent_leader``); said once per episode and
    # leader, then nothing to do (its session's expiry still ends its term, as without the
    # fast path).
    if role is Role.PASSIVE and trigger is Trigger.CHANNEL_SILENT:
        leader = alive_unheard_leader(snapshot, policy)
        if leader is not None and leader.node == state.channel_silent:
            return Trigger.NOTHING
    # The start that fails for the ``relay_start_limit``-th time in a row: FAILED.
    starting = role in (Role.STARTING, Role.PASSIVE) and trigger is Trigger.STEP_FAILED
    if starting and state.attempts + 1 >= policy.relay_start_limit:
        return Trigger.RELAY_START_EXHAUSTED
    # The relay died again after its restarts: giving up, as when it stays unready.
    died = role is Role.ACTIVE and trigger is Trigger.RELAY_DOWN
    if died and _restarts_exhausted(state, snapshot, now, policy):
        return Trigger.RELAY_UNHEALTHY
    # A gray failure moves the service only as an automatic failover may: not while paused,
    # not within the minimum interval, and only to a peer that can take over.
    gray = role is Role.ACTIVE and trigger is Trigger.GRAY_FAILURE
    if gray and gray_refusal(snapshot, policy) is not None:
        return Trigger.GRAY_FAILURE_HELD
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
    BEGIN_GRAY_HANDOVER = "begin gray handover"  # clients cannot reach it: hand over, cool down
    HOLD_GRAY = "hold gray"  # ... but not now: stay active, and say why once
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
    FENCE_SILENT_PEER = "fence silent peer"  # its heartbeats stopped: fence it first
    BEGIN_FENCED_PROMOTION = "begin fenced promotion"  # replace its leader znode at once
    HOLD_FENCED = "hold fenced"  # fenced, but no takeover now: today's path will follow
    SILENT_FENCE_FAILED = "silent fence failed"  # not fenced: nothing changes
    NOTE_CHANNEL_SILENT = "note channel silent"  # the leader unheard but pulsing: say so, once
    NOTE_CHANNEL_HEARD = "note channel heard"  # ... no longer: say why, once
    ENTER_FAILSAFE = "enter failsafe"  # note since when, and until when the leases hold
    LEAVE_FAILSAFE = "leave failsafe"  # note why: the session is back, or a lease is gone


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
    # passive, the leader's heartbeats stopped: fence it, and take over once that is confirmed
    # (``_may_fence_silent``, ``_may_take_over_fenced``); without a confirmed fence, nothing
    # changes: the leader's session must expire as before.
    (Role.PASSIVE, Trigger.PEER_SILENT): Transition(Role.PASSIVE, Then.FENCE_SILENT_PEER),
    (Role.PASSIVE, Trigger.PEER_FENCED): Transition(_P, Then.BEGIN_FENCED_PROMOTION),
    (Role.PASSIVE, Trigger.FENCED_HELD): Transition(Role.PASSIVE, Then.HOLD_FENCED),
    (Role.PASSIVE, Trigger.FENCE_FAILED): Transition(Role.PASSIVE, Then.SILENT_FENCE_FAILED),
    # passive, the leader unheard on the peer channel while its pulse in ZooKeeper advances:
    # a cut channel, not a dead node; no fence (``silent_leader``), a warning once (``refine``)
    (Role.PASSIVE, Trigger.CHANNEL_SILENT): Transition(Role.PASSIVE, Then.NOTE_CHANNEL_SILENT),
    (Role.PASSIVE, Trigger.CHANNEL_HEARD): Transition(Role.PASSIVE, Then.NOTE_CHANNEL_HEARD),
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
    (_A, Trigger.GRAY_FAILURE): Transition(_D, Then.BEGIN_GRAY_HANDOVER),
    (_A, Trigger.GRAY_FAILURE_HELD): Transition(_A, Then.HOLD_GRAY),
    (_A, Trigger.RELAY_DOWN): Transition(_A, Then.RESTART_RELAY),
    (_A, Trigger.STEP_DONE): Transition(_A, Then.RELAY_STARTED),
    (_A, Trigger.STEP_FAILED): Transition(_A, Then.RELAY_START_FAILED),
    (_A, Trigger.FAILSAFE_ENTERED): Transition(_A, Then.ENTER_FAILSAFE),
    (_A, Trigger.FAILSAFE_ENDED): Transition(_A, Then.LEAVE_FAILSAFE),
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
        failsafe_since=None,
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
            promotion = policy.promotion
            step = promotion[promotion.index(result.step) + 1]
            new = replace(state, step=step, steps=steps, epoch=epoch)
            fields: dict[str, object] = {}
            if step is Step.FENCE:
                # A node fenced before ACQUIRE (the fast path) is not fenced twice.
                done = state.silent_leader[0] if state.silent_leader else None
                targets = tuple(t for t in fence_targets(ctx.snapshot, policy) if t != done)
                before = (done,) if done else ()
                fields = {"peer": state.previous, "fence": targets, "fenced": before}
            if step is Step.PUBLISH:
                fields = {"peer": state.previous, "reason": state.reason, "steps": steps}
            if step is Step.PRE_PROMOTE:  # the hook is told why the node takes over
                fields = {"reason": state.reason}
            action = Action(step, policy.timeout(step), epoch=epoch, **fields)  # type: ignore[arg-type]
            return new, (action,), ""
        case Then.FINISH_PROMOTION:
            total = round(now - state.started, 4)
            steps = ctx.timed_steps()
            new = replace(state, step=None, steps=steps, attempts=0, silent_leader=None)
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
            step = policy.promotion[policy.promotion.index(Step.FENCE) + 1]
            new = replace(state, step=step, steps=steps, retry_step=None, waiting_since=0.0)
            reason = state.reason if step is Step.PRE_PROMOTE else ""
            return new, (ctx.run(step, reason=reason),), f"{fenced}; going on: {why}"
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
            # After a fence, the silent leader is not fenced again at once.
            again = now + policy.retry_interval if state.silent_leader else 0.0
            new = AgentState(cooldown_until=state.cooldown_until, silent_fence_at=again)
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
        case Then.ENTER_FAILSAFE:
            until = held_until(ctx.snapshot, policy)
            assert until is not None  # ``classify`` saw every lease held
            peers = ", ".join(sorted(members(ctx.snapshot, policy)))
            note = f"serving in failsafe: ZooKeeper lost, leases held from {peers}"
            return replace(state, failsafe_since=now), (), f"{note} for {until - now:.1f}s"
        case Then.LEAVE_FAILSAFE:
            since = now - (state.failsafe_since or now)
            if ctx.snapshot.cluster.session is Session.CONNECTED:
                why = "the session is back"
            else:
                why = f"a peer's lease is gone ({_missing_leases(ctx.snapshot, policy)})"
            note = f"failsafe over after {since:.1f}s: {why}"
            return replace(state, failsafe_since=None), (), note
        case Then.REFUSE_SWITCHOVER:
            request = _switchover_pending(ctx.snapshot, policy)
            assert request is not None
            refusal = hand_over_refusal(request, ctx.snapshot)
            return replace(state, step=None), (), f"switchover refused: {refusal}"
        case Then.BEGIN_GRAY_HANDOVER:
            # A planned handover (a graceful drain, the peer not fenced), ending in a cooldown:
            # a node its clients could not reach does not take the service back at once.
            sighting = gray_sighting(ctx.snapshot, policy)
            assert sighting is not None  # ``classify`` saw it
            note = f"gray failure: {sighting.describe()}; handing over to the passive node"
            return _begin_demotion(ctx, give_up=True, note=note)
        case Then.HOLD_GRAY:
            sighting = gray_sighting(ctx.snapshot, policy)
            held = gray_refusal(ctx.snapshot, policy)
            assert sighting is not None and held is not None  # ``classify``, ``refine``
            # One line per reason and episode (a check that went down again is a new one), not
            # one per tick.
            key = f"{held} (down since {sighting.since:.3f})"
            if key == state.gray_held:
                return replace(state, step=None), (), ""
            note = f"gray failure: {sighting.describe()}; not handing over: {held}"
            return replace(state, step=None, gray_held=key), (), note
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
        case Then.FENCE_SILENT_PEER:
            leader = silent_leader(ctx.snapshot, policy)
            assert leader is not None  # ``classify`` saw it silent
            age = heartbeat_age(ctx.snapshot, leader.node) or 0.0
            new = replace(state, step=Step.FENCE, silent_leader=(leader.node, leader.epoch))
            # Epoch 0: a passive node has no term yet (the fence agents' ``{epoch}``).
            action = Action(
                Step.FENCE,
                policy.timeout(Step.FENCE),
                peer=leader.node,
                fence=(leader.node,),
                reason="peer silent",
            )
            note = (
                f"{leader.node}'s heartbeats stopped {age:.2f}s ago (peer_timeout "
                f"{policy.peer_timeout:g}s): fencing it before taking over"
            )
            return new, (action,), note
        case Then.BEGIN_FENCED_PROMOTION:
            assert result is not None and state.silent_leader is not None
            node, epoch = state.silent_leader
            leader = ctx.snapshot.cluster.leader
            stale = state.silent_leader if leader is not None else None
            new = AgentState(
                epoch=0,
                step=Step.ACQUIRE,
                started=now - result.seconds,  # the takeover began with the fence
                steps=((Step.FENCE, round(result.seconds, 4)),),
                reason="peer fenced",
                previous=node,
                cooldown_until=state.cooldown_until,
                silent_leader=state.silent_leader,
            )
            timeout = policy.timeout(Step.ACQUIRE)
            action = Action(Step.ACQUIRE, timeout, reason="peer fenced", stale_leader=stale)
            note = f"{result.detail}; taking over from epoch {epoch} at once"
            return new, (action,), note
        case Then.HOLD_FENCED | Then.SILENT_FENCE_FAILED:
            node = state.silent_leader[0] if state.silent_leader else "the silent leader"
            if transition.then is Then.HOLD_FENCED:
                note = f"{node} fenced ({result.detail if result else ''}), but not taking over now"
            else:
                detail = result.detail if result else ""
                note = f"{node} not fenced ({detail}): waiting for its session to end"
            again = now + policy.retry_interval
            new = replace(state, step=None, silent_leader=None, silent_fence_at=again)
            return new, (), note
        case Then.NOTE_CHANNEL_SILENT:
            leader = alive_unheard_leader(ctx.snapshot, policy)
            assert leader is not None  # ``classify`` saw it
            heard = heartbeat_age(ctx.snapshot, leader.node) or 0.0
            pulse = pulse_age(ctx.snapshot, leader.node) or 0.0
            note = (
                f"{leader.node}'s heartbeats stopped {heard:.2f}s ago, but its pulse in ZooKeeper "
                f"advanced {pulse:.2f}s ago: the peer channel is cut, not the node; not fencing "
                "it (the fast takeover waits for both to go silent)"
            )
            return replace(state, channel_silent=leader.node), (), note
        case Then.NOTE_CHANNEL_HEARD:
            node, leader = state.channel_silent, ctx.snapshot.cluster.leader
            if ctx.snapshot.cluster.session is not Session.CONNECTED:
                why = "ZooKeeper lost here, its pulse unseen"
            elif leader is None or leader.node != node:
                why = "it no longer leads"
            elif (heartbeat_age(ctx.snapshot, node) or 0.0) < policy.peer_timeout:
                why = "heard again over the peer channel"
            else:
                why = "its pulse in ZooKeeper stopped too"
            return replace(state, channel_silent=""), (), f"peer channel to {node}: {why}"
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


def _missing_leases(snapshot: Snapshot, policy: Policy) -> str:
    held = dict(snapshot.failsafe_held)
    missing = sorted(members(snapshot, policy) - held.keys())
    if missing:
        return "none held from " + ", ".join(missing)
    return "the first ends too soon" if policy.failsafe else "failsafe is off"


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
