"""monitor.verdicts: the state machine of a check, by table and by property."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from monitor.verdicts import CheckState, Outcome, State, Thresholds, next_state

S, F, W, E = Outcome.SUCCESS, Outcome.FAILURE, Outcome.WARNING, Outcome.EXPIRED
U, UP, DOWN = State.UNKNOWN, State.UP, State.DOWN
T = Thresholds(failure_threshold=3, success_threshold=2, degraded_after=5.0)


def walk(
    outcomes: list[Outcome], seconds: float = 0.1, thresholds: Thresholds = T
) -> tuple[list[State], list[tuple[State, State]]]:
    """The state after each outcome, and the changes reported."""
    state = CheckState()
    states, changes = [], []
    for at, outcome in enumerate(outcomes):
        state, change = next_state("c", state, outcome, seconds, float(at), "d", thresholds)
        states.append(state.state)
        if change is not None:
            changes.append((change.previous, change.current))
            assert change.at == at and state.since == at
    return states, changes


def test_table() -> None:
    assert walk([F, F, F])[0] == [U, U, DOWN]  # down only after the third failure
    assert walk([S, F, F, S, F, F, F])[0] == [UP, UP, UP, UP, UP, UP, DOWN]
    assert walk([F, F, F, S, S])[0] == [U, U, DOWN, DOWN, UP]  # back after two successes
    assert walk([F, F, F, S, F, S, S])[0] == [U, U, DOWN, DOWN, DOWN, DOWN, UP]
    assert walk([S, E, S])[0] == [UP, State.EXPIRED, UP]  # expired at once, not "down"
    assert walk([S, W, S])[0] == [UP, State.WARNING, UP]
    assert walk([F, F, F, W, W])[0] == [U, U, DOWN, DOWN, State.WARNING]


def test_slow_is_degraded_not_down() -> None:
    states, changes = walk([S, S], seconds=6.0)
    assert states == [State.DEGRADED, State.DEGRADED]
    assert changes == [(State.UNKNOWN, State.DEGRADED)]
    # A slow failure is a failure; slowness matters only for answers that came.
    assert walk([F, F, F], seconds=6.0)[0][-1] is State.DOWN


def test_one_change_event_per_change() -> None:
    _, changes = walk([S, S, F, F, F, F, S, S, S])
    assert changes == [
        (State.UNKNOWN, State.UP),
        (State.UP, State.DOWN),
        (State.DOWN, State.UP),
    ]


outcomes = st.lists(st.sampled_from([S, F, W, E]), max_size=40)
limits = st.builds(Thresholds, st.integers(1, 5), st.integers(1, 5), st.just(5.0))


@given(outcomes, limits)
def test_down_exactly_when_the_failures_say_so(history: list[Outcome], t: Thresholds) -> None:
    states, changes = walk(history, thresholds=t)
    for i, state in enumerate(states):
        seen = history[: i + 1]
        failing = len(seen) - max((j + 1 for j, o in enumerate(seen) if o is not F), default=0)
        assert (failing >= t.failure_threshold) <= (state is State.DOWN)
        if state is State.DOWN and failing < t.failure_threshold:
            # Still down after the failures ended: fewer than M good answers since, none expired.
            since = seen[max(j for j, o in enumerate(seen) if o is F) :]
            assert len(since) - 1 < t.success_threshold and E not in since
    # Every change is a real change, and the changes chain up.
    current = State.UNKNOWN
    for previous, following in changes:
        assert previous is current and following is not previous
        current = following
    assert current is (states[-1] if states else State.UNKNOWN)


@given(outcomes)
def test_a_single_failure_never_takes_a_check_down(history: list[Outcome]) -> None:
    isolated = [o for i, o in enumerate(history) if o is not F or i % 2 == 0]
    interleaved = [x for o in isolated for x in ((o, S) if o is F else (o,))]
    assert State.DOWN not in walk(interleaved)[0]
