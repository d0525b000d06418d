"""The Vagrant fleet end to end: two pairs on one ensemble (``HAMTA_PAIRS=2``), real DRBD in each.

Marker ``vagrant``, left out of the default run (``addopts``); run it as root with::

    .venv/bin/pytest -m vagrant tests/test_vagrant_fleet.py -n 0 -s

Five machines (mx1+mx2, pair ``vagrant1`` with the first VIP; mx3+mx4, pair ``vagrant2`` with
the second; the arbiter, third ZooKeeper server and MX sink of both), brought up and torn down
by the same fixture code as the one-pair suite (``tests/support/vagrant.py``, where
``HAMTA_VAGRANT_WORKDIR`` and ``HAMTA_VAGRANT_KEEP`` are described). In order:
``hamta fleet status --json`` on a node, as the fleet's reader, lists both pairs with their
nodes and an active node each; then, for each pair in turn, with load through BOTH virtual IPs,
the pair's active machine is powered off (``virsh destroy``): its peer takes over the DRBD spool
and every acknowledged message of that pair is delivered, while the other pair keeps its leader
and epoch (no failover), refuses nothing and loses nothing. Each takeover's RTO (the client's
first 250 after the cut) and its promotion steps (the new active agent's journal) are printed
and kept in ``fleet-failovers.jsonl`` in the work directory.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cluster.lab.history import recovery_time
from cluster.lab.vagrant import VagrantCluster, VagrantError, wait_for
from tests.support import vagrant as suite

sys.path.insert(0, str(suite.ROOT / "bench"))
from failover_pairs import decisions_until_active, takeover_phases

pytestmark = [pytest.mark.vagrant, pytest.mark.root, pytest.mark.timeout(10800)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VagrantCluster]:
    """The two-pair cluster, up and provisioned; destroyed and its host side removed after."""
    yield from suite.vagrant_cluster(tmp_path_factory, pairs=2)


def _no_failover(status: dict[str, Any] | None) -> tuple[object, ...]:
    """What a failover would change in a pair's ``cluster status``: leader, epoch, last one."""
    assert status is not None, "the pair's status could not be read"
    return (status.get("leader"), status.get("epoch"), status.get("last_failover"))


def test_fleet_status_on_a_node_lists_both_pairs(fleet: VagrantCluster) -> None:
    """``hamta fleet status --json`` on mx1 as the reader: both pairs, each with its leader."""
    pairs = fleet.inventory.pairs
    assert [(p.name, p.nodes) for p in pairs] == [
        ("vagrant1", ("mx1", "mx2")),
        ("vagrant2", ("mx3", "mx4")),
    ]
    leaders = {p.name: fleet.pair(p.name).wait_active(suite.TAKEOVER_TIMEOUT) for p in pairs}
    status = fleet.fleet_status(fleet.mail_nodes[0])
    listed = {entry["pair"]: entry for entry in status["pairs"]}
    print(json.dumps(status, indent=1))
    assert set(listed) == set(leaders)
    for pair in pairs:
        entry = listed[pair.name]
        assert entry["problem"] is None, entry
        assert entry["leader"] == leaders[pair.name], entry
        roles = {node["node"]: node["role"] for node in entry["nodes"]}
        assert set(roles) == set(pair.nodes), entry
        assert roles[leaders[pair.name]] == "active", entry


@pytest.mark.parametrize("index", [0, 1], ids=["pair1", "pair2"])
def test_power_off_in_one_pair_leaves_the_other_serving(fleet: VagrantCluster, index: int) -> None:
    """``virsh destroy`` of pair N's active machine with load on both pairs.

    Pair N: the peer takes over (DRBD promoted, spool mounted), nothing acknowledged is lost.
    The other pair: same leader, epoch and last failover as before, every attempt acknowledged,
    every acknowledged message delivered.
    """
    names = [p.name for p in fleet.inventory.pairs]
    hit, other = fleet.pair(names[index]), fleet.pair(names[1 - index])
    source = hit.wait_active(suite.TAKEOVER_TIMEOUT)
    target = hit.wait_ready_for_switchover(suite.REJOIN_TIMEOUT)
    other.wait_active(suite.TAKEOVER_TIMEOUT)
    before = _no_failover(other.cluster_status())
    hit_load = suite.start_load(hit, f"fleet-{hit.pair_name}-cut")
    other_load = suite.start_load(other, f"fleet-{other.pair_name}-beside")
    try:
        suite.wait_acked(hit_load, 120.0)
        suite.wait_acked(other_load, 120.0)
        time.sleep(5.0)
        cut, cut_wall = time.monotonic(), time.time()
        hit.power_off(source)
        assert hit.wait_active(suite.TAKEOVER_TIMEOUT, other_than=source) == target
        rto = wait_for(lambda: recovery_time(hit_load.attempts(), cut), suite.TAKEOVER_TIMEOUT, 0.5)
        assert rto is not None, f"no 250 through {hit.vip} after the power-off"
        time.sleep(5.0)
    finally:
        hit_load.stop()
        beside = other_load.stop()
    decisions = wait_for(lambda: decisions_until_active(hit.agent_log(target, cut_wall)), 60.0, 2.0)
    if decisions is None:
        raise VagrantError(f"no 'active' decision in {target}'s journal after the cut")
    phases, anomalies = takeover_phases(decisions, cut_wall)
    record = {
        "pair": hit.pair_name,
        "source": source,
        "target": target,
        "rto_s": round(rto, 2),
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "anomalies": anomalies,
    }
    print(json.dumps(record))
    with (fleet.workdir / "fleet-failovers.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(record) + "\n")
    role = hit.ssh(target, "sudo drbdadm role all && findmnt -n -o SOURCE /var/spool/hamta")
    assert role.returncode == 0, role.stderr
    assert role.stdout.split()[0].startswith("Primary"), role.stdout
    assert "/dev/drbd" in role.stdout
    # The other pair: no failover, no refusal (nor an unanswered attempt), no loss.
    assert _no_failover(other.cluster_status()) == before
    missed = [a for a in beside if a.outcome != "acked"]
    assert not missed, f"{other.pair_name} did not acknowledge {len(missed)}: {missed[:5]}"
    suite.drained(hit_load)
    suite.drained(other_load)
    hit.power_on(source)
    hit.wait_passive(source, suite.REJOIN_TIMEOUT)


def test_destroy_removes_every_machine_network_and_disk(fleet: VagrantCluster) -> None:
    """``vagrant destroy -f`` of the five machines leaves no domain, network or disk."""
    suite.assert_destroyed(fleet)
