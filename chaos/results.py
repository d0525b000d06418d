"""What one chaos iteration produced, as plain data: the checker's verdict, timings, a timeline.

Times in ``Mark`` and ``IterationResult`` are seconds on the monotonic clock shared by every
process of the machine (the load client records its attempts on it too); ``wall_offset`` turns
them into wall-clock time (``monotonic + wall_offset``) for reports and for the agents' and
relays' logs, which are stamped in UTC.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cluster.lab.history import Attempt, Verdict


@dataclass(frozen=True, slots=True)
class Mark:
    """One instant on an iteration's timeline."""

    at: float  # monotonic seconds
    kind: str  # "fault", "heal", "role", "fenced", "watchdog", "note"
    node: str  # the node (or "zookeeper", "cluster") it concerns
    text: str


@dataclass(slots=True)
class IterationResult:
    """One fault injected under load, and what the checker found."""

    scenario: str
    iteration: int
    seed: int
    started: float  # monotonic: the load began
    fault_at: float  # monotonic: the fault was injected
    heal_at: float | None  # monotonic: the fault was undone (None: nothing to undo)
    ended: float  # monotonic: the load stopped
    wall_offset: float  # wall = monotonic + wall_offset
    verdict: Verdict
    rto_s: float | None  # from ``rto_from`` to the first 250 after it (None: none came)
    refused_s: float  # clients refused or cut off, from the first failure to the next 250
    split_brain: list[str] = field(default_factory=list)  # every instant or log proof of it
    problems: list[str] = field(default_factory=list)  # anything else that fails the iteration
    marks: list[Mark] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    # Where the recovery time starts: the fault, or the outage's first failure for faults after
    # which the active node serves on, or the heal for faults that stop the service by design.
    rto_from: float | None = None
    # Demotions of a node that was active, from the fault to the end of the load (agents' logs).
    demotions: int = 0
    # With --monitors: the monitors' alerts of this fault (chaos.alerts), None without monitors.
    alerts: list[dict[str, Any]] | None = None
    # Takeovers the fault should not have caused: demotions of the active node under a fault
    # it must ride out (``Fault.steady``); in production each one costs a fence of a healthy
    # node. The soak (bench/soak.py) counts them under load and CPU hogs.
    false_failovers: int = 0
    # --pair: what each other pair of the lab saw under its own load (chaos.other_pairs); any
    # failover, refusal or loss there is also in ``problems``.
    other_pairs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing lost, nothing unexpected, no split brain, no other problem."""
        return self.verdict.ok and not self.split_brain and not self.problems

    def as_dict(self, *, with_attempts: bool = False) -> dict[str, Any]:
        """JSON-ready; the raw attempts only when asked (they are the bulk)."""
        data: dict[str, Any] = {
            "scenario": self.scenario,
            "iteration": self.iteration,
            "seed": self.seed,
            "ok": self.ok,
            "started": self.started,
            "fault_at": self.fault_at,
            "heal_at": self.heal_at,
            "ended": self.ended,
            "wall_offset": self.wall_offset,
            "verdict": self.verdict.as_dict(),
            "lost_ids": list(self.verdict.lost),
            "rto_s": self.rto_s,
            "rto_from": self.rto_from,
            "refused_s": self.refused_s,
            "demotions": self.demotions,
            "false_failovers": self.false_failovers,
            "split_brain": self.split_brain,
            "problems": self.problems,
            "marks": [asdict(mark) for mark in self.marks],
            "alerts": self.alerts,
            "other_pairs": self.other_pairs,
        }
        if with_attempts:
            data["attempts"] = [asdict(attempt) for attempt in self.attempts]
        return data
