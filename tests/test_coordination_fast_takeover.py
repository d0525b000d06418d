"""Replacing a fenced leader's znode in the acquisition's transaction, on a real ZooKeeper."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from cluster.coordination import Coordinator
from cluster.decision_data import Session
from cluster.zookeeper import ZooKeeperEnsemble


@pytest.fixture
def nodes(zookeeper: ZooKeeperEnsemble) -> Iterator[dict[str, Coordinator]]:
    """Three coordinators of a cluster of their own on the shared server."""
    cluster = f"f{uuid.uuid4().hex[:10]}"
    made = {name: Coordinator(zookeeper.hosts, cluster, name) for name in ("a", "b", "c")}
    for coordinator in made.values():
        coordinator.start(timeout=10)
    yield made
    for coordinator in made.values():
        coordinator.stop()


def test_a_fenced_leaders_znode_is_replaced_with_the_next_epoch(
    nodes: dict[str, Coordinator],
) -> None:
    a, b = nodes["a"], nodes["b"]
    epoch = a.acquire_leadership()
    assert epoch is not None
    assert b.acquire_leadership() is None  # without a fence: held, as before
    assert b.acquire_leadership(("a", epoch)) == epoch + 1
    view = b.view()
    assert view.leader is not None and view.leader.ours
    assert (view.leader.node, view.leader.epoch) == ("b", epoch + 1)
    assert (view.epoch, view.epoch_node) == (epoch + 1, "b")
    # The fenced node's session lives on (it would expire later): it no longer leads.
    seen_by_a = a.view()
    assert seen_by_a.session is Session.CONNECTED
    assert seen_by_a.leader is not None and not seen_by_a.leader.ours
    assert not a.still_leader(epoch)
    assert a.release_leadership(epoch)  # nothing of its own left to release
    assert b.still_leader(epoch + 1)


@pytest.mark.parametrize("stale", [("a", 0), ("c", 1)], ids=["another term", "another node"])
def test_only_the_very_znode_fenced_is_replaced(
    nodes: dict[str, Coordinator], stale: tuple[str, int]
) -> None:
    a, b = nodes["a"], nodes["b"]
    epoch = a.acquire_leadership()
    assert epoch == 1
    assert b.acquire_leadership(stale) is None
    assert a.still_leader(epoch)
    assert b.view().epoch == epoch  # the epoch did not move either


def test_a_leader_that_changed_meanwhile_makes_the_replacement_fail(
    nodes: dict[str, Coordinator],
) -> None:
    a, b = nodes["a"], nodes["b"]
    epoch = a.acquire_leadership()
    assert epoch is not None
    assert a.release_leadership(epoch)
    again = a.acquire_leadership()  # a new term of the same node: not the one fenced
    assert again == epoch + 1
    assert b.acquire_leadership(("a", epoch)) is None
    assert a.still_leader(again)
    # Two nodes replacing the same fenced znode at once: one transaction wins whole (a znode
    # deleted and created again has the same version: the epoch's version must catch it).
    leader, epoch = "a", again
    for _ in range(10):
        racers = [nodes[name] for name in sorted(nodes) if name != leader]
        results = race(racers, (leader, epoch))
        winners = [node for node, got in results.items() if got is not None]
        assert len(winners) == 1, results
        assert results[winners[0]] == epoch + 1
        leader, epoch = winners[0], epoch + 1
        view = a.view()
        assert view.leader is not None and (view.leader.node, view.leader.epoch) == (leader, epoch)


def race(racers: list[Coordinator], stale: tuple[str, int]) -> dict[str, int | None]:
    """Every racer replaces ``stale`` at the same moment, each in its own thread."""
    results: dict[str, int | None] = {}
    barrier = threading.Barrier(len(racers))

    def attempt(coordinator: Coordinator) -> None:
        barrier.wait()
        results[coordinator.node] = coordinator.acquire_leadership(stale)

    threads = [threading.Thread(target=attempt, args=(racer,)) for racer in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_vacant_leadership_is_taken_plainly_with_a_stale_name(
    nodes: dict[str, Coordinator],
) -> None:
    a, b = nodes["a"], nodes["b"]
    epoch = a.acquire_leadership()
    assert epoch is not None
    assert a.release_leadership(epoch)  # its session expired meanwhile, say
    assert b.acquire_leadership(("a", epoch)) == epoch + 1
