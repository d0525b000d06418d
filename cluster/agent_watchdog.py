"""The agent's side of its watchdog process (``fencing.watchdog``): started with the agent,
handed each new ZooKeeper session, armed, disarmed, fed or starved as
``cluster.watchdog_policy.plan_watchdog`` says, and started again should it go.

Nothing here decides: the plan is ``plan_watchdog``'s, over what the agent tells each tick
(whether its failsafe leases cover it, whether it holds resources, when its loop last turned).
This class only does the I/O and keeps what the next plan needs (armed or not, the relay's
process group it watches, the session it was handed, since when holding is unsafe).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from cluster.config import AgentConfig
from cluster.coordination import Coordinator
from cluster.decision_data import Session
from cluster.relayproc import RelayProcess
from cluster.vip import VipSet, VirtualIp
from cluster.watchdog_policy import WatchdogLimits, plan_watchdog
from fencing.watchdog import Watchdog, WatchdogError
from fencing.zk_session import ZkSession


class WatchdogKeeper:
    """One agent's watchdog: its process, and the state the next plan is made from."""

    def __init__(
        self,
        config: AgentConfig,
        coordinator: Coordinator,
        relay: RelayProcess,
        vip: VirtualIp | VipSet | None,
        log: Any,
        clock: Callable[[], float],
    ) -> None:
        self.timeout = config.watchdog_timeout
        self._device = config.watchdog.device
        self._start_timeout = config.watchdog.start_timeout
        self._log_file = config.agent.log_file
        self._coordinator = coordinator
        self._relay = relay
        self._vip = vip
        self._log = log
        self._clock = clock
        # When to feed it is cluster.watchdog_policy's to say; these are its inputs.
        self._limits = WatchdogLimits.for_agent(
            config.agent.session_timeout, config.agent.health_interval, config.fencing.lease_grace
        )
        self._watchdog = Watchdog()
        self._armed = False
        self._watched_pgid: int | None = None
        self._handed: ZkSession | None = None  # the session the watchdog would end
        self.unsafe_since: float | None = None  # holding without a ZooKeeper session since

    async def start(self) -> None:
        """Start the watchdog process (WatchdogError: it could not be started)."""
        # Its JSON lines join the agent's own log (appends of whole lines do not interleave).
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        stderr = os.open(self._log_file, flags, 0o644) if self._log_file else None
        device = str(self._device) if self._device else None
        try:
            await self._watchdog.start(
                agent_pid=os.getpid(), device=device, stderr=stderr, timeout=self._start_timeout
            )
        finally:
            if stderr is not None:
                os.close(stderr)
        self._log.info(
            "WatchdogStarted", watchdog_pid=self._watchdog.pid, timeout=self.timeout, device=device
        )

    async def keep(self, covered_until: float | None, holds: bool, progress: float) -> None:
        """Restart the watchdog should it have gone, then ``tend`` it; every quarter timeout."""
        watchdog = self._watchdog
        if watchdog.pid is None or watchdog.returncode is not None:
            # Killed by someone, or a restart failed: this node is unprotected until it runs.
            self._log.error("WatchdogRestarting", status=watchdog.returncode)
            self._watchdog = Watchdog()
            self._armed = False
            self._handed = None
            try:
                await self.start()
            except WatchdogError as exc:
                self._log.error("WatchdogLost", error=str(exc), armed=False)
                return
        self.tend(covered_until, holds, progress)

    def tend(self, covered_until: float | None, holds: bool, progress: float) -> None:
        """Arm, disarm, feed or starve the watchdog as ``plan_watchdog`` says.

        ``covered_until``: until when the failsafe leases cover this node, as they stand now
        (None: they do not); ``holds``: this node holds resources; ``progress``: the decision
        loop's last turn, on the agent's clock."""
        watchdog = self._watchdog
        if watchdog.returncode is not None:
            return
        self._hand_session(watchdog)
        now = self._clock()
        plan = plan_watchdog(
            covered_until=covered_until,
            holds=holds,
            armed=self._armed,
            connected=self._coordinator.session is Session.CONNECTED,
            now=now,
            progress=progress,
            unsafe_since=self.unsafe_since,
            limits=self._limits,
        )
        self.unsafe_since = plan.unsafe_since
        try:
            if plan.arm:
                self._arm(watchdog)
            elif plan.disarm:
                watchdog.disarm()
                self._armed = False
                self._log.info("WatchdogDisarmed")
            if not self._armed:
                return
            pgid = self._relay.pid if self._relay.running else None
            if pgid != self._watched_pgid:  # restarted, or gone: never a stale group
                watchdog.relay(pgid)
                self._watched_pgid = pgid
            if plan.feed:
                watchdog.feed()
            elif plan.starve:
                seconds = round(now - (plan.unsafe_since or now), 3)
                self._log.error(
                    "WatchdogStarved", why="still holding without a session", seconds=seconds
                )
        except WatchdogError as exc:
            self._log.error("WatchdogLost", error=str(exc), armed=self._armed)

    async def close(self) -> None:
        """End the watchdog process (only once this node holds nothing: an armed watchdog that
        sees its input end takes the virtual IP down)."""
        await self._watchdog.close()

    def _arm(self, watchdog: Watchdog) -> None:
        vip = self._vip
        self._watched_pgid = self._relay.pid if self._relay.running else None
        watchdog.arm(
            self.timeout,
            self._watched_pgid,
            vip.address if vip is not None else None,
            vip.interface if vip is not None else None,
            vip.others() if isinstance(vip, VipSet) else (),
        )
        self._armed = True
        self._log.info("WatchdogArmed", timeout=self.timeout, relay_pgid=self._watched_pgid)

    def _hand_session(self, watchdog: Watchdog) -> None:
        """Give the watchdog this agent's ZooKeeper session, whenever it is a new one, so that it
        can end it should the agent die (its password is never logged)."""
        handle = self._coordinator.session_handle()
        if handle is None or handle == self._handed:
            return
        try:
            watchdog.session(handle)
        except WatchdogError as exc:
            self._log.error("WatchdogLost", error=str(exc), armed=self._armed)
            return
        self._handed = handle
        self._log.info("WatchdogSession", session_id=handle.label)
