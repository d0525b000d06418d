"""The moves of the agents, counted from their ``Decision`` lines: what bench/failover.py and
bench/soak.py report as takeovers, demotions and fences of a silent peer beside the RTO.

A takeover the benchmark did not cause (no kill, no switchover) is a false failover: in the
lab it cost a fence of a healthy node."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Moves:
    """What the agents' logs say happened."""

    takeovers: int = 0  # promoting → active
    demotions: int = 0  # active → demoting
    silent_fences: int = 0  # a passive node fenced a leader it no longer heard
    fast_takeovers: int = 0  # ... and, the fence confirmed, took over at once

    def as_dict(self) -> dict[str, int]:
        return {
            "takeovers": self.takeovers,
            "demotions": self.demotions,
            "silent_fences": self.silent_fences,
            "fast_takeovers": self.fast_takeovers,
        }


def decisions(path: Path, since: float = 0.0) -> list[dict[str, object]]:
    """The ``Decision`` lines of an agent's JSON log, logged at or after ``since`` (wall)."""
    found: list[dict[str, object]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return found
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("event") == "Decision" and _wall(line) >= since:
            found.append(line)
    return found


def _wall(line: dict[str, object]) -> float:
    stamp = line.get("ts")  # hamta.eventlog: ISO 8601, UTC
    return datetime.fromisoformat(stamp).timestamp() if isinstance(stamp, str) else 0.0


def count_moves(logs: Iterable[Path], since: float = 0.0) -> Moves:
    """Every node's moves since ``since`` (wall clock)."""
    takeovers = demotions = silent = fast = 0
    for path in logs:
        for line in decisions(path, since):
            was, role, trigger = line.get("was"), line.get("role"), line.get("trigger")
            takeovers += was == "promoting" and role == "active"
            demotions += was == "active" and role == "demoting"
            silent += trigger == "peer_silent"
            fast += trigger == "peer_fenced"
    return Moves(takeovers, demotions, silent, fast)
