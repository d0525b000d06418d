"""A cluster's pair in a real ZooKeeper, as the agents publish it: node1 active, node2 passive.

Written through ``cluster.coordination.Coordinator`` itself (acquire_leadership,
publish_member), never hand-made JSON; for the monitor's tests of what it reads of a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from cluster.coordination import Coordinator
from cluster.decision_data import Member, Role


@contextmanager
def active_and_passive(hosts: str, cluster: str) -> Iterator[tuple[Coordinator, Coordinator, int]]:
    """node1 the leader and active (its epoch), node2 passive; both sessions end on exit."""
    node1 = Coordinator(hosts, cluster, "node1")
    node2 = Coordinator(hosts, cluster, "node2")
    node1.start(10)
    node2.start(10)
    try:
        epoch = node1.acquire_leadership()
        assert epoch is not None
        now = time.time()
        node1.publish_member(Member("node1", Role.ACTIVE, epoch, True, True, heartbeat=now))
        node2.publish_member(Member("node2", Role.PASSIVE, 0, True, False, heartbeat=now))
        yield node1, node2, epoch
    finally:
        node1.stop()
        node2.stop()
