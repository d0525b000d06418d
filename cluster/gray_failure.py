"""Gray failure: the active node looks healthy to itself, but its clients cannot reach it.

A relay that answers its own agent's probe can still be unreachable from its clients: a
firewall rule, a broken route, a switch port. The monitors (``hamta monitor``, one per check
location) publish what they see in ``monitors/<location>``; the active node's agent reads them
and ``gray_sighting`` says whether enough of them see the service on the virtual IP down:

- a location counts when its verdict is fresh (published at most ``gray_verdict_max_age`` ago
  by the snapshot's wall clock) and one of its SMTP checks of the service (``service = true``)
  is "down" since this term began (``Leader.since``): a check still down from before the
  takeover saw the previous node, and must not send the service back;
- the locations that count must be at least ``gray_failure_locations`` (2 or more: one
  location alone never moves the service, it may be the one that is cut off) and a majority of
  every location that watches the service (a stale one is known, and sees nothing wrong).

``gray_refusal`` says why such a sighting must not move the service now: the pause, the
minimum interval between failovers, or no peer that may take over (``hand_over_refusal``:
passive, warm relay running, not cooling down). ``cluster.state`` turns both into the rows
``(ACTIVE, GRAY_FAILURE)`` (a planned handover: drain, drop the address, release) and
``(ACTIVE, GRAY_FAILURE_HELD)``. Standard library only, over plain data.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from cluster.decision_data import LocationVerdict, Policy, Snapshot, Switchover
from cluster.takeover import hand_over_refusal

# The kinds of check that say whether clients can hand mail to the relay.
SMTP_KINDS = frozenset({"smtp"})


class GraySighting(NamedTuple):
    """Which locations see the service down (with the checks that do), out of those known."""

    locations: tuple[str, ...]
    checks: tuple[str, ...]  # "location/check"
    known: tuple[str, ...]
    since: float  # the latest moment one of those checks went down: this episode's date

    def describe(self) -> str:
        return (
            f"{len(self.locations)} of {len(self.known)} check locations see the service down "
            f"({', '.join(self.checks)})"
        )


def location_verdict(location: str, data: bytes) -> LocationVerdict | None:
    """A monitor's published verdicts as plain data; None when they cannot be read."""
    try:
        record: Any = json.loads(data)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    at, checks = record.get("at"), record.get("checks")
    if isinstance(at, bool) or not isinstance(at, int | float) or not isinstance(checks, dict):
        return None
    watched: list[str] = []
    down: list[tuple[str, float]] = []
    for name, check in sorted(checks.items()):
        if not isinstance(check, dict) or check.get("service") is not True:
            continue
        if check.get("kind") not in SMTP_KINDS:
            continue
        watched.append(name)
        since = check.get("since")
        if check.get("state") == "down" and isinstance(since, int | float):
            down.append((name, float(since)))
    return LocationVerdict(location, float(at), tuple(watched), tuple(down))


def gray_sighting(snapshot: Snapshot, policy: Policy) -> GraySighting | None:
    """Enough check locations see this term's service down (module docstring), or None."""
    leader = snapshot.cluster.leader
    if not policy.gray_failure or leader is None or not leader.ours:
        return None
    known = [verdict for verdict in snapshot.location_verdicts if verdict.watched]
    seeing: list[str] = []
    checks: list[str] = []
    since = leader.since
    for verdict in known:
        if snapshot.wall - verdict.at > policy.gray_verdict_max_age:
            continue  # stale: the monitor may be hung, or cut off from ZooKeeper
        down = [(name, at) for name, at in verdict.down if at >= leader.since]
        if down:
            seeing.append(verdict.location)
            checks.extend(f"{verdict.location}/{name}" for name, _ in down)
            since = max(since, *(at for _, at in down))
    enough = len(seeing) >= max(policy.gray_failure_locations, 2)
    if not enough or 2 * len(seeing) <= len(known):
        return None
    known_names = tuple(v.location for v in known)
    return GraySighting(tuple(seeing), tuple(checks), known_names, since)


def gray_refusal(snapshot: Snapshot, policy: Policy) -> str | None:
    """Why a gray failure seen must not move the service now, or None."""
    cluster = snapshot.cluster
    if cluster.paused is not None:
        return f"the cluster is paused by {cluster.paused.by}"
    last = cluster.last_served
    if last is not None and snapshot.wall - last < policy.min_failover_interval:
        # Worded without the seconds left: the same reason on every tick is logged once.
        return f"the last failover was less than {policy.min_failover_interval:g}s ago"
    request = Switchover(policy.node, None, snapshot.wall)
    return hand_over_refusal(request, snapshot)
