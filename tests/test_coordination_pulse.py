"""The leader's pulse in ZooKeeper, on a real server: written by one coordinator, its advances
dated by the other's own clock when they arrive, gone with the writer's session."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from kazoo.client import KazooClient

from cluster.coordination import Coordinator
from cluster.zookeeper import ZooKeeperEnsemble


class Clock:
    """The watcher's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for something ZooKeeper delivers in its own threads (a watch event)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not delivered in time"
        time.sleep(0.01)


@pytest.fixture
def pair(zookeeper: ZooKeeperEnsemble) -> Iterator[tuple[Coordinator, Coordinator, Clock]]:
    """The leader ``a`` and the watcher ``b`` (its clock the test's) of a cluster of their own."""
    cluster = f"p{uuid.uuid4().hex[:10]}"
    clock = Clock()
    a = Coordinator(zookeeper.hosts, cluster, "a")
    b = Coordinator(zookeeper.hosts, cluster, "b", clock=clock)
    a.start(timeout=10)
    b.start(timeout=10)
    b.watch_pulses(["a", "b"])  # its own name is left out
    yield a, b, clock
    a.stop()
    b.stop()


def test_a_pulse_is_dated_by_the_watchers_clock_when_it_arrives(
    pair: tuple[Coordinator, Coordinator, Clock],
) -> None:
    a, b, clock = pair
    assert b.pulse_ages() == ()  # no pulse znode yet: nothing to say
    a.pulse(3, 1)
    until(lambda: b.pulse_ages() != ())
    assert b.pulse_ages() == (("a", 0.0),)
    clock.now += 0.7
    assert dict(b.pulse_ages()) == {"a": pytest.approx(0.7)}
    # The same content written again is an advance too (a new mzxid), dated on arrival.
    arrived = clock.now
    a.pulse(3, 1)
    until(lambda: b.pulse_ages()[0][1] < 0.7)
    clock.now += 1.5
    assert dict(b.pulse_ages()) == {"a": pytest.approx(clock.now - arrived)}


def test_a_pulse_goes_with_its_writers_session(
    pair: tuple[Coordinator, Coordinator, Clock],
) -> None:
    a, b, _ = pair
    a.pulse(1, 1)
    until(lambda: b.pulse_ages() != ())
    a.stop()
    until(lambda: b.pulse_ages() == ())


def test_a_reconnection_starts_the_count_afresh(
    pair: tuple[Coordinator, Coordinator, Clock],
) -> None:
    """Advances missed while cut off prove nothing: the age counts from the reconnection."""
    a, b, clock = pair
    a.pulse(1, 1)
    until(lambda: b.pulse_ages() != ())
    clock.now += 5.0
    assert b.pulse_ages()[0][1] == pytest.approx(5.0)
    b._pulse_session(b.client.state)  # kazoo's listener, as on a reconnection
    assert b.pulse_ages()[0][1] == 0.0


def test_a_pulse_znode_is_ephemeral_and_readable(
    pair: tuple[Coordinator, Coordinator, Clock], zookeeper: ZooKeeperEnsemble
) -> None:
    a, _, _ = pair
    client = KazooClient(hosts=zookeeper.hosts)
    client.start(timeout=10)
    try:
        path = f"/hamta/{a.cluster}/pulses/a"
        a.pulse(4, 2)  # the first creates it
        until(lambda: client.exists(path) is not None)
        a.pulse(4, 3)
        until(lambda: b'"beat":3' in client.get(path)[0])
        data, stat = client.get(path)
        assert data == b'{"node":"a","epoch":4,"beat":3}'
        assert stat.ephemeralOwner != 0
    finally:
        client.stop()
        client.close()
