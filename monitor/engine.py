"""The engine: each check run at its interval, its verdict taken, everything recorded.

One task per check, so that a check that hangs (up to its timeout) or fails holds only itself.
Scheduling reads the injected clock and waits with the injected ``sleep`` (asyncio.sleep in
production): a run that overran its interval skips the slots it missed instead of running
back to back (``next_due``). Each observation and state change goes to the store; each state
change and each DNS change is one JSON log line; the metrics follow the last observation.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hamta.dkim_signing import SigningKey
from monitor.checks import run_check
from monitor.config import Check
from monitor.metrics import MonitorMetrics
from monitor.observation import CheckContext, Clock, Observation
from monitor.store import Store
from monitor.verdicts import CheckState, StateChange, Thresholds, next_state

Runner = Callable[[Check, CheckContext, Clock], Awaitable[Observation]]
# Told of each state change once it is recorded (monitor.alerting.Alerting.on_change).
OnChange = Callable[[Check, StateChange], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]
# What the cluster adds to an observation before its verdict (monitor.cluster_link: standby).
Relabel = Callable[[Check, Observation], Observation]
# How often old observations are pruned; retention is counted in days, this need not be exact.
PRUNE_EVERY = 3600.0
# How often the engine leaves a sign of life in the store: a monitor that dies counts at most
# this long of its last states as known before the gap until its next start is "unknown".
ALIVE_EVERY = 60.0


def next_due(due: float, interval: float, now: float) -> float:
    """The next slot after ``due`` on the check's grid that is not already past at ``now``."""
    following = due + interval
    if following > now:
        return following
    return due + interval * (math.floor((now - due) / interval) + 1)


def thresholds(check: Check) -> Thresholds:
    return Thresholds(check.failure_threshold, check.success_threshold, check.degraded_after)


@dataclass(frozen=True, slots=True)
class Result:
    observation: Observation
    state: CheckState
    change: StateChange | None


class Engine:
    """Runs the checks; the collaborators are all given here (see monitor.commands)."""

    def __init__(
        self,
        checks: Sequence[Check],
        store: Store,
        metrics: MonitorMetrics,
        log: Any,
        clock: Clock,
        *,
        nameservers: tuple[str, ...] = (),
        dkim_keys: tuple[SigningKey, ...] = (),
        retention: float = 30 * 86400.0,
        runner: Runner = run_check,
        sleep: Sleep = asyncio.sleep,
        on_change: OnChange | None = None,
        relabel: Relabel | None = None,
    ) -> None:
        self.checks = list(checks)
        self.store = store
        self.metrics = metrics
        self.log = log
        self.clock = clock
        self.nameservers = nameservers
        self.dkim_keys = dkim_keys
        self.retention = retention
        self.runner = runner
        self.sleep = sleep
        self.on_change = on_change
        self.relabel = relabel
        self.states: dict[str, CheckState] = {}

    async def load(self) -> None:
        """Take up each check's state where the last run of the monitor left it."""
        rows = await self.store.states()
        names = {check.name for check in self.checks}
        self.states = {name: row.state for name, row in rows.items() if name in names}

    async def run_once(self, check: Check) -> Result:
        """Run ``check`` now, take its verdict and record both."""
        known = await self.store.answers(check.name) if check.kind == "dns" else {}
        context = CheckContext(self.clock.time(), self.nameservers, self.dkim_keys, known)
        observation = await self.runner(check, context, self.clock)
        if self.relabel is not None:
            observation = self.relabel(check, observation)
        previous = self.states.get(check.name, CheckState())
        state, change = next_state(
            check.name,
            previous,
            observation.outcome,
            observation.seconds,
            observation.at,
            observation.detail,
            thresholds(check),
        )
        await self.store.record(observation, state, change)
        self.metrics.observe(check, observation, state)
        self._log(check, observation, change)
        # Shown only once recorded and logged: whoever reads ``states`` (and may stop the
        # monitor on what it sees) never sees a change the store and the log do not hold.
        self.states[check.name] = state
        if change is not None and self.on_change is not None:
            await self.on_change(check, change)
        return Result(observation, state, change)

    def _log(self, check: Check, observation: Observation, change: StateChange | None) -> None:
        for line in observation.changes:
            self.log.warning("DnsAnswerChanged", check=check.name, change=line)
        if change is not None:
            # A recovery is news too, but not a problem: info, not warning.
            method = (
                self.log.info if change.current.value in ("up", "unknown") else self.log.warning
            )
            method(
                "CheckStateChanged",
                check=check.name,
                kind=check.kind,
                previous=change.previous.value,
                current=change.current.value,
                detail=change.detail,
                seconds=observation.seconds,
            )

    async def _loop(self, check: Check) -> None:
        due = self.clock.monotonic()
        while True:
            await self.run_once(check)
            due = next_due(due, check.interval, self.clock.monotonic())
            await self.sleep(max(0.0, due - self.clock.monotonic()))

    async def _prune_loop(self) -> None:
        while True:
            gone = await self.store.prune(self.clock.time() - self.retention)
            if gone:
                self.log.info("MonitorPruned", rows=gone)
            await self.sleep(PRUNE_EVERY)

    async def _alive_loop(self, run: int) -> None:
        while True:
            await self.sleep(ALIVE_EVERY)
            await self.store.alive(run, self.clock.time())

    async def run(self) -> None:
        """Run every check until cancelled."""
        await self.load()
        run = await self.store.start_run(self.clock.time())
        async with asyncio.TaskGroup() as group:
            group.create_task(self._alive_loop(run))
            group.create_task(self._prune_loop())
            for check in self.checks:
                group.create_task(self._loop(check), name=f"check {check.name}")
