"""A failover seen from outside: an event, not an outage. Pure: plain data in and out.

The rule (``[cluster] failover_grace``, G): when a service check (``service = true``, the
cluster's address) goes down, its incident is held back. It becomes a failover event, and no
incident at all, when the check is serving again within G of going down and a takeover of the
cluster (a leader's ``since`` or a history record's ``at``) falls within the down interval
widened by G on both sides: the takeover is stamped when leadership is taken, which may be a
moment before the check notices the refusals, and the history record when the promotion is
published, which may be a moment after. Otherwise (still down G after it went down, or back
without a takeover once the link has read the cluster again) the held changes go to the
alerting as they happened, with their own times: a real outage opens its incident, late by G
at most.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from monitor.verdicts import SERVING, State


class Grace(StrEnum):
    HOLD = "hold"  # not decided yet
    FAILOVER = "failover"  # an event: no incident
    OUTAGE = "outage"  # release the held changes to the alerting


@dataclass(frozen=True, slots=True)
class Held:
    """A service check's down interval under the grace: when it went down, when it came back."""

    down_at: float
    up_at: float | None = None


def takeovers(failovers: Iterable[Mapping[str, Any]], active_since: float | None) -> list[float]:
    """The times the cluster changed hands: each history record's, and the leader's since."""
    times = [
        float(record["at"]) for record in failovers if isinstance(record.get("at"), int | float)
    ]
    if active_since is not None:
        times.append(active_since)
    return sorted(times)


def decide(held: Held, now: float, grace: float, settle: float, times: Sequence[float]) -> Grace:
    """What a held down interval is at ``now``; ``settle``: how long after the recovery the link
    may take to read the takeover (a round of the link's reads)."""
    if held.up_at is None:
        return Grace.OUTAGE if now - held.down_at > grace else Grace.HOLD
    if held.up_at - held.down_at > grace:
        return Grace.OUTAGE
    low, high = held.down_at - grace, held.up_at + grace
    if any(low <= at <= high for at in times):
        return Grace.FAILOVER
    return Grace.OUTAGE if now >= held.up_at + settle else Grace.HOLD


def recovered(state: State) -> bool:
    return state in SERVING


def failovers_within(
    failovers: Iterable[Mapping[str, Any]], start: float, end: float | None
) -> list[Mapping[str, Any]]:
    """The failover records whose time falls inside an incident (open: up to now)."""
    return [
        record
        for record in failovers
        if isinstance(record.get("at"), int | float)
        and start <= float(record["at"])
        and (end is None or float(record["at"]) <= end)
    ]


def seen_from(check: str, locations: Mapping[str, Mapping[str, Any]], own: str) -> list[str]:
    """The other locations whose published verdict of ``check`` is bad (down, expired...)."""
    bad = {State.DOWN.value, State.EXPIRED.value}
    found = []
    for name, record in sorted(locations.items()):
        checks = record.get("checks")
        entry = checks.get(check) if isinstance(checks, Mapping) else None
        if name != own and isinstance(entry, Mapping) and entry.get("state") in bad:
            found.append(name)
    return found


SEEN_FROM = "also seen from "  # an incident's seen-from note: this, then the location's name


def states_by_location(
    check: str, locations: Mapping[str, Mapping[str, Any]], own: str, own_state: str
) -> dict[str, str]:
    """Each location's verdict of ``check``: this one's (``own_state``, fresher than what it
    published), then every other location that publishes a check of that name."""
    found = {own: own_state}
    for name, record in sorted(locations.items()):
        checks = record.get("checks")
        entry = checks.get(check) if isinstance(checks, Mapping) else None
        if name != own and isinstance(entry, Mapping) and isinstance(entry.get("state"), str):
            found[name] = entry["state"]
    return found


def incident_locations(own: str, timeline: Iterable[Mapping[str, Any]]) -> list[str]:
    """The locations that saw an incident: this one (it opened it), then those its timeline's
    seen-from notes name."""
    seen = [own]
    for step in timeline:
        detail = str(step.get("detail", ""))
        if step.get("event") == "seen-from" and detail.startswith(SEEN_FROM):
            where = detail.removeprefix(SEEN_FROM)
            if where not in seen:
                seen.append(where)
    return seen
