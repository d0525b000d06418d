"""When the agent arms, feeds or starves its self-fencing watchdog: a pure decision over plain data.

The watchdog (``fencing.watchdog``) kills the relay's process group and drops the virtual IP
when its feeding stops. It must be armed exactly while the node may hold something
(``cluster.takeover.holds_resources``), and fed only while the agent is fit to hold it:

- the decision loop turned lately (``progress_limit``): a loop stuck in an await stops the
  feeding too;
- and, without a ZooKeeper session, not for longer than ``release_deadline``: a node still
  holding by then has a demotion that is stuck (a busy unmount, a hung step), and the watchdog
  must fire before the peer's lease rule lets it take over unfenced.
- A node serving in failsafe (``cluster.failsafe``) is as safe as a connected one while its
  peers' leases cover it (``covered_until``: the moment its failsafe demotion is due): it is
  fed. From that moment it counts as holding without a session, so the watchdog fires within
  ``release_deadline`` plus its timeout, before the peer's own rule lets it take over unfenced
  (the last lease it granted, plus ``lease_grace``: the same arithmetic as a session's end).

Both limits derive from the agent's configuration here, so that the arithmetic that keeps the
firing ahead of the peer's takeover sits in one place: the bound on progress plus the
watchdog's timeout stays below the session timeout plus the lease grace.

Standard library only, like ``cluster.state``: the agent does the I/O (arm, disarm, feed, the
log lines) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WatchdogLimits:
    """How long the agent may go without progress, or hold without a session, and still feed."""

    progress_limit: float
    release_deadline: float

    @classmethod
    def for_agent(
        cls, session_timeout: float, health_interval: float, lease_grace: float
    ) -> WatchdogLimits:
        """The limits of an agent with this ZooKeeper session timeout, health check interval and
        lease grace. kazoo notices a silent server after two thirds of the session timeout; the
        release must be done within the last third and half the grace."""
        return cls(
            progress_limit=session_timeout + health_interval,
            release_deadline=session_timeout / 3 + lease_grace / 2,
        )


@dataclass(frozen=True, slots=True)
class WatchdogPlan:
    """What the agent does with its watchdog after a decision."""

    arm: bool = False  # it holds something now and the watchdog is not armed
    disarm: bool = False  # it holds nothing any more and the watchdog is armed
    feed: bool = False
    starve: bool = False  # holding without a session past the deadline: let it fire
    unsafe_since: float | None = None  # since when it has held without a session


def plan_watchdog(
    *,
    holds: bool,
    armed: bool,
    connected: bool,
    now: float,
    progress: float,
    unsafe_since: float | None,
    limits: WatchdogLimits,
    covered_until: float | None = None,
) -> WatchdogPlan:
    """What to do with the watchdog at monotonic time ``now``.

    ``holds``: the node may hold the spool, the virtual IP or a serving relay; ``armed``: the
    watchdog is armed; ``connected``: the ZooKeeper session is; ``progress``: the decision
    loop's last turn; ``unsafe_since``: the plan before's; ``covered_until``: until when the
    failsafe leases cover it without a session (None: they do not).
    """
    if not holds:
        return WatchdogPlan(disarm=armed)
    covered = covered_until is not None and now < covered_until
    since = None
    if not connected and not covered:
        # A lease that ran out counts from its end: the decision may see it a little late.
        lapsed = min(now, covered_until) if covered_until is not None else now
        since = lapsed if unsafe_since is None else unsafe_since
    stuck = since is not None and now - since > limits.release_deadline
    fed = not stuck and now - progress < limits.progress_limit
    return WatchdogPlan(arm=not armed, feed=fed, starve=stuck, unsafe_since=since)
