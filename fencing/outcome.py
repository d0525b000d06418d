"""What one fence attempt came to: the record the decision log keeps for every agent tried."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.StrEnum):
    """How a fence attempt ended.

    Only ``FENCED`` lets a takeover go on. ``TIMEOUT`` is kept apart from ``FAILED`` because an
    agent that did not answer may still have cut the power: the operator reads the difference.
    """

    FENCED = "fenced"
    FAILED = "failed"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class FenceResult:
    """One agent's attempt on one node: its name, outcome, duration and a one-line reason."""

    agent: str
    outcome: Outcome
    seconds: float
    detail: str

    def __str__(self) -> str:
        return f"{self.agent}: {self.outcome} in {self.seconds:.3f}s ({self.detail})"
