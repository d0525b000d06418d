"""From a check's state and a new observation to its next state: pure, standard library only.

No clock is read here: the time of an observation comes in with it. The rules:

- ``failure``: the state holds until ``failure_threshold`` consecutive failures, then "down".
  One timeout among successes is noise, three in a row are an outage (Gatus' default).
- ``success``: "up", or "degraded" when it took longer than ``degraded_after`` (slow is not
  down). From "down" it takes ``success_threshold`` consecutive successes to come back.
- ``warning`` (a certificate near its end, a queue past its threshold): "warning" at once,
  under the same way back from "down".
- ``expired``: a certificate past its end is a fact, not a flake: "expired" at once.
- ``standby``: the passive node of the cluster, which by design does not serve (its relay says
  so, or the cluster says the node is passive): "standby" at once, never an incident. A success
  from there is "up" at once: standby is no outage to come back from.

A state change is returned as an event, at most one per observation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class State(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DEGRADED = "degraded"
    WARNING = "warning"
    DOWN = "down"
    EXPIRED = "expired"
    STANDBY = "standby"


class Outcome(StrEnum):
    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    EXPIRED = "expired"
    STANDBY = "standby"


#: States in which the service answers as it should, more or less well.
SERVING = frozenset({State.UP, State.DEGRADED, State.WARNING})


@dataclass(frozen=True, slots=True)
class Thresholds:
    failure_threshold: int = 3
    success_threshold: int = 2
    degraded_after: float = 5.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("thresholds count observations: at least 1")


@dataclass(frozen=True, slots=True)
class CheckState:
    """Where a check stands: its state, since when, and its current run of like outcomes."""

    state: State = State.UNKNOWN
    since: float | None = None
    failures: int = 0  # consecutive failures up to now
    successes: int = 0  # consecutive non-failures up to now


@dataclass(frozen=True, slots=True)
class StateChange:
    check: str
    previous: State
    current: State
    at: float
    detail: str


def _good_state(outcome: Outcome, seconds: float, thresholds: Thresholds) -> State:
    if outcome is Outcome.WARNING:
        return State.WARNING
    return State.DEGRADED if seconds > thresholds.degraded_after else State.UP


def next_state(
    check: str,
    previous: CheckState,
    outcome: Outcome,
    seconds: float,
    at: float,
    detail: str,
    thresholds: Thresholds,
) -> tuple[CheckState, StateChange | None]:
    """The state after one more observation, and the change it makes (None: no change)."""
    if outcome is Outcome.FAILURE:
        failures, successes = previous.failures + 1, 0
        target = State.DOWN if failures >= thresholds.failure_threshold else previous.state
    elif outcome is Outcome.EXPIRED:
        failures, successes = 0, 0
        target = State.EXPIRED
    elif outcome is Outcome.STANDBY:
        failures, successes = 0, 0
        target = State.STANDBY
    else:
        failures, successes = 0, previous.successes + 1
        waiting = previous.state is State.DOWN and successes < thresholds.success_threshold
        target = previous.state if waiting else _good_state(outcome, seconds, thresholds)
    following = CheckState(target, previous.since, failures, successes)
    if target is previous.state:
        return following, None
    change = StateChange(check, previous.state, target, at, detail)
    return replace(following, since=at), change
