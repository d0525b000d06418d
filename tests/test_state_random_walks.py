"""The random walks of tests/support/random_walks.py: invariants, every row, every new rule."""

from __future__ import annotations

import pytest

from cluster.decision_data import Role, Trigger
from cluster.state import TRANSITIONS
from tests.support.random_walks import (
    SEEDS,
    walked,
)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_walk_keeps_the_invariants(seed: int) -> None:
    history = walked(seed)
    assert history.activations >= 5
    assert history.demotions >= 5
    assert history.give_ups >= 1


def test_random_walks_visit_every_row_of_the_table() -> None:
    seen: set[tuple[Role, Trigger]] = set()
    for seed in SEEDS:
        seen |= walked(seed).seen
    assert set(TRANSITIONS) <= seen


def test_random_walks_exercise_the_new_rules() -> None:
    """The invariants above were checked on walks that did meet each rule, more than once."""
    histories = [walked(seed) for seed in SEEDS]
    assert sum(h.preempted for h in histories) >= 5
    assert sum(h.stops for h in histories) >= 5
    assert sum(h.exits for h in histories) >= 5
    assert sum(h.handovers for h in histories) >= 5
    assert sum(h.refused for h in histories) >= 5
    assert sum(h.storage_checked for h in histories) >= 5
    assert sum(h.rode_out for h in histories) >= 5  # suspended, still active: deadline ahead
    assert sum(h.silent for h in histories) >= 5  # "connected", but the contact ran out
    assert sum(h.grays for h in histories) >= 5  # the check locations saw the service down
    assert sum(h.gray_held for h in histories) >= 5  # ... but it was not the moment
    assert sum(h.silent_fences for h in histories) >= 5  # a silent leader fenced ...
    assert sum(h.fast_takeovers for h in histories) >= 5  # ... and replaced at once
    assert sum(h.failsafe for h in histories) >= 5  # began serving in failsafe
    assert sum(h.failsafe_rides for h in histories) >= 5  # ... past the session's deadline
    assert sum(h.past_grants for h in histories) >= 3  # unfenced, once its grant had ended
    assert sum(h.channel_cuts for h in histories) >= 5  # unheard but pulsing: not fenced
