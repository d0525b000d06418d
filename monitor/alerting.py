"""Alerting: state changes become incidents; open incidents escalate; notifications go out.

The rules are monitor.incidents and monitor.maintenance (pure); this module applies them to the
store and hands notifications to the dispatcher, which never waits (monitor.notifiers.dispatch),
so the engine's ``on_change`` costs a few SQLite writes and no network. Escalation runs at each
``tick`` over the open incidents read from the store, so an acknowledgement written by another
process is obeyed at the next tick. One JSON log line per incident event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import aiohttp

from monitor.config import Check, MonitorConfig
from monitor.incident_store import IncidentRow, IncidentStore
from monitor.incidents import (
    Action,
    Step,
    due_steps,
    on_change,
    resolve_targets,
    severity_of,
    step_targets,
)
from monitor.maintenance import Window, active_window
from monitor.notifiers import Notification
from monitor.notifiers.dispatch import Dispatcher, OnResult
from monitor.notifiers.senders import build_senders
from monitor.observation import Clock
from monitor.pause_window import Windows
from monitor.store import Store
from monitor.verdicts import StateChange

Sleep = Callable[[float], Awaitable[None]]
PRUNE_EVERY = 3600.0


def timeline_recorder(incidents: IncidentStore, clock: Clock) -> OnResult:
    """The dispatcher's ``on_result``: each notification's end, a line of its incident's
    timeline (made before the Alerting, which needs the dispatcher)."""

    async def record(
        notifier: str, note: Notification, delivered: bool, attempts: int, error: str
    ) -> None:
        event = "notified" if delivered else "notification failed"
        detail = f"{notifier} ({note.event}, {attempts} attempt{'s' * (attempts != 1)})"
        await incidents.note(
            note.incident, clock.time(), event, f"{detail}: {error}" if error else detail
        )

    return record


class Alerting:
    def __init__(
        self,
        checks: Sequence[Check],
        policy: Sequence[Step],
        windows: Sequence[Window],
        incidents: IncidentStore,
        dispatcher: Dispatcher,
        log: Any,
        clock: Clock,
        *,
        tick: float = 1.0,
        retention: float = 30 * 86400.0,
        monitor: str = "hamta-monitor",
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.kinds = {check.name: check.kind for check in checks}
        self.policy = tuple(policy)
        # Live: the configured windows and the cluster's pause (monitor.pause_window).
        self.windows = Windows.of(windows)
        self.incidents = incidents
        self.dispatcher = dispatcher
        self.log = log
        self.clock = clock
        self.tick = tick
        self.retention = retention
        self.monitor = monitor
        self.sleep = sleep
        # Acknowledgements already logged (they may be written by another process).
        self._acks_seen: set[int] | None = None
        # One escalation at a time: the tick's pass and a newly opened incident's first one
        # would otherwise both read an incident before either recorded its step, and both fire
        # it (the notifiers told twice; under load, seen as two IncidentInMaintenance lines).
        self._escalating = asyncio.Lock()

    # ------------------------------------------------------------ state changes

    async def on_change(self, check: Check, change: StateChange) -> None:
        """The engine's hook: open, follow or resolve the check's incident."""
        current = await self.incidents.open_for(check.name)
        action = on_change(current.incident if current else None, change)
        severity = severity_of(change.current)
        if action is Action.OPEN and severity is not None:
            row = await self.incidents.open(
                check.name, check.kind, severity, change.current, change.at, change.detail
            )
            self._log_incident("IncidentOpened", row, detail=change.detail)
            async with self._escalating:
                # Read again: a tick may have escalated it while this waited for the lock.
                fresh = await self.incidents.open_for(check.name)
                if fresh is not None and fresh.incident.id == row.incident.id:
                    await self._escalate(fresh, self.clock.time())
        elif action is Action.UPDATE and current is not None and severity is not None:
            await self.incidents.update(
                current.incident.id, severity, change.current, change.at, change.detail
            )
            self.log.warning(
                "IncidentUpdated",
                incident=current.incident.id,
                check=check.name,
                severity=severity.value,
                state=change.current.value,
                detail=change.detail,
            )
        elif action is Action.RESOLVE and current is not None:
            await self._resolve(current, change.at, change.current.value, change.detail)

    async def _resolve(self, row: IncidentRow, at: float, state: str, detail: str) -> None:
        await self.incidents.resolve(row.incident.id, at, detail)
        targets = resolve_targets(row.incident)
        self._log_incident("IncidentResolved", row, notifiers=list(targets), detail=detail)
        note = self._notification(row, "resolve", at, None, state, detail)
        for name in targets:
            self.dispatcher.submit(name, note)

    # --------------------------------------------------------------- escalation

    async def escalate_all(self) -> None:
        """One tick: every open incident's due steps fire (acknowledged ones: none)."""
        async with self._escalating:
            await self._escalate_open(self.clock.time())

    async def _escalate_open(self, now: float) -> None:
        rows = await self.incidents.open_incidents()
        if self._acks_seen is None:  # at start: those acknowledged before are old news
            self._acks_seen = {r.incident.id for r in rows if r.incident.acked_by}
        for row in rows:
            if row.incident.check not in self.kinds:
                # Its check was taken out of the configuration: it will never recover to say so.
                await self._resolve(row, now, "up", "check no longer configured")
                continue
            await self._escalate(row, now)

    async def _escalate(self, row: IncidentRow, now: float) -> None:
        incident = row.incident
        if incident.acked_by is not None:
            if self._acks_seen is not None and incident.id not in self._acks_seen:
                self._acks_seen.add(incident.id)
                self._log_incident("IncidentAcknowledged", row, by=incident.acked_by)
            return
        window = active_window(self.windows, incident.check, now)
        if window is not None and row.maintenance != window.name:
            await self.incidents.in_maintenance(incident.id, window.name, now)
            self._log_incident("IncidentInMaintenance", row, window=window.name)
        for index in due_steps(incident, self.policy, now, window is not None):
            note = self._notification(row, "trigger", now, index + 1)
            # The step is spent either way; a notifier whose queue was full (logged by the
            # dispatcher) is not counted as told, so it is not sent the resolve either.
            targets = step_targets(incident, self.policy[index])
            told = tuple(n for n in targets if self.dispatcher.submit(n, note))
            await self.incidents.fire_step(incident.id, index, told, now)
            incident = replace(incident, notified=incident.notified | set(told))
            self._log_incident("IncidentEscalated", row, step=index + 1, notifiers=list(told))

    async def run(self) -> None:
        """Escalate at every tick; forget old resolved incidents every hour. Until cancelled."""
        last_prune = float("-inf")
        while True:
            await self.escalate_all()
            now = self.clock.monotonic()
            if now - last_prune >= PRUNE_EVERY:
                last_prune = now
                await self.incidents.prune(self.clock.time() - self.retention)
            await self.sleep(self.tick)

    # ------------------------------------------------------------------ helpers

    def _notification(
        self,
        row: IncidentRow,
        event: str,
        at: float,
        step: int | None,
        state: str | None = None,
        detail: str | None = None,
    ) -> Notification:
        i = row.incident
        return Notification(
            event,
            i.id,
            i.check,
            row.kind,
            i.severity.value,
            state or i.state.value,
            row.detail if detail is None else detail,
            i.opened,
            at,
            step,
            self.monitor,
        )

    def _log_incident(self, event: str, row: IncidentRow, **extra: Any) -> None:
        i = row.incident
        method = (
            self.log.info
            if event in ("IncidentResolved", "IncidentAcknowledged")
            else (self.log.warning)
        )
        method(
            event,
            incident=i.id,
            check=i.check,
            severity=i.severity.value,
            state=i.state.value,
            **extra,
        )


def assemble(
    config: MonitorConfig,
    store: Store,
    session: aiohttp.ClientSession,
    log: Any,
    clock: Clock,
    monitor: str,
) -> tuple[Alerting, Dispatcher]:
    """The alerting of ``config``, built in one place (``hamta monitor run`` and the tests)."""
    incidents = IncidentStore(store)
    dispatcher = Dispatcher(
        build_senders(config.notifiers, session),
        log,
        timeline_recorder(incidents, clock),
        queue=config.alerting.queue,
        attempts=config.alerting.attempts,
        retry_wait=config.alerting.retry_wait,
        retry_max_wait=config.alerting.retry_max_wait,
    )
    alerting = Alerting(
        config.checks,
        [Step(step.after, tuple(step.notifiers)) for step in config.escalation],
        Windows([window.window() for window in config.maintenance], config.checks),
        incidents,
        dispatcher,
        log,
        clock,
        tick=config.alerting.tick,
        retention=config.store.retention,
        monitor=monitor,
    )
    return alerting, dispatcher
