"""The monitor's link to the cluster: who is active, the failovers, the other check locations.

With a ``[cluster]`` section the monitor reads the cluster's znodes through the agent's own
``cluster.coordination.Coordinator``, in an operator's session (it publishes no member, creates
no cluster, is never fenced): the members and the leader (nodes, roles, the active node and
since when), the history (the failovers ``hamta cluster history`` shows), and the other
monitors' verdicts. It publishes its own location's verdicts as the ephemeral znode
``monitors/<location>``: ``{"location", "at", "checks": {name: {"kind", "state", "since",
"target", "service"}}}``, on each state change and at least every ``publish_every`` seconds.

ZooKeeper's absence stops nothing: the checks go on, the link tries again every
``poll_every`` seconds, and each change of the link's state (up, down and why) is one log line.
kazoo blocks, so each call runs in a thread (``asyncio.to_thread``) with the coordinator's time
limit.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cluster.coordination import Coordinator
from cluster.coordination_layout import OPERATOR, CoordinationError, Credentials
from cluster.decision_data import ClusterView, Role, Session
from monitor.config import Check, ClusterLinkConfig, MonitorConfig
from monitor.failover_rules import (
    SEEN_FROM,
    Grace,
    Held,
    decide,
    failovers_within,
    recovered,
    seen_from,
    takeovers,
)
from monitor.incident_store import IncidentStore
from monitor.observation import Clock, Observation
from monitor.pause_window import PAUSE_WINDOW, Windows
from monitor.store import Store
from monitor.verdicts import Outcome, State, StateChange

Connect = Callable[[], Coordinator]
OnChange = Callable[[Check, StateChange], Awaitable[None]]
FAILOVERS_SHOWN = 10  # the last failovers /api/cluster lists


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    """What the link last read; ``link``: "connecting" (at first), "up", "down", "off"."""

    link: str = "off"
    detail: str = ""
    cluster: str = ""
    read_at: float | None = None
    epoch: int = 0
    active: str | None = None
    active_since: float | None = None
    nodes: tuple[dict[str, Any], ...] = ()
    failovers: tuple[dict[str, Any], ...] = ()
    locations: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    paused: Mapping[str, Any] | None = None  # ``hamta cluster pause``: {"by", "at", "reason"}

    def passive(self, node: str) -> bool:
        """Whether the cluster says ``node`` is up but not the active one (a standby).

        A node without a member znode (its agent dead, the machine off) is no standby: its
        refusals are an outage of the pair's redundancy, and stay "down".
        """
        if self.link != "up" or self.active is None or node == self.active:
            return False
        return any(entry["name"] == node and entry["state"] == "standby" for entry in self.nodes)


def cluster_view(view: ClusterView, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The nodes, their roles, the active node and the last failovers, from the agent's data."""
    leader = view.leader
    names = sorted(set(view.members) | set(view.known_nodes))
    nodes = []
    for name in names:
        member = view.members.get(name)
        active = leader is not None and leader.node == name
        role = member.role.value if member is not None else "absent"
        if active and member is not None and member.role is not Role.ACTIVE:
            role = member.role.value  # e.g. still taking over: the member says how far
        nodes.append(
            {
                "name": name,
                "role": role,
                "active": active,
                "state": "active" if active else ("standby" if member is not None else "absent"),
                "relay_ready": member.relay_ready if member is not None else False,
                "heartbeat": member.heartbeat if member is not None else None,
            }
        )
    failovers = [dict(record) for record in history][-FAILOVERS_SHOWN:]
    return {
        "epoch": view.epoch,
        "active": leader.node if leader is not None else None,
        "active_since": leader.since if leader is not None else None,
        "nodes": nodes,
        "failovers": failovers,
    }


def relabel(observation: Observation, check: Check, snapshot: ClusterSnapshot) -> Observation:
    """A failed relay check of a node the cluster says is passive: "standby", not "down"."""
    node = getattr(check, "node", None)
    if observation.outcome is not Outcome.FAILURE or node is None or not snapshot.passive(node):
        return observation
    detail = f"{node} is passive ({snapshot.active} active): {observation.detail}"
    return replace(observation, outcome=Outcome.STANDBY, detail=detail[:300])


def _pause(view: ClusterView) -> dict[str, Any] | None:
    paused = view.paused
    return None if paused is None else {"by": paused.by, "at": paused.at, "reason": paused.reason}


def _target(check: Check) -> str:
    for name in ("url", "host", "endpoint", "domain"):
        value = getattr(check, name, None)
        if value:
            return f"{value}:{check.port}" if name == "host" and hasattr(check, "port") else value
    return ""


class ClusterLink:
    """Reads the cluster and the other locations; publishes this location's verdicts."""

    def __init__(
        self,
        config: ClusterLinkConfig,
        location: str,
        checks: Sequence[Check],
        store: Store,
        log: Any,
        clock: Clock,
        *,
        then: OnChange | None = None,
        connect: Connect | None = None,
        windows: Windows | None = None,
    ) -> None:
        self.config = config
        self.location = location
        self.checks = {check.name: check for check in checks}
        self.store = store
        self.log = log
        self.clock = clock
        self.connect = connect or self._coordinator
        self.then = then  # the alerting's on_change: told of every change but failovers
        # The alerting's windows: the pause read here is a window of the cluster's checks.
        self.windows = windows if windows is not None else Windows((), checks)
        self.incidents = IncidentStore(store)
        # Service checks down under the grace (monitor.failover_rules): the interval, and the
        # changes not yet passed on to the alerting.
        self._held: dict[str, tuple[Held, list[StateChange]]] = {}
        self._noted: set[tuple[int, str]] = set()  # (incident, note) already in its timeline
        self.snapshot = ClusterSnapshot(link="connecting", detail="", cluster=config.cluster)
        self._coordinator_now: Coordinator | None = None
        self._wake = asyncio.Event()
        self._published: tuple[bytes, float] | None = None  # the checks' part, and when

    def _coordinator(self) -> Coordinator:
        config = self.config
        credentials = Credentials.from_file(config.credentials) if config.credentials else None
        return Coordinator(
            config.zookeeper,
            config.cluster,
            OPERATOR,
            session_timeout=config.session_timeout,
            credentials=credentials,
            readers=(config.fleet_reader,) if config.fleet_reader else (),
            wall=self.clock.time,
            clock=self.clock.monotonic,
        )

    async def on_change(self, check: Check, change: StateChange) -> None:
        """The engine's hook: publish soon; tell the alerting, but for a failover's refusals."""
        self._wake.set()
        held = self._held.get(check.name)
        if held is not None:
            interval, changes = held
            changes.append(change)
            if interval.up_at is None and recovered(change.current):
                self._held[check.name] = (Held(interval.down_at, change.at), changes)
            elif not recovered(change.current):
                self._held[check.name] = (Held(interval.down_at), changes)
            return
        grace = self.config.failover_grace
        service = getattr(check, "service", False)
        if service and grace > 0 and change.current is State.DOWN and self.snapshot.link == "up":
            self._held[check.name] = (Held(change.at), [change])
            return
        if self.then is not None:
            await self.then(check, change)

    async def _settle(self, now: float) -> None:
        """Decide the held down intervals: a failover event, or the outage passed on."""
        times = takeovers(self.snapshot.failovers, self.snapshot.active_since)
        for name, (interval, changes) in list(self._held.items()):
            verdict = decide(
                interval, now, self.config.failover_grace, 2 * self.config.poll_every, times
            )
            if verdict is Grace.HOLD:
                continue
            del self._held[name]
            if verdict is Grace.FAILOVER:
                self.log.info(
                    "FailoverSeen",
                    check=name,
                    down_at=interval.down_at,
                    up_at=interval.up_at,
                    refused=round((interval.up_at or now) - interval.down_at, 3),
                    active=self.snapshot.active,
                    location=self.location,
                )
                continue
            check = self.checks[name]
            for change in changes:
                if self.then is not None:
                    await self.then(check, change)

    async def _annotate(self, now: float) -> None:
        """Each open incident's timeline: the failovers inside it, the locations that saw it."""
        snapshot = self.snapshot
        rows = await self.incidents.open_incidents()
        # What was noted of incidents since resolved is forgotten: the set stays small.
        self._noted = {key for key in self._noted if key[0] in {row.incident.id for row in rows}}
        for row in rows:
            incident = row.incident
            notes = []
            for record in failovers_within(snapshot.failovers, incident.opened, None):
                text = (
                    f"failover to {record.get('node')} from {record.get('previous')} "
                    f"(epoch {record.get('epoch')}, {record.get('reason')})"
                )
                notes.append((f"failover {record.get('at')}", "failover", text))
            for where in seen_from(incident.check, snapshot.locations, self.location):
                notes.append((f"seen {where}", "seen-from", f"{SEEN_FROM}{where}"))
            for key, event, text in notes:
                if (incident.id, key) not in self._noted:
                    self._noted.add((incident.id, key))
                    await self.incidents.note(incident.id, now, event, text)

    def _follow_pause(self, now: float) -> None:
        """The pause as a maintenance window (monitor.pause_window); one line when it changes."""
        paused = self.snapshot.paused
        change = self.windows.follow(paused, now)
        if change == "opened" and paused is not None:
            self.log.warning(
                "MaintenanceFromPause",
                window=PAUSE_WINDOW,
                by=paused.get("by"),
                reason=paused.get("reason"),
                since=paused.get("at"),
                checks=list(self.windows.covered),
                location=self.location,
            )
        elif change == "closed":
            self.log.info("MaintenanceFromPauseEnded", window=PAUSE_WINDOW, location=self.location)

    def relabel(self, check: Check, observation: Observation) -> Observation:
        return relabel(observation, check, self.snapshot)

    def _set(self, snapshot: ClusterSnapshot) -> None:
        before = self.snapshot
        # One line per change of the link's state: a ZooKeeper away for an hour whose error
        # text varies is one "down", not a line per round.
        if before.link != snapshot.link:
            method = self.log.info if snapshot.link == "up" else self.log.warning
            method(
                "ClusterLinkChanged",
                link=snapshot.link,
                previous=before.link,
                detail=snapshot.detail,
                zookeeper=self.config.zookeeper,
                location=self.location,
            )
        if before.active != snapshot.active and snapshot.link == "up":
            self.log.info("ClusterActiveChanged", active=snapshot.active, previous=before.active)
        self.snapshot = snapshot

    async def _verdicts(self) -> dict[str, Any]:
        rows = await self.store.states()
        checks: dict[str, Any] = {}
        for name, check in self.checks.items():
            row = rows.get(name)
            state = row.state if row is not None else None
            entry: dict[str, Any] = {
                "kind": check.kind,
                "state": state.state.value if state else "unknown",
                "since": state.since if state else None,
                "target": _target(check),
            }
            if getattr(check, "service", False):
                entry["service"] = True
            checks[name] = entry
        return checks

    def _read(
        self, coordinator: Coordinator
    ) -> tuple[ClusterView, list[dict[str, Any]], dict[str, bytes]]:
        view = coordinator.view()
        if view.session is not Session.CONNECTED:
            raise CoordinationError(f"ZooKeeper session {view.session.value}")
        return view, coordinator.history(), coordinator.monitor_states()

    def _locations(self, raw: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for name, data in raw.items():
            try:
                record = json.loads(data)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("checks"), dict):
                self.log.warning("MonitorZnodeMalformed", location=name)
                continue
            found[name] = record
        return found

    async def step(self) -> None:
        """One round: connect if need be, read the cluster, publish when due."""
        now = self.clock.time()
        coordinator = self._coordinator_now
        try:
            if coordinator is None:
                coordinator = self.connect()
                try:
                    await asyncio.to_thread(coordinator.start, self.config.connect_timeout)
                except BaseException:
                    await asyncio.to_thread(coordinator.stop)
                    raise
                self._coordinator_now = coordinator
            view, history, raw = await asyncio.to_thread(self._read, coordinator)
            checks = await self._verdicts()
            body = json.dumps(checks, sort_keys=True).encode()
            last = self._published
            if last is None or last[0] != body or now - last[1] >= self.config.publish_every:
                record = {"location": self.location, "at": now, "checks": checks}
                data = json.dumps(record, sort_keys=True).encode()
                await asyncio.to_thread(coordinator.publish_monitor, self.location, data)
                self._published = (body, now)
                raw = {**raw, self.location: data}
        except (CoordinationError, OSError, ValueError) as exc:
            # A started coordinator reconnects by itself (kazoo, a new session after a lost
            # one); a failed start was stopped above and the next round builds another.
            self._published = None  # the znode may be gone with the session: publish anew
            self._set(replace(self.snapshot, link="down", detail=str(exc)[:300]))
            await self._settle(now)  # without news of a takeover: an outage after the grace
            return
        shown = cluster_view(view, history)
        self._set(
            ClusterSnapshot(
                link="up",
                detail="",
                cluster=self.config.cluster,
                read_at=now,
                epoch=shown["epoch"],
                active=shown["active"],
                active_since=shown["active_since"],
                nodes=tuple(shown["nodes"]),
                failovers=tuple(shown["failovers"]),
                locations=self._locations(raw),
                paused=_pause(view),
            )
        )
        self._follow_pause(now)
        await self._settle(now)
        await self._annotate(now)

    async def run(self) -> None:
        """Until cancelled: a round every ``poll_every`` seconds, or at once on a state change."""
        try:
            while True:
                self._wake.clear()  # before the round: a change during it makes another
                await self.step()
                waiter = asyncio.create_task(self._wake.wait())
                try:
                    await asyncio.wait({waiter}, timeout=self.config.poll_every)
                finally:
                    waiter.cancel()
        finally:
            await self.close()

    async def close(self) -> None:
        """End the ZooKeeper session: this location's znode goes with it."""
        if self._coordinator_now is not None:
            coordinator, self._coordinator_now = self._coordinator_now, None
            await asyncio.to_thread(coordinator.stop)


def cluster_link(
    config: MonitorConfig,
    store: Store,
    log: Any,
    clock: Clock,
    then: OnChange | None,
    windows: Windows | None = None,
) -> ClusterLink | None:
    """The link of a monitor.toml with a ``[cluster]`` section; None without one."""
    if config.cluster is None:
        return None
    return ClusterLink(
        config.cluster,
        config.location,
        config.checks,
        store,
        log,
        clock,
        then=then,
        windows=windows,
    )
