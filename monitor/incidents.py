"""Incidents and escalation: pure rules over plain data, standard library only.

An incident is one stretch of a check's trouble: it opens when the check's state turns bad,
follows its state while open, and resolves when the check comes back. Severities:

- **critical** for ``down`` and ``expired``: clients cannot use the service (or will not trust
  it);
- **warning** for ``degraded`` and ``warning``: it works, but needs a look (slow, a certificate
  near its end, a queue past its limit).

``unknown`` opens and resolves nothing: it is only the state before a first verdict.

Escalation is by incident age: step ``i`` of the policy is due once ``now - opened >= after``;
each step fires at most once per incident, never after an acknowledgement, and is held (not
spent) while the check is in a maintenance window. A notifier hears one trigger per incident,
however many steps name it. A resolve goes to every notifier that was
notified of the incident, and to no other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from monitor.verdicts import State, StateChange


class Severity(StrEnum):
    WARNING = "warning"
    CRITICAL = "critical"


_SEVERITY = {
    State.DOWN: Severity.CRITICAL,
    State.EXPIRED: Severity.CRITICAL,
    State.DEGRADED: Severity.WARNING,
    State.WARNING: Severity.WARNING,
}


def severity_of(state: State) -> Severity | None:
    """The severity of an incident in ``state``; None: no incident (up or unknown)."""
    return _SEVERITY.get(state)


@dataclass(frozen=True, slots=True)
class Incident:
    """An incident as the rules see it (the store keeps it with its timeline)."""

    id: int
    check: str
    severity: Severity
    state: State
    opened: float
    resolved: float | None = None
    acked_by: str | None = None
    steps_fired: frozenset[int] = frozenset()
    notified: frozenset[str] = frozenset()  # notifiers that were sent a trigger

    @property
    def open(self) -> bool:
        return self.resolved is None


class Action(StrEnum):
    OPEN = "open"
    UPDATE = "update"  # still open, in another bad state (severity may change)
    RESOLVE = "resolve"
    NONE = "none"


def on_change(current: Incident | None, change: StateChange) -> Action:
    """What a state change does to the check's open incident (``current``, or None)."""
    severity = severity_of(change.current)
    if change.current is State.UNKNOWN:
        return Action.NONE
    if current is None:
        return Action.OPEN if severity is not None else Action.NONE
    return Action.UPDATE if severity is not None else Action.RESOLVE


@dataclass(frozen=True, slots=True)
class Step:
    """One escalation step: at this incident age, notify these notifiers."""

    after: float
    notifiers: tuple[str, ...]


def due_steps(
    incident: Incident, policy: Sequence[Step], now: float, in_maintenance: bool
) -> list[int]:
    """The indexes of the policy's steps to fire now for ``incident`` (in order)."""
    if not incident.open or incident.acked_by is not None or in_maintenance:
        return []
    age = now - incident.opened
    return [
        index
        for index, step in enumerate(policy)
        if index not in incident.steps_fired and age >= step.after
    ]


def step_targets(incident: Incident, step: Step) -> tuple[str, ...]:
    """The step's notifiers not yet told of this incident: each hears one trigger (one
    PagerDuty alert, one mail), however many steps name it."""
    return tuple(name for name in step.notifiers if name not in incident.notified)


def resolve_targets(incident: Incident) -> tuple[str, ...]:
    """Who hears of the resolution: exactly those who heard of the incident."""
    return tuple(sorted(incident.notified))
