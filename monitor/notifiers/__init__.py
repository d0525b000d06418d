"""Notifiers: one module per kind, each a :class:`Sender` that raises when a send fails.

Retries, queues and logging are not theirs: monitor.notifiers.dispatch does them, the same for
every kind. ``monitor.notifiers.senders.build_senders`` makes one sender per configured
notifier, in one place.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol


class NotifierError(Exception):
    """A send that failed: the receiver refused it or could not be reached."""


@dataclass(frozen=True, slots=True)
class Notification:
    """What every notifier is told: an incident's trigger (a step) or its resolution."""

    event: str  # "trigger" or "resolve"
    incident: int
    check: str
    kind: str  # the check's kind
    severity: str  # "critical" or "warning"
    state: str  # the check's state
    detail: str
    opened: float
    at: float
    step: int | None = None  # the escalation step (from 1) of a trigger
    monitor: str = "hamta-monitor"

    @property
    def dedup_key(self) -> str:
        """The same for every event of one incident (PagerDuty's dedup_key)."""
        return f"{self.monitor}/incident/{self.incident}"

    @property
    def summary(self) -> str:
        if self.event == "resolve":
            return f"RESOLVED {self.check} is back (incident {self.incident})"
        return f"{self.severity.upper()} {self.check} is {self.state}: {self.detail}"

    def iso(self, when: float) -> str:
        return dt.datetime.fromtimestamp(when, dt.UTC).isoformat(timespec="seconds")

    def as_dict(self) -> dict[str, object]:
        return {
            "event": self.event,
            "incident": self.incident,
            "check": self.check,
            "kind": self.kind,
            "severity": self.severity,
            "state": self.state,
            "detail": self.detail,
            "opened": self.iso(self.opened),
            "at": self.iso(self.at),
            "step": self.step,
            "monitor": self.monitor,
            "summary": self.summary,
        }


class Sender(Protocol):
    async def send(self, note: Notification) -> None: ...
