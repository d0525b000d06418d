"""Checks shared by the lab's failover and fencing tests: the split-brain sampler and waits."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from cluster.lab import Lab
from cluster.lab.history import Attempt
from cluster.lab.topology import NODES


def listening_for_smtp(lab: Lab, node: str) -> bool:
    """Whether some process of ``node`` has a TCP socket listening on port 25."""
    for pid in lab.node_pids(node):
        try:
            table = Path(f"/proc/{pid}/net/tcp").read_text()
        except OSError:
            continue
        for line in table.splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":0019") and fields[3] == "0A":
                return True
    return False


class Sampler:
    """Samples who holds what, in a thread, and remembers every instant of split brain."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.samples = 0
        self.violations: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            vip = self.lab.vip_holders()
            mounted = self.lab.spool_mounted_on()
            listening = [node for node in NODES if listening_for_smtp(self.lab, node)]
            self.samples += 1
            for what, holders in (("vip", vip), ("spool", mounted), ("smtp", listening)):
                if len(holders) > 1:
                    self.violations.append(f"{time.monotonic():.3f} {what} held by {holders}")

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        assert self.samples > 10, "the sampler did not run"
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
    """Wait for one active and one passive node; the active one."""
    wait_until(
        lambda: sorted(roles(lab).values()) == ["active", "passive"], timeout, "an active pair"
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
