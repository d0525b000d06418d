"""The pair simulation of failsafe: never two nodes serving at once, counting the leases.

tests/support/failsafe_pair.py: the real decisions of two agents over a simulated ZooKeeper
(quorum lost and regained, for one side or both) and peer channel (cut or not).
"""

from __future__ import annotations

import random

import pytest

from cluster.decision_data import Role
from tests.support.failsafe_pair import NODES, TICK, TIMEOUT, FailsafePair


def started(lease: float = 3.0, *, silent: bool = False) -> FailsafePair:
    """alpha active, beta passive, ZooKeeper and the channel up."""
    pair = FailsafePair(lease=lease, silent=silent)
    pair.nodes["beta"].reach = False  # alpha takes over first
    pair.run(3.0)
    pair.nodes["beta"].reach = True
    pair.run(3.0)
    assert pair.active() == "alpha"
    assert pair.nodes["beta"].state.role is Role.PASSIVE
    return pair


def test_a_zookeeper_outage_costs_no_serving_while_the_channel_stands() -> None:
    pair = started()
    before = pair.serving_time["alpha"]
    pair.set_quorum(False)
    pair.run(60.0)
    assert pair.active() == "alpha"
    assert pair.serving_time["alpha"] - before == pytest.approx(60.0, abs=0.06)
    assert pair.failsafe_time["alpha"] > 58.0
    assert pair.nodes["alpha"].state.failsafe_since is not None
    pair.set_quorum(True)
    pair.run(3.0)
    assert pair.active() == "alpha"  # its session lived on: the new quorum reset its timer
    assert pair.nodes["alpha"].state.failsafe_since is None
    assert pair.promotions["beta"] == 0


def test_with_the_channel_cut_too_the_active_node_demotes_by_its_session_deadline() -> None:
    pair = started()
    pair.channel = dict.fromkeys(NODES, False)
    pair.set_quorum(False)
    lost = pair.now
    pair.run(5.0)
    assert pair.active() is None
    assert pair.nodes["alpha"].state.role is not Role.ACTIVE
    assert pair.failsafe_time["alpha"] == 0
    # It stopped serving before its session may expire (the deadline less the margin, give
    # or take the simulation's ticks).
    stopped = pair.last_serving["alpha"] - lost
    margin = pair.nodes["alpha"].policy.session_margin
    assert TIMEOUT - 1.0 < stopped <= TIMEOUT - margin + 2 * TICK


def test_a_silent_partition_from_zookeeper_costs_no_serving_while_the_channel_stands() -> None:
    # Servers that drop packets instead of closing connections: kazoo notices at its read
    # timeout, after the active node's demotion moment. The nodes count themselves cut off
    # once no server has answered for the patience, and the leases come in time.
    pair = started(silent=True)
    before = pair.serving_time["alpha"]
    pair.set_quorum(False)
    pair.run(20.0)
    assert pair.active() == "alpha"
    assert pair.serving_time["alpha"] - before == pytest.approx(20.0, abs=0.06)
    assert pair.failsafe_time["alpha"] > 18.0
    pair.set_quorum(True)
    pair.run(3.0)
    assert pair.active() == "alpha" and pair.promotions["beta"] == 0


def test_the_active_node_silently_cut_alone_hands_over_unleased() -> None:
    pair = started(silent=True)
    pair.nodes["alpha"].reach = False  # beta is answered: it refuses every ask
    pair.run(10.0)  # run() asserts at every tick that alpha stopped before beta served
    assert pair.active() == "beta"
    assert pair.failsafe_time["alpha"] == 0


# A lease longer than the session timeout and the grace: the passive node's session-expiry
# rule alone would let it serve while the failsafe node still does.
# And the channel cut as the quorum comes back: no refusal reaches the failsafe node, which
# serves on until the last lease it holds runs out.
@pytest.mark.parametrize(("lease", "cut"), [(3.0, False), (6.0, False), (3.0, True), (6.0, True)])
def test_the_quorum_back_for_the_passive_node_only(lease: float, cut: bool) -> None:
    pair = started(lease)
    pair.set_quorum(False)
    pair.run(20.0)
    assert pair.active() == "alpha"
    pair.nodes["alpha"].reach = False  # the quorum comes back, on beta's side only
    pair.set_quorum(True)
    if cut:
        pair.channel = dict.fromkeys(NODES, False)
    pair.run(15.0)  # run() asserts at every tick that alpha stopped before beta served
    assert pair.active() == "beta"
    assert pair.nodes["alpha"].state.role in (Role.PASSIVE, Role.DEMOTING)  # RELEASE waits


def test_the_quorum_back_for_the_passive_node_only_with_a_fence() -> None:
    pair = started()
    pair.fence_works = True
    pair.set_quorum(False)
    pair.run(10.0)
    pair.nodes["alpha"].reach = False
    pair.set_quorum(True)
    pair.run(10.0)
    assert pair.active() == "beta"
    assert not pair.nodes["alpha"].alive  # fenced: beta did not wait for the lease


def test_without_failsafe_a_zookeeper_outage_stops_serving() -> None:
    pair = FailsafePair(lease=3.0)
    for node in pair.nodes.values():
        node.policy = node.policy.__class__(node=node.name, failsafe=False)
    pair.nodes["beta"].reach = False
    pair.run(3.0)
    pair.nodes["beta"].reach = True
    pair.run(3.0)
    pair.set_quorum(False)
    pair.run(10.0)
    assert pair.active() is None


@pytest.mark.parametrize(
    ("seed", "silent"), [(s, False) for s in range(12)] + [(s, True) for s in range(12, 20)]
)
def test_random_outages_cuts_and_regains_never_make_two_serving_nodes(
    seed: int, silent: bool
) -> None:
    rng = random.Random(seed)
    pair = started(silent=silent)
    pair.fence_works = rng.random() < 0.3
    for _ in range(40):
        pair.perturb(rng, quorum=0.25, reach=0.5, channel=0.75)
    # Everything healed: someone serves again.
    pair.set_quorum(True)
    pair.channel = dict.fromkeys(NODES, True)
    for node in pair.nodes.values():
        node.reach = True
    pair.run(40.0)
    assert pair.active() is not None
