"""The lab's pair sends from its two egress addresses with their EHLO names, before and after a
failover: the addresses move with the virtual IP, and the sink records who came, saying what.

A lab of its own (prefix ``he``, subnet 198.19.190.0/24), with agents and no monitors.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from cluster.lab.commands import format_status
from cluster.lab.lab import Lab
from cluster.lab.topology import NODES
from tests.support.labs import module_lab

PREFIX = "he"
SUBNET = "198.19.190.0/24"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with module_lab(tmp_path_factory.mktemp("lab-egress"), PREFIX, SUBNET) as built:
        yield built


def senders_of(lab: Lab, ids: list[str], timeout: float = 30.0) -> set[tuple[str, str]]:
    """(peer address, EHLO name) of the sink's records of ``ids``, once all are there."""
    deadline = time.monotonic() + timeout
    while True:
        records = [d for d in lab.deliveries() if d.get("x_lab_id") in set(ids)]
        if {d["x_lab_id"] for d in records} >= set(ids):
            return {(d["peer"], d["ehlo"]) for d in records}
        assert time.monotonic() < deadline, "acknowledged mail never reached the sink"
        time.sleep(0.2)


def test_mail_leaves_from_the_egress_addresses_before_and_after_a_failover(lab: Lab) -> None:
    expected = {(str(address), name) for address, name in lab.topology.egress}
    active = lab.wait_active(30.0)
    status = lab.status(cluster=False)
    holders = status["egress_holders"]
    assert all(nodes == [active] for nodes in holders.values()), holders
    text = format_status(status)  # hamta lab status
    for address, _ in lab.topology.egress:
        assert f"egress {address}: {active}\n" in text + "\n", text
    before = lab.send(20, domain="a.lab.test")
    assert before.all_acked, before
    assert senders_of(lab, list(before.ids_acked)) == expected  # both sources, weights 1:1
    lab.kill_node(active)
    lab.fence(active)
    (other,) = [node for node in NODES if node != active]
    assert lab.wait_active(60.0, other_than=active) == other
    holders = lab.status(cluster=False)["egress_holders"]
    assert all(nodes == [other] for nodes in holders.values()), holders
    after = lab.send(20, domain="a.lab.test")
    assert after.all_acked, after
    assert senders_of(lab, list(after.ids_acked)) == expected
    # The lab's DNS has their PTRs: no relay warned (hamta.egress_ptr).
    for node in NODES:
        assert "EgressPtrMismatch" not in (lab.node_dir(node) / "relay.log").read_text()
