"""Split brain read from the nodes' own logs: who held the pair's resources, and when.

The sampler looks at the lab from outside every 50 ms and can miss an overlap shorter than
that. The nodes' logs miss nothing: every agent logs each step that takes or releases a
resource, the watchdog logs what it removed when it fired, and every relay logs the epoch it
serves and each message it acknowledged. This module turns those lines into intervals and
reports any two that overlap:

- **the virtual IP** is held from a node's ``vip`` step until its ``vip_down`` step, its
  agent's start-up ``Cleanup`` of the address, its watchdog's firing (when the address was
  removed or already gone), or a power-off: a fence of that node by its peer (STONITH) or by
  the lab itself (its power log, ``PoweredOff`` lines naming the node);
- **the spool** is held from a node's ``storage`` step until its ``storage_down`` step, its
  start-up ``Cleanup`` of the storage, or a power-off;
- **acknowledgements**: a relay serves the epoch of its last ``RelayActivating`` line. A
  ``Reception`` (a 250 sent) in an epoch older than one whose ``epoch`` step a node had already
  finished is split brain: the new term's token was on the spool, and the old relay still
  said yes.

A hold that nothing in the logs ends stays open to the end: the checker believes a release
only when a log says it happened, so a node killed without being fenced counts as holding.

The logs are stamped in UTC by the wall clock of the process that wrote them. One scenario
runs a node's processes with a skewed wall clock (libfaketime): their lines carry the writer's
pid, and ``skews`` maps such pids to the seconds their clock was ahead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

RESOURCES = ("vip", "spool")
_TAKEN = {"vip": "vip", "storage": "spool"}
_RELEASED = {"vip_down": "vip", "storage_down": "spool"}
_CLEANED = {"virtual IP": "vip", "storage": "spool"}


@dataclass(frozen=True, slots=True)
class Event:
    """One log line of a node, placed on the shared monotonic clock."""

    at: float
    node: str
    fields: Mapping[str, Any]

    @property
    def name(self) -> str:
        """The line's ``event`` field."""
        return str(self.fields.get("event", ""))


@dataclass(frozen=True, slots=True)
class Hold:
    """A node holding a resource from ``start`` until ``end`` (None: never released)."""

    node: str
    resource: str
    start: float
    end: float | None
    released_by: str

    def overlap(self, other: Hold) -> float:
        """Seconds during which both held (0 if never at once)."""
        end = min(_until(self), _until(other))
        return max(0.0, end - max(self.start, other.start))


def _until(hold: Hold) -> float:
    return float("inf") if hold.end is None else hold.end


def read_log(
    path: Path, node: str | None, wall_offset: float, skews: Mapping[int, float] | None = None
) -> list[Event]:
    """The JSON lines of ``path`` as events, in file order; torn or foreign lines are skipped.

    ``node`` is whose log it is (None: each line names its node, as in the lab's power log);
    ``wall_offset`` is wall minus monotonic time for the reader; ``skews`` corrects the lines
    of processes (by pid) whose wall clock ran ahead.
    """
    skews = skews or {}
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            fields = json.loads(line)
            stamp = datetime.fromisoformat(str(fields["ts"])).timestamp()
        except (ValueError, KeyError, TypeError):
            continue  # a line a kill -9 cut short, or not ours
        if not isinstance(fields, dict):
            continue
        skew = skews.get(fields["pid"], 0.0) if isinstance(fields.get("pid"), int) else 0.0
        owner = node if node is not None else str(fields.get("node", ""))
        events.append(Event(stamp - wall_offset - skew, owner, fields))
    return events


def _fenced(event: Event, node: str) -> bool:
    detail = str(event.fields.get("detail", ""))
    return (
        event.node != node
        and event.name == "StepDone"
        and event.fields.get("step") == "fence"
        and f"fenced {node}" in detail
    )


def _vip_removed(event: Event) -> bool:
    actions = event.fields.get("actions")
    if not isinstance(actions, list):
        return False
    return any(
        isinstance(a, dict)
        and a.get("action") == "remove_vip"
        and a.get("outcome") in ("removed", "absent")
        for a in actions
    )


def holds(agent_events: Iterable[Event]) -> list[Hold]:
    """Every hold of the virtual IP and the spool that the agents' logs tell of."""
    ordered = sorted(agent_events, key=lambda e: e.at)
    open_: dict[tuple[str, str], float] = {}
    done: list[Hold] = []

    def release(node: str, resource: str, at: float, why: str) -> None:
        start = open_.pop((node, resource), None)
        if start is not None:
            done.append(Hold(node, resource, start, at, why))

    nodes = {e.node for e in ordered}
    for event in ordered:
        step = event.fields.get("step")
        if event.name == "StepDone" and step in _TAKEN:
            open_.setdefault((event.node, _TAKEN[str(step)]), event.at)
        elif event.name == "StepDone" and step in _RELEASED:
            release(event.node, _RELEASED[str(step)], event.at, str(step))
        elif event.name == "Cleanup" and event.fields.get("released") in _CLEANED:
            resource = _CLEANED[str(event.fields["released"])]
            release(event.node, resource, event.at, "cleanup at start")
        elif event.name == "PoweredOff":  # the lab's power switch (Lab.fence), not a node
            for resource in RESOURCES:
                release(event.node, resource, event.at, f"powered off by {event.fields.get('by')}")
        elif event.name == "WatchdogFired" and _vip_removed(event):
            release(event.node, "vip", event.at, f"watchdog ({event.fields.get('reason')})")
        for victim in nodes:
            if _fenced(event, victim):
                for resource in RESOURCES:
                    release(victim, resource, event.at, f"fenced by {event.node}")
    done += [Hold(node, resource, start, None, "") for (node, resource), start in open_.items()]
    return sorted(done, key=lambda h: h.start)


def overlapping(all_holds: Sequence[Hold], start: float, end: float) -> list[str]:
    """Two nodes holding one resource at once, where the overlap touches [start, end]."""
    problems = []
    for i, first in enumerate(all_holds):
        for second in all_holds[i + 1 :]:
            if second.resource != first.resource or second.node == first.node:
                continue
            both_from = max(first.start, second.start)
            both_to = min(_until(first), _until(second))
            if both_to <= both_from or both_to < start or both_from > end:
                continue
            taker = second if second.start >= first.start else first
            holder = first if taker is second else second
            if holder.end is None:
                still = "never released it"
            else:
                still = f"held it {first.overlap(second):.3f}s more"
            problems.append(
                f"{first.resource}: {taker.node} took it while {holder.node} held it "
                f"({holder.node} {still})"
            )
    return problems


def late_acknowledgements(
    agent_events: Iterable[Event], relay_events: Iterable[Event], start: float, end: float
) -> list[str]:
    """Mail a relay acknowledged in an epoch older than one already written to the spool."""
    terms = sorted(
        (e.at, int(e.fields["epoch"]), e.node)
        for e in agent_events
        if e.name == "StepDone" and e.fields.get("step") == "epoch" and "epoch" in e.fields
    )
    serving: dict[str, int] = {}
    problems = []
    for event in relay_events:  # file order: the epoch a Reception belongs to comes before it
        if event.name == "RelayActivating" and "epoch" in event.fields:
            serving[event.node] = int(event.fields["epoch"])
        if event.name != "Reception" or not start <= event.at <= end:
            continue
        epoch = serving.get(event.node, 0)
        newer = [(at, e, owner) for at, e, owner in terms if at <= event.at and e > epoch]
        if newer:
            since, term, owner = newer[0]
            problems.append(
                f"{event.node} acknowledged {event.fields.get('queue_id')} in epoch {epoch}, "
                f"{event.at - since:.3f}s after {owner} began epoch {term}"
            )
    return problems


def split_brain(
    agent_events: Sequence[Event], relay_events: Sequence[Event], start: float, end: float
) -> list[str]:
    """Every overlap the logs show within [start, end]: resources and acknowledgements."""
    return overlapping(holds(agent_events), start, end) + late_acknowledgements(
        agent_events, relay_events, start, end
    )
