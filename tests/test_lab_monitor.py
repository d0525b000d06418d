"""The lab's monitors (cluster.lab.monitors), for real: namespaces, agents, ZooKeeper, a failover.

Prefix ``hh4`` and subnet 198.19.224.0/24: beside a user's lab and the other lab tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.lab.lab import Lab

PREFIX = "hh4"
SUBNET = "198.19.224.0/24"


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.5)
    return found


def states(lab: Lab) -> dict[str, dict[str, str]]:
    return {
        location: {row["name"]: row["state"] for row in rows or []}
        for location, rows in lab.monitor_verdicts().items()
    }


def seen_by_both(lab: Lab, wanted: dict[str, str]) -> bool:
    """Both locations see these checks so (the round trip and the relays' admin endpoints, which
    tests/test_lab_monitor_checks.py covers, may still be on their way)."""
    found = states(lab)
    return all(wanted.items() <= found.get(where, {}).items() for where in ("inet", "client"))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    Lab(tmp_path / "leftovers", prefix=PREFIX, subnet=SUBNET).down()
    built = Lab(tmp_path / "lab", prefix=PREFIX, subnet=SUBNET)
    try:
        built.up(wait=90.0)
        yield built
    finally:
        built.down()


@pytest.mark.root
def test_the_monitors_see_the_pair_and_a_failover_is_an_event(lab: Lab) -> None:
    active = lab.wait_active()
    passive = "node2" if active == "node1" else "node1"
    wanted = {"vip-smtp": "up", f"{active}-smtp": "up", f"{passive}-smtp": "standby", "dns": "up"}
    wait_for(lambda: seen_by_both(lab, wanted), 60, f"{wanted}")
    lab.kill_node(active)
    lab.wait_active(60, other_than=active)
    # The new active node serves on the VIP; the killed one has no agent: down, not standby.
    after = {"vip-smtp": "up", f"{passive}-smtp": "up", f"{active}-smtp": "down", "dns": "up"}
    wait_for(lambda: seen_by_both(lab, after), 60, f"{after}")
    for location in ("inet", "client"):
        log = (lab.directory / f"monitor-{location}" / "monitor.log").read_text().splitlines()
        events = [json.loads(line) for line in log if line.startswith("{")]
        seen = [e for e in events if e["event"] == "FailoverSeen"]
        assert [e["check"] for e in seen] == ["vip-smtp"], location
        assert seen[0]["refused"] < 10.0
        opened = [e["check"] for e in events if e["event"] == "IncidentOpened"]
        assert "vip-smtp" not in opened and f"{active}-smtp" in opened, opened
    status = subprocess.run(
        [sys.executable, "-m", "hamtactl", "lab", "status", "--json", "--dir", str(lab.directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    monitors = json.loads(status.stdout)["monitors"]
    assert set(monitors) == {"inet", "client"}
    table = subprocess.run(
        [sys.executable, "-m", "hamtactl", "lab", "status", "--dir", str(lab.directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "monitors:" in table and "vip-smtp" in table
