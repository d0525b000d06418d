"""Checks shared by the lab's failover and fencing tests: the split-brain sampler and waits."""

from __future__ import annotations

import json
import time

from cluster.lab.history import Attempt
from cluster.lab.lab import Lab
from cluster.lab.sampler import Sampler as LabSampler


class Sampler(LabSampler):
    """The lab's split-brain sampler as a context manager that fails the test on a violation."""

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        # It ran: a look takes a subprocess per node and resource, seconds apart under load.
        assert self.samples >= 3, f"the sampler looked only {self.samples} times"
        assert not self.violations, self.violations[:10]


def roles(lab: Lab) -> dict[str, str]:
    status = lab.cluster_status()
    if status is None:
        return {}
    return {node["node"]: node["role"] for node in status["nodes"]}


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    assert callable(condition)
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.2)


def wait_pair(lab: Lab, timeout: float = 60.0) -> str:
    """Wait for one active and one passive node; the active one.

    The roles are the members' records: just after ZooKeeper comes back, a record may still
    say "active" for a node that demoted while it could not write. So the serving node (the
    VIP's one holder, answering SMTP) is waited for too, not read once."""
    wait_until(
        lambda: (
            sorted(roles(lab).values()) == ["active", "passive"] and lab.active_node() is not None
        ),
        timeout,
        "an active pair",
    )
    active = lab.active_node()
    assert active is not None
    return active


def drained(lab: Lab, attempts: list[Attempt], timeout: float = 60.0) -> None:
    acked = {a.id for a in attempts if a.outcome == "acked"}
    wait_until(lambda: acked <= lab.delivered_ids(), timeout, "every acknowledged delivery")


def agent_decisions(lab: Lab, node: str) -> list[dict[str, object]]:
    path = lab.node_dir(node) / "agent.log"
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == "Decision"]
