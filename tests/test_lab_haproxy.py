"""A real HAProxy (Debian's) in the lab, in front of both nodes, checking each agent's /active:
clients go to the active node, and after a failover to the new one within the check interval.

The lab under test has the prefix ``ha`` and the subnet 198.19.180.0/24.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.lab import probes
from cluster.lab.haproxy import CHECK_INTERVAL_MS, greeting_node, measure_switch
from cluster.lab.lab import Lab
from cluster.lab.topology import API_PORT, CLIENT, NODES
from tests.support.labs import module_lab

PREFIX = "ha"
SUBNET = "198.19.180.0/24"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with module_lab(
        tmp_path_factory.mktemp("lab-haproxy"), PREFIX, SUBNET, wait=120.0, haproxy=True
    ) as built:
        yield built


def test_haproxy_follows_the_active_node_through_a_failover(lab: Lab) -> None:
    client = lab.namespace(CLIENT)
    active = lab.wait_active()
    passive = next(node for node in NODES if node != active)
    answers = {
        node: probes.http_json(client, lab.address(node), API_PORT, "/active") or {}
        for node in NODES
    }
    assert answers[active].get("serving") is True
    assert answers[passive].get("serving") is False
    # HAProxy marks the passive node down at its first check: every client goes to the active.
    found = probes.wait_for(lambda: greeting_node(lab.topology, client) == active, 10)
    assert found, "HAProxy does not send clients to the active node"
    assert {greeting_node(lab.topology, client) for _ in range(5)} == {active}

    switch = measure_switch(lab.topology, client, lab.kill_node, active)

    assert switch.new == passive
    lag = switch.switch_s - switch.active_s
    print(
        f"kill -> {switch.new} serving: {switch.active_s:.3f}s; "
        f"kill -> HAProxy's switch: {switch.switch_s:.3f}s (lag {lag:.3f}s)"
    )
    # Within the check interval, with room for the probes' own polling on a loaded machine.
    assert lag < CHECK_INTERVAL_MS / 1000 + 1.0
    log = Path(lab.directory / "client" / "haproxy.log").read_text()
    assert f"{active} is DOWN" in log or f"relays/{active} is DOWN" in log
