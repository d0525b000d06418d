"""Which of the monitors' alerts belong to a chaos iteration, and how long after its fault.

With ``hamta chaos run --monitors`` the lab's monitors notify the lab's alert receiver
(cluster.lab.alert_sink), which records each notification with the wall time it arrived. An
iteration's alerts are the triggers of incidents opened from its fault on, and the resolves of
those incidents (a resolve of an earlier iteration's incident is not this fault's doing). Each
is given its delay from the fault: when the receiver got it (``after_s``, to the millisecond)
and when the monitor opened its incident (``opened_after_s``: the webhook's ``opened`` is to the
second, so this one is too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

# What the report keeps of a notification besides the delays.
KEPT = ("location", "event", "check", "incident", "severity", "state", "detail", "step")


def iteration_alerts(
    records: Iterable[Mapping[str, Any]], fault_wall: float, until_wall: float
) -> list[dict[str, Any]]:
    """The alerts of the iteration whose fault was at ``fault_wall`` (wall seconds), received
    up to ``until_wall``, in the order received."""
    chosen: list[dict[str, Any]] = []
    ours: set[tuple[Any, Any]] = set()  # (location, incident) triggered by this fault
    for record in sorted(records, key=lambda r: float(r.get("received", 0.0))):
        received = float(record.get("received", 0.0))
        if not fault_wall <= received <= until_wall:
            continue
        key = (record.get("location"), record.get("incident"))
        event = record.get("event")
        opened = _wall(record.get("opened"))
        # The webhook gives ``opened`` to the second (cut, not rounded): one second of slack.
        if event == "trigger" and opened is not None and opened > fault_wall - 1.0:
            ours.add(key)
        elif not (event == "resolve" and key in ours):
            continue
        alert = {name: record.get(name) for name in KEPT}
        alert["after_s"] = round(received - fault_wall, 3)
        if opened is not None:
            alert["opened_after_s"] = round(opened - fault_wall, 3)
        chosen.append(alert)
    return chosen


def _wall(value: Any) -> float | None:
    """A notification's time (ISO 8601, as the webhook sends it) as wall seconds."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
