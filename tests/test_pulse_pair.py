"""The pair simulation with the fast takeover on: a cut peer channel alone fences nobody, and
never two nodes serve, through random ZooKeeper outages, cuts and regains (issue 17).

tests/support/failsafe_pair.py with ``heartbeats``: the real decisions of two agents, their
heartbeats over a channel that can be cut, and the leader's pulse in ZooKeeper.
"""

from __future__ import annotations

import functools
import random

import pytest

from tests.support.failsafe_pair import NODES, TIMEOUT, FailsafePair


def started(*, fence_works: bool = True) -> FailsafePair:
    """alpha active, beta passive, ZooKeeper and the channel up, heartbeats and pulses on."""
    pair = FailsafePair(heartbeats=True)
    pair.nodes["beta"].reach = False  # alpha takes over first (not fencing beta meanwhile)
    pair.run(3.0)
    pair.nodes["beta"].reach = True
    pair.run(3.0)
    assert pair.active() == "alpha" and pair.nodes["beta"].alive
    pair.fence_works = fence_works
    return pair


def test_a_cut_channel_fences_nobody_and_a_dead_leader_is_still_replaced_at_once() -> None:
    pair = started()
    before = pair.serving_time["alpha"]
    pair.channel = dict.fromkeys(NODES, False)
    pair.run(30.0)
    assert pair.nodes["alpha"].alive and pair.active() == "alpha"
    assert pair.serving_time["alpha"] - before == pytest.approx(30.0, abs=0.06)
    assert pair.false_fences == 0 and pair.promotions["beta"] == 0
    # Then alpha dies, the channel still cut: its pulse stops, beta fences it and replaces its
    # leader znode before its session expired (the fast path).
    pair.nodes["alpha"].alive = pair.nodes["alpha"].serving = False
    pair.run(2 * TIMEOUT)
    assert pair.active() == "beta"
    assert pair.fast_takeovers == 1


SEEDS = range(5000, 5012)


@functools.cache
def walked(seed: int) -> FailsafePair:
    """Random ZooKeeper outages, nodes cut off from it and, mostly, peer channel cuts (each
    walk runs once per test session); never two serving (``run`` checks it at every tick)."""
    rng = random.Random(seed)
    pair = started(fence_works=rng.random() < 0.7)
    for _ in range(40):
        pair.perturb(rng, quorum=0.05, reach=0.15, channel=0.9)
    return pair


@pytest.mark.parametrize("seed", SEEDS)
def test_random_outages_cuts_and_regains_fence_no_pulsing_leader(seed: int) -> None:
    assert walked(seed).false_fences == 0


def test_the_random_walks_took_the_fast_path() -> None:
    """... when it was due: a leader cut off from ZooKeeper and from its peer (11 fences of a
    pulsing leader in these walks when the pulse is ignored, as before)."""
    assert sum(walked(seed).fast_takeovers for seed in SEEDS) >= 2
