"""The agent's loop: observe, decide, act, and log each decision as one JSON line.

It wakes on every ZooKeeper change (kazoo watches), every step that ends, every relay exit and
every health tick, builds a ``Snapshot``, asks ``cluster.state.decide`` what to do, and hands
the actions to the ``Executor``, which runs them in the background so that heartbeats and
observation go on during a long step. Nothing here decides anything: ``cluster.state`` decides
the steps, ``cluster.watchdog_policy`` when the watchdog is armed, fed or starved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster.agent_watchdog import WatchdogKeeper
from cluster.api_auth import Access, ApiAuthError, load_token
from cluster.api_status import NodeStatus
from cluster.config import AgentConfig
from cluster.coordination import Coordinator
from cluster.coordination_layout import CoordinationError, Credentials
from cluster.decision_data import (
    Action,
    AgentState,
    ClusterView,
    Decision,
    LocalView,
    LocationVerdict,
    Member,
    Role,
    Session,
    Snapshot,
    Step,
    StepResult,
    Trigger,
)
from cluster.executor import Executor
from cluster.failsafe import cut_off, failsafe_due, leave_server
from cluster.failsafe_leases import FailsafeLeases
from cluster.fast_fence import FastFence
from cluster.fencers import ChainFencer, CommandFencer, Fencer
from cluster.gray_failure import gray_sighting, location_verdict
from cluster.hooks import Hooks, RoleChange
from cluster.operator import LOCAL_STATUS
from cluster.peer_channel import (
    Address,
    HeartbeatSender,
    Message,
    PeerChannel,
    PeerChannelError,
    bind_socket,
    load_secret,
)
from cluster.priority import raise_priority
from cluster.relayproc import RelayControlError, RelayProcess, default_relay_command
from cluster.state import decide, demotion_due
from cluster.storage import DrbdStorage, Storage, storage_from_config
from cluster.takeover import holds_resources, pulsing, silence_due
from cluster.vip import VipSet, VirtualIp, moving_addresses
from fencing import FenceChain, agents_from_config
from fencing.watchdog import WatchdogError
from hamta import eventlog, privileges
from hamta.config import ConfigError, load_config, parse_hostport
from hamta.durable_files import write_durably
from hamta.eventlog import get_logger

if TYPE_CHECKING:
    from cluster.api import AgentApi


class AgentStartError(Exception):
    """The agent cannot start; the message names the cause."""


def _fencer(config: AgentConfig) -> Fencer:
    """STONITH agents when configured, else plain commands (none: rely on self-demotion)."""
    if config.fencing.agents:
        return ChainFencer(FenceChain(agents_from_config(config.fencing.agents)))
    return CommandFencer(config.fencing.commands)


def _fast_fence(
    config: AgentConfig, coordinator: Coordinator, storage: Storage, wall: Callable[[], float]
) -> FastFence | None:
    """DRBD's fast fence-peer path (cluster.fast_fence), for a DRBD spool unless turned off."""
    directory, resource = config.storage.fence_marker_dir, config.storage.resource
    if not isinstance(storage, DrbdStorage) or directory is None or resource is None:
        return None
    return FastFence(
        coordinator=coordinator,
        node=config.agent.node,
        resource=resource,
        directory=directory,
        valid=config.storage.fence_marker_valid(),
        fence_expected=storage.primary_would_fence,
        wall=wall,
    )


Sighting = tuple[float, float]  # (a takeover's recorded time, local wall clock when first seen)


def trusted_failover(recorded: float, wall: float, seen: Sighting | None) -> tuple[float, Sighting]:
    """The last takeover's time as this node may trust it, never later than its first sighting.

    ``recorded`` is the taker's wall clock. A taker whose clock ran ahead (the chaos suite's
    clock-skew scenario: 45 s) would otherwise stamp its takeover in the future and hold back
    every other node's automatic takeover (``min_failover_interval``) for its clock's lead.
    """
    if seen is None or seen[0] != recorded:
        seen = (recorded, wall)
    return min(recorded, seen[1]), seen


_RELAY_STEPS = frozenset({Step.START_RELAY, Step.RESTART_RELAY, Step.RELAY, Step.DRAIN})


class Health:
    """The local relay's health, checked on a timer while the relay runs."""

    def __init__(self) -> None:
        self.view = LocalView()

    def update(self, running: bool, ready: bool, depth: int, active: bool) -> bool:
        """Record a check; True when something the decision looks at changed."""
        failures = 0
        if active and not ready:
            failures = self.view.relay_failures + 1
        new = LocalView(running, ready, failures, depth)
        changed = (new.relay_running, new.relay_ready, new.relay_failures) != (
            self.view.relay_running,
            self.view.relay_ready,
            self.view.relay_failures,
        )
        self.view = new
        return changed


class Agent:
    """One node's agent: coordinator, executor, relay, and the decision loop."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        coordinator: Coordinator | None = None,
        storage: Storage | None = None,
        vip: VirtualIp | VipSet | None = None,
        fencer: Fencer | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        agent = config.agent
        self.config = config
        self.policy = config.policy()
        self.clock = clock
        self.wall = wall
        self.log = get_logger(node=agent.node, component="agent")
        self.wake = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_change() -> None:
            loop.call_soon_threadsafe(self.wake.set)

        credentials = Credentials.from_file(agent.credentials) if agent.credentials else None
        self.coordinator = coordinator or Coordinator(
            agent.zookeeper,
            agent.cluster,
            agent.node,
            session_timeout=agent.session_timeout,
            credentials=credentials,
            readers=(agent.fleet_reader,) if agent.fleet_reader else (),
            wall=wall,
            clock=clock,
            on_change=on_change,
        )
        relay_config = load_config(agent.relay_config)
        # Who the relay child becomes (it starts with the agent's uid): PrivilegeError here is
        # the relay's own refusal, said at the agent's start rather than at each relay start.
        relay_user = privileges.resolve(relay_config.node.user, relay_config.node.group)
        self.relay = RelayProcess(
            agent.relay_command or default_relay_command(agent.relay_config),
            relay_config.control.socket,
            agent.state_dir / "relay.out",
        )
        self.storage = storage or storage_from_config(
            config.storage.driver, **config.storage.options()
        )
        if vip is None:
            # The relay's [delivery.egress] sources are the one list of sending addresses: the
            # relay binds them, the agent moves them with the virtual IP, on [vip] interface.
            egress = [str(s.address) for s in relay_config.delivery.egress.sources.values()]
            vip = moving_addresses(config.vip.address, config.vip.interface, egress)
        self.vip = vip
        smtp_host, smtp_port = parse_hostport(relay_config.smtp.listen[0], 25)
        probe_host = config.probe.host or (
            config.vip.address.split("/")[0] if config.vip.address else smtp_host
        )
        if probe_host in ("0.0.0.0", "::"):
            probe_host = "127.0.0.1"
        self.smtp_address = f"{probe_host}:{config.probe.port or smtp_port}"
        hooks = config.hooks
        self.hooks = Hooks(
            pre_promote=hooks.pre_promote,
            on_role_change=hooks.on_role_change,
            post_demote=hooks.post_demote,
            timeout=hooks.timeout,
            log=self.log,
            clock=clock,
        )
        self.executor = Executor(
            node=agent.node,
            coordinator=self.coordinator,
            storage=self.storage,
            spool_name=config.storage.spool,
            vip=vip,
            relay=self.relay,
            fencer=fencer or _fencer(config),
            probe_address=(probe_host, config.probe.port or smtp_port),
            probe_timeout=config.probe.timeout,
            spool_owner=relay_user if relay_user.uid != os.geteuid() else None,
            hooks=self.hooks,
            fast_fence=_fast_fence(config, self.coordinator, self.storage, wall),
            clock=clock,
            wall=wall,
        )
        self.state = AgentState()
        self.health = Health()
        self.results: list[StepResult] = []
        self.tasks: set[asyncio.Task[Any]] = set()
        self.current: asyncio.Task[None] | None = None  # the step in flight
        self.publishing = asyncio.Lock()
        self.published: Member | None = None  # the last member record written
        self.stopping = asyncio.Event()  # SIGTERM: hand over, then exit
        self.exiting = asyncio.Event()  # the loops end
        self.stop_deadline = float("inf")
        self.watchdog = (
            WatchdogKeeper(config, self.coordinator, self.relay, vip, self.log, clock)
            if config.watchdog.enabled
            else None
        )
        self.progress = clock()  # the decision loop's last turn
        # Active with a suspended session: when the decision must look again (demotion_due).
        self.demotion_due: float | None = None
        self._not_asking = False  # the view is not read: cut off while demoting
        self.riding_since: float | None = None  # ... and since when it has served on so
        self.silence_at: float | None = None  # when the leader's heartbeats would be too old
        self._failover_seen: Sighting | None = None  # see trusted_failover()
        self._served_seen: Sighting | None = None  # ... for the last takeover that served
        # What the check locations see (monitors/<location>), read while active (gray failure).
        self.locations: tuple[LocationVerdict, ...] = ()
        self._locations_trouble = ""  # the last failure to read them, logged once
        self.api = self._api(config) if config.api.listen else None

        self.channel = self._peer_channel(config)
        # The pulse in ZooKeeper that corroborates a silence on the channel before the fast
        # takeover fences anyone (cluster.coordination_pulse): written while this node may
        # hold the leader znode, its peers' watched.
        self.pulses = agent.fast_takeover and self.channel is not None
        self.beats = 0  # pulses written so far
        self.failsafe: FailsafeLeases | None = None
        self.heartbeats: HeartbeatSender | None = None
        if self.channel is not None:
            self.heartbeats = HeartbeatSender(
                self.channel,
                config.agent.heartbeat_interval,
                config.agent.peer_timeout,
                self._heartbeat_body,
                clock,
            )
            self.failsafe = FailsafeLeases(
                channel=self.channel,
                policy=self.policy,
                session=lambda: self.coordinator.session,
                confirmed_age=self.coordinator.confirmed_age,
                clock=clock,
                log=self.log,
                on_change=self.wake.set,
            )
        self.last_snapshot: Snapshot | None = None

    def _api(self, config: AgentConfig) -> AgentApi:
        # Here, not at the top: aiohttp only for an agent with an API (see cluster.api_status).
        from cluster.api import AgentApi  # noqa: PLC0415

        api = config.api
        try:
            token = load_token(api.token_file) if api.token_file else None
        except ApiAuthError as exc:
            raise AgentStartError(str(exc)) from None
        access = Access(api.read_networks, token, client_certificates=api.client_ca is not None)
        return AgentApi(
            config=config,
            access=access,
            status=self.node_status,
            coordinator=self.coordinator,
            log=self.log,
            wall=self.wall,
        )

    def node_status(self) -> NodeStatus:
        """This agent as the API's local endpoints (/active, /passive, /health) report it."""
        state = self.state
        return NodeStatus(
            node=self.policy.node,
            role=state.role,
            epoch=state.epoch,
            step=state.step,
            relay_ready=self.health.view.relay_ready,
            loop_age=self.clock() - self.progress,
        )

    def _peer_channel(self, config: AgentConfig) -> PeerChannel | None:
        """The direct channel to the other agents, when ``agent.peers`` names any."""
        agent = config.agent
        if not agent.peers:
            return None
        assert agent.peer_secret_file is not None  # the configuration says so
        try:
            secret = load_secret(agent.peer_secret_file)
            sock = bind_socket(parse_hostport(agent.peer_address))
        except PeerChannelError as exc:
            raise AgentStartError(str(exc)) from None
        return PeerChannel(
            node=agent.node,
            secret=secret,
            peers=agent.peer_addresses(),
            sock=sock,
            handler=self._on_peer_message,
            clock=self.clock,
            wall=self.wall,
            max_skew=agent.peer_max_skew,
        )

    def _on_peer_message(self, message: Message, address: Address) -> None:
        """An authenticated message from a peer (heartbeats are counted by the channel)."""
        if self.failsafe is not None:
            self.failsafe.receive(message, self.state)

    def _heartbeat_body(self) -> dict[str, Any]:
        """What each heartbeat says (read by the HeartbeatSender's thread: one immutable state)."""
        state = self.state
        return {"role": state.role.value, "epoch": state.epoch}

    async def _ask_peers(self) -> None:
        """Every heartbeat interval: the failsafe asks, and the heartbeat thread is told that the
        event loop turns (it has its own thread: see HeartbeatSender)."""
        if self.heartbeats is not None:
            self.heartbeats.tick()
        if self.failsafe is not None:
            self.failsafe.ask(self.state)

    async def _pulse(self) -> None:
        """Every ``peer_timeout / 4``: advance this node's pulse while it may lead (not waited
        for: the write goes out in kazoo's thread)."""
        if pulsing(self.state):
            self.beats += 1
            self.coordinator.pulse(self.state.epoch, self.beats)

    # ------------------------------------------------------------ observation

    def member(self) -> Member:
        """This node's heartbeat record."""
        local = self.health.view
        return Member(
            node=self.policy.node,
            role=self.state.role,
            epoch=self.state.epoch,
            relay_running=local.relay_running,
            relay_ready=local.relay_ready,
            queue_depth=local.queue_depth,
            heartbeat=self.wall(),
            smtp=self.smtp_address,
            cooldown=self.clock() < self.state.cooldown_until,
            holds=holds_resources(self.state),
            api=self.config.api.url,
            vip=self.vip.address if self.vip is not None else "",
            channel_silent=self.state.channel_silent,
        )

    async def _snapshot(self) -> Snapshot:
        # The result first: a view read after it is at least as new as what the step did.
        result = self.results.pop(0) if self.results else None
        view: ClusterView
        # A silent server holds a read up for as long as the session lasts: an active node does
        # not wait past its demotion moment for it (the read goes on in its thread, unheeded).
        due = self.demotion_due
        patience = None if due is None else max(due - self.clock(), 0.0)
        coordinator = self.coordinator
        # Cut off (``cut_off``: nothing confirmed for ``zookeeper_patience``) while demoting:
        # each step waits for a turn of this loop, and a read held up by a silent server would
        # cost each its whole time limit (2 s a step: CI saw the disk released 4 s after the
        # drain, after the peer's takeover had begun). Not asked then; kazoo's state and
        # ``touch`` say when a server answers again. (Not while promoting: there a contact only
        # slow under load would read as a lost session and abort the takeover.)
        demoting = self.state.role is Role.DEMOTING
        confirmed_age = coordinator.confirmed_age()
        cut = demoting and cut_off(coordinator.session, confirmed_age, self.policy)
        if cut and not self._not_asking:  # said once, not at every turn
            self.log.warning(
                "ClusterViewNotAsked",
                why="cut off while demoting",
                session=coordinator.session.value,
                unanswered_for=None if confirmed_age is None else round(confirmed_age, 3),
            )
        self._not_asking = cut
        try:
            if cut:
                view = coordinator.unanswered_view()
            else:
                view = await asyncio.wait_for(asyncio.to_thread(coordinator.view), patience)
        except TimeoutError:
            self.log.warning("ClusterViewUnanswered", waited=round(patience or 0.0, 3))
            view = coordinator.unanswered_view()
        except Exception as exc:  # a failed read must look like a lost connection, not a crash
            self.log.warning("ClusterViewFailed", error=str(exc))
            view = ClusterView(session=Session.SUSPENDED)
        local = replace(self.health.view, stopping=self.stopping.is_set())
        wall = self.wall()
        if view.last_failover is not None:
            last, self._failover_seen = trusted_failover(
                view.last_failover, wall, self._failover_seen
            )
            view = replace(view, last_failover=last)
        if view.last_served is not None:
            served, self._served_seen = trusted_failover(view.last_served, wall, self._served_seen)
            view = replace(view, last_served=served)
        ages = self.channel.heartbeat_ages() if self.channel is not None else ()
        snapshot = Snapshot(
            cluster=view,
            local=local,
            wall=wall,
            result=result,
            heartbeat_ages=ages,
            location_verdicts=self.locations,
            pulse_ages=self.coordinator.pulse_ages() if self.pulses else (),
        )
        return self.failsafe.view(snapshot) if self.failsafe is not None else snapshot

    async def _read_locations(self) -> None:
        """The check locations' verdicts, for the gray failure rule: read on a timer, apart from
        the decision's own reads, so that a slow read never holds a decision up. Only the
        active node needs them; a failed read keeps the last ones (they go stale by age)."""
        wanted = self.policy.gray_failure and self.state.role is Role.ACTIVE
        if not wanted or self.coordinator.session is not Session.CONNECTED:
            self.locations = ()
            return
        try:
            raw = await asyncio.to_thread(self.coordinator.monitor_states)
        except CoordinationError as exc:
            trouble = str(exc)
        else:
            trouble = ""
            found = {name: location_verdict(name, data) for name, data in raw.items()}
            unreadable = sorted(name for name, verdict in found.items() if verdict is None)
            if unreadable:
                trouble = f"unreadable verdicts of {', '.join(unreadable)}"
            locations = tuple(verdict for verdict in found.values() if verdict is not None)
            if locations != self.locations:
                self.locations = locations
                self.wake.set()
        if trouble != self._locations_trouble:
            self._locations_trouble = trouble
            if trouble:
                self.log.warning("LocationVerdictsUnread", error=trouble)

    async def _check_health(self) -> None:
        active = self.state.role is Role.ACTIVE and self.state.step is None
        if not self.relay.running:
            changed = self.health.update(False, False, 0, active)
        else:
            try:
                agent = self.config.agent
                status = await self.relay.status(
                    timeout=agent.health_timeout or max(0.2, agent.health_interval)
                )
                changed = self.health.update(
                    True, bool(status.get("ready")), int(status.get("depth", 0)), active
                )
            except (RelayControlError, ValueError, TypeError):  # no answer, or a garbled one
                changed = self.health.update(True, False, 0, active)
        if changed:
            self.wake.set()

    # ------------------------------------------------------------ acting

    def _start(self, action: Action) -> None:
        """Run ``action`` in the background; a step still in flight is abandoned first.

        Only a safety trigger (session or leadership lost) starts a step while another is in
        flight: the old one is cancelled and its result discarded. Blocking work it left in a
        thread finishes on its own; the executor's per-resource locks make the steps that
        follow wait for it.
        """
        if self.current is not None and not self.current.done():
            self.log.warning("StepAbandoned", step=self.current.get_name())
            self.current.cancel()

        async def run() -> None:
            result = StepResult(action.step, False, 0.0, "no result")
            try:
                result = await self.executor.run(action)
                self.log.info(
                    "StepDone" if result.ok else "StepFailed",
                    step=result.step.value,
                    seconds=round(result.seconds, 4),
                    detail=result.detail,
                    epoch=action.epoch or result.epoch,
                )
                if action.step in _RELAY_STEPS:
                    await self._check_health()
            finally:
                if self.current is asyncio.current_task():
                    self.results.append(result)
                    self.wake.set()

        task = asyncio.create_task(run(), name=action.step.value)
        self.current = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _log_decision(self, before: AgentState, decision: Decision, snapshot: Snapshot) -> None:
        after = decision.state
        cluster = snapshot.cluster
        deadline = cluster.session_deadline
        suspended = cluster.session is Session.SUSPENDED and deadline is not None
        # A cut peer channel (the leader alive by its pulse) is for an operator to mend.
        cut = decision.trigger is Trigger.CHANNEL_SILENT
        (self.log.warning if cut else self.log.info)(
            "Decision",
            role=after.role.value,
            was=before.role.value,
            trigger=decision.trigger.value,
            actions=[action.step.value for action in decision.actions],
            note=decision.note,
            epoch=after.epoch or cluster.epoch,
            session=cluster.session.value,
            # Suspended: how long the session surely lives on on the server (None: unknown).
            session_left=round(deadline - self.clock(), 3) if suspended and deadline else None,
            leader=cluster.leader.node if cluster.leader else None,
            paused=cluster.paused is not None,
            relay_ready=snapshot.local.relay_ready,
            steps={step.value: seconds for step, seconds in after.steps} or None,
            gray_failure=self._gray_fields(decision, snapshot),
            # Serving on the peers' leases: for how long so far (None: not in failsafe).
            failsafe=round(self.clock() - after.failsafe_since, 3)
            if after.failsafe_since is not None
            else None,
        )

    def _gray_fields(self, decision: Decision, snapshot: Snapshot) -> dict[str, Any] | None:
        """A gray failure's decision names the locations and the checks that saw it."""
        if decision.trigger not in (Trigger.GRAY_FAILURE, Trigger.GRAY_FAILURE_HELD):
            return None
        sighting = gray_sighting(snapshot, self.policy)
        if sighting is None:
            return None
        return {
            "locations": list(sighting.locations),
            "checks": list(sighting.checks),
            "known": list(sighting.known),
        }

    async def _decide_once(self) -> None:
        self.progress = self.clock()
        snapshot = await self._snapshot()
        before = self.state
        decision = decide(before, snapshot, self.clock(), self.policy)
        self.state = decision.state
        self.last_snapshot = snapshot
        if self.failsafe is not None:
            self.failsafe.saw(snapshot.cluster.session)
        active = self.state.role is Role.ACTIVE
        self.demotion_due = demotion_due(snapshot, self.policy) if active else None
        # A silence sends no wake-up: look again when the leader's heartbeats would be
        # peer_timeout old (heartbeats that come meanwhile just push it back).
        silent_in = silence_due(snapshot, self.policy)
        self.silence_at = None if silent_in is None else self.clock() + silent_in
        self._note_ride_out(snapshot)
        self._tend_watchdog()
        if decision.changed or before.role is not decision.state.role:
            self._log_decision(before, decision, snapshot)
        if before.role is not self.state.role:  # queued: the hooks never hold the loop up
            vip = self.config.vip.address
            epoch = self.state.epoch or before.epoch or snapshot.cluster.epoch
            reason = decision.note or decision.trigger.value
            self.hooks.role_changed(
                RoleChange(
                    self.policy.node, before.role.value, self.state.role.value, epoch, vip, reason
                )
            )
        moved = before.role is not self.state.role or before.steps != self.state.steps
        if snapshot.cluster.session is not Session.CONNECTED:
            self.published = None  # a new session may come without it: write it again
        # Before the next step: the peer must see that this node no longer holds anything
        # before leadership goes, or it would fence a node that stepped down cleanly. Not when
        # this snapshot found the servers silent (kazoo may still say connected): the write
        # would hold the urgent drain back until kazoo gives up, past the deadline. Not when
        # the record says nothing new (most promotion steps change nothing in it): a ZooKeeper
        # write per step, on the takeover's critical path, for nothing.
        news = not self.member().says_the_same(self.published)
        if moved and news and snapshot.cluster.session is Session.CONNECTED:
            await self._publish()
        for action in decision.actions:
            self._start(action)
        if before.role is not self.state.role or before.failsafe_since != self.state.failsafe_since:
            await self._write_status(snapshot)

    async def _write_status(self, snapshot: Snapshot) -> None:
        """This node's role and failsafe in its state directory, for ``hamta cluster status``
        while ZooKeeper cannot be read."""
        now, wall = self.clock(), self.wall()
        since = self.state.failsafe_since
        status = {
            "node": self.policy.node,
            "role": self.state.role.value,
            "epoch": self.state.epoch,
            "session": snapshot.cluster.session.value,
            "failsafe_since": None if since is None else round(wall - (now - since), 3),
            "written": round(wall, 3),
        }
        data = json.dumps(status).encode() + b"\n"
        try:
            await asyncio.to_thread(write_durably, self.config.agent.state_dir, LOCAL_STATUS, data)
        except OSError as exc:
            self.log.warning("StatusNotWritten", error=str(exc))

    def _note_ride_out(self, snapshot: Snapshot) -> None:
        """One line when the active node begins to serve on through a suspended session (no
        decision line says so: nothing changes), one when that ends, back or demoting."""
        now = self.clock()
        due = self.demotion_due
        suspended = snapshot.cluster.session is Session.SUSPENDED
        riding = suspended and due is not None and due > now
        if riding and self.riding_since is None:
            self.riding_since = now
            deadline = snapshot.cluster.session_deadline or now
            self.log.warning(
                "SessionSuspended",
                serving_on=True,
                session_left=round(deadline - now, 3),
                demotes_in=round((due or now) - now, 3),
            )
        elif not riding and self.riding_since is not None:
            back = snapshot.cluster.session is Session.CONNECTED
            self.log.info(
                "SessionResumed" if back else "SessionGivenUp",
                seconds=round(now - self.riding_since, 3),
            )
            self.riding_since = None

    async def _publish(self) -> None:
        if self.coordinator.session is not Session.CONNECTED:
            return
        async with self.publishing:  # one write at a time, of the newest record
            for attempt in range(2):
                try:
                    member = self.member()
                    await asyncio.to_thread(self.coordinator.publish_member, member)
                    self.published = member
                    return
                except Exception as exc:  # the next heartbeat tries again
                    if attempt:
                        self.log.warning("HeartbeatFailed", error=str(exc))

    # ------------------------------------------------------------ the watchdog

    def _watchdog_inputs(self) -> tuple[float | None, bool, float]:
        """What the watchdog's plan needs of this agent: until when the failsafe leases cover
        this node as they stand now (renewed between decisions; None when they do not), whether
        it holds resources, and the decision loop's last turn."""
        covered = None
        if self.last_snapshot is not None and self.failsafe is not None:
            covered = failsafe_due(self.failsafe.view(self.last_snapshot), self.policy)
        return covered, holds_resources(self.state), self.progress

    def _tend_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.tend(*self._watchdog_inputs())

    async def _keep_watchdog(self) -> None:
        """Feed (and, should it have gone, restart) the watchdog; runs every quarter timeout."""
        if self.watchdog is not None:
            await self.watchdog.keep(*self._watchdog_inputs())

    async def _touch(self) -> None:
        """Every tenth of the session: leave a server that stopped answering (the named rule
        ``leave_server``), then ask the server something trivial to date the contact."""
        coordinator = self.coordinator
        silence = coordinator.silence()
        if leave_server(self.state.role, coordinator.session, silence, self.policy):
            server = coordinator.server()  # before it is gone
            if coordinator.leave_server():
                self.log.warning(
                    "ZooKeeperServerLeft",
                    server=server,
                    unanswered_for=round(silence or 0.0, 3),
                    why="the server answers nothing; the session moves to another server",
                )
        coordinator.touch()  # does not wait: the answer comes in kazoo's thread

    async def _every(self, interval: float, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` every ``interval`` until the agent exits; a failure is logged, not fatal."""
        while not self.exiting.is_set():
            try:
                await work()
            except Exception as exc:
                self.log.error("LoopError", work=getattr(work, "__name__", "?"), error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.exiting.wait(), interval)

    async def _clean_slate(self) -> None:
        """Release what a former run of this agent may have left held on this machine."""
        if self.vip is not None and await asyncio.to_thread(self.vip.held):
            await asyncio.to_thread(self.vip.remove)
            self.log.warning("Cleanup", released="virtual IP", address=self.vip.address)
        if await asyncio.to_thread(self.storage.held):
            await asyncio.to_thread(self.storage.release)
            self.log.warning("Cleanup", released="storage", storage=self.storage.describe())

    def _stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def _may_exit(self) -> bool:
        """Stopping, and holding nothing any more (or the time to hand over is up)."""
        if not self.stopping.is_set():
            return False
        done = self.state.role in (Role.STARTING, Role.PASSIVE, Role.FAILED)
        if done and self.state.step is None:
            return True
        if self.clock() > self.stop_deadline:
            self.log.error("StopTimeout", role=self.state.role.value, step=str(self.state.step))
            return True
        return False

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; an active node hands over first, then the agent exits."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop)
        loop.add_signal_handler(signal.SIGINT, self._stop)
        self.log.info("AgentStarting", zookeeper=self.config.agent.zookeeper)
        try:
            if self.watchdog is not None:
                await self.watchdog.start()
        except WatchdogError as exc:
            # A node that could not fence itself must not take over: refuse to run.
            self.log.error("AgentFailed", error=str(exc))
            raise AgentStartError(str(exc)) from None
        await self._clean_slate()
        try:
            await asyncio.to_thread(self.coordinator.start, self.config.agent.connect_timeout)
        except CoordinationError as exc:
            self.log.error("AgentFailed", error=str(exc))
            raise AgentStartError(str(exc)) from None
        if self.api is not None:
            try:
                await self.api.start()
            except OSError as exc:
                self.log.error("AgentFailed", error=f"api.listen: {exc}")
                await asyncio.to_thread(self.coordinator.stop)
                raise AgentStartError(f"api.listen {self.config.api.listen}: {exc}") from None
        agent = self.config.agent
        if self.pulses:
            await asyncio.to_thread(self.coordinator.watch_pulses, agent.peers)
        if self.channel is not None:
            await self.channel.start()
            self.log.info(
                "PeerChannelStarted", address=agent.peer_address, peers=sorted(agent.peers)
            )
        if self.heartbeats is not None:
            self.heartbeats.start()
        background = [
            asyncio.create_task(self.hooks.serve()),
            asyncio.create_task(self._every(agent.heartbeat_interval, self._ask_peers)),
            asyncio.create_task(self._watch_relay_exits()),
            asyncio.create_task(self._every(agent.heartbeat, self._publish)),
            # Dates the session's last contact with a server: the fresher, the longer an active
            # node rides out a dropped connection (a tenth of the session: 0.2 s by default).
            asyncio.create_task(self._every(agent.session_timeout / 10, self._touch)),
            asyncio.create_task(self._every(agent.health_interval, self._check_health)),
            asyncio.create_task(self._every(agent.health_interval, self._read_locations)),
            asyncio.create_task(self._every(self.config.watchdog_timeout / 4, self._keep_watchdog)),
        ]
        if self.pulses:
            background.append(asyncio.create_task(self._every(agent.peer_timeout / 4, self._pulse)))
        try:
            while True:
                self.wake.clear()
                await self._decide_once()
                if self.stopping.is_set() and self.stop_deadline == float("inf"):
                    self.log.info("AgentStopping", role=self.state.role.value)
                    self.stop_deadline = self.clock() + agent.drain_timeout + 30.0
                if self._may_exit():
                    break
                # A retry (a demotion step, the end of a lease wait) is due at a known time.
                wait = agent.health_interval
                if self.state.retry_at > self.clock():
                    wait = min(wait, self.state.retry_at - self.clock() + 0.001)
                # ... and so is the urgent demotion of a session whose contact is not renewed.
                due = self.demotion_due
                if due is not None and due > self.clock():
                    wait = min(wait, due - self.clock() + 0.001)
                # ... and the moment the leader's heartbeats would have stopped for peer_timeout.
                silent = self.silence_at
                if silent is not None and silent > self.clock():
                    wait = min(wait, silent - self.clock() + 0.001)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), wait)
        finally:
            await self._shutdown(background)
        return 0

    async def _watch_relay_exits(self) -> None:
        while True:
            await self.relay.exited.wait()
            self.relay.exited.clear()
            await self._check_health()
            self.wake.set()

    async def _shutdown(self, background: list[asyncio.Task[Any]]) -> None:
        """Stop the loops and the relay, and close the session (ephemeral znodes go at once)."""
        self.exiting.set()
        await self.hooks.drain()  # the hand-over's on_role_change and post_demote run first
        if self.heartbeats is not None:  # silent from here on, as the other loops
            await asyncio.to_thread(self.heartbeats.stop)
        for task in [*background, *self.tasks]:
            task.cancel()
        await asyncio.gather(*background, *self.tasks, return_exceptions=True)
        if self.api is not None:
            await self.api.stop()
        if self.channel is not None:
            self.channel.close()
        await self.relay.stop(self.config.agent.drain_timeout)
        await asyncio.to_thread(self.coordinator.stop)
        if self.watchdog is not None and not holds_resources(self.state):
            await self.watchdog.close()
        # Still holding (the hand-over ran out of time): the watchdog sees its input end while
        # armed when this process exits, and takes the virtual IP down.
        self.log.info("AgentStopped", role=self.state.role.value)


def run_agent(config: AgentConfig) -> int:
    """``hamta agent``: run the agent with its configuration until stopped.

    A start that cannot go on (log file, state directory, credentials, relay configuration,
    watchdog, ZooKeeper) exits 1 with one line on standard error naming the cause, also logged.
    """

    async def main() -> int:
        agent = Agent(config)
        return await agent.run()

    try:
        eventlog.configure(config.agent.log_level, config.agent.log_file)
        # kazoo's reconnection notes go to the log: stderr keeps the one line that matters.
        eventlog.route_library("kazoo")
        # Before any thread starts: each inherits it (cluster.priority).
        nice = config.agent.nice
        refused = raise_priority(nice) if nice else None
        log = get_logger(node=config.agent.node, component="agent")
        if refused:
            log.warning("AgentPriorityNotRaised", nice=nice, error=refused)
        elif nice:
            log.info("AgentPriority", nice=nice)
        state_dir = Path(config.agent.state_dir)
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AgentStartError(f"state directory {state_dir}: {exc.strerror}") from None
        return asyncio.run(main())
    except (AgentStartError, CoordinationError, ConfigError, eventlog.LogFileError) as exc:
        print(f"hamta agent: {exc}", file=sys.stderr)
        return 1
    except privileges.PrivilegeError as exc:
        print(f"hamta: {config.agent.relay_config}: {exc}", file=sys.stderr)
        return 2
