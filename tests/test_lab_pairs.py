"""``hamta lab up --pairs N``: several pairs on the lab's one ensemble (issue 20 §1).

The pure part (names, addresses, configurations) runs anywhere; the namespace part builds two
pairs (prefix ``hp``, subnet 198.19.195.0/24), kills -9 pair 1's active node under load on
pair 2, and checks that pair 1 fails over while pair 2 keeps its active node, its epoch and
every message it was sent, as ``hamta fleet status --json`` reads it with the fleet reader.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from chaos.other_pairs import PairOutcome, role_changes_logged
from cluster.lab import configs
from cluster.lab.commands import format_status
from cluster.lab.lab import Lab, LabError
from cluster.lab.results import SendResult
from cluster.lab.topology import HOSTS, NODES, Topology, TopologyError
from tests.support.relay import HAMTA

PREFIX = "hp"
SUBNET = "198.19.195.0/24"


# ------------------------------------------------------------------ without root


def test_one_pair_keeps_the_names_and_addresses_of_the_lab() -> None:
    one = Topology.build("hamta", "198.18.0.0/24")
    assert one.hosts == HOSTS
    assert one.nodes == NODES
    assert one.pair_names == ("lab",)
    assert one.pair_vip("lab") == one.vip
    assert [str(one.address(h)) for h in HOSTS] == [
        "198.18.0.11",
        "198.18.0.12",
        "198.18.0.13",
        "198.18.0.21",
        "198.18.0.22",
        "198.18.0.31",
        "198.18.0.41",
    ]


def test_each_pair_has_its_own_nodes_vip_and_addresses_inside_the_subnet() -> None:
    three = Topology.build(PREFIX, SUBNET, 3)
    assert three.pair_names == ("lab", "lab2", "lab3")
    assert three.pair_nodes("lab") == ("node1", "node2")
    assert three.pair_nodes("lab3") == ("p3node1", "p3node2")
    assert three.pair_of("p2node2") == "lab2"
    addresses = [three.address(h) for h in three.hosts]
    vips = [three.pair_vip(p).ip for p in three.pair_names]
    assert len(set(addresses + vips)) == len(addresses) + len(vips)
    assert all(a in three.subnet for a in addresses + vips)
    assert "hp-p2node1" in three.namespaces
    assert three.host_of_namespace("hp-p3node2") == "p3node2"
    # A /25 still holds three pairs (the VIPs end at .102, below its broadcast address).
    small = Topology.build(PREFIX, "198.19.195.0/25", 3)
    assert all(small.pair_vip(p).ip in small.subnet for p in small.pair_names)


def test_more_pairs_than_the_lab_builds_are_refused_with_a_clear_message() -> None:
    for pairs in (0, 4):
        with pytest.raises(TopologyError, match="1 to 3 pairs"):
            Topology.build(PREFIX, SUBNET, pairs)
    with pytest.raises(LabError, match="1 to 3 pairs"):
        Lab(Path("/nonexistent"), prefix=PREFIX, subnet=SUBNET, pairs=4)
    with pytest.raises(TopologyError, match="no node"):
        Topology.build(PREFIX, SUBNET, 2).pair_of("p3node1")


def test_a_pair_agent_names_its_own_cluster_peer_vip_and_the_fleet_reader(
    tmp_path: Path,
) -> None:
    topology = Topology.build(PREFIX, SUBNET, 2)
    agent = configs.agent_config(
        topology,
        "p2node1",
        tmp_path,
        credentials=tmp_path / "zk-credentials-lab2",
        device="/dev/loop9",
        fence_command=["true"],
        peer_secret=tmp_path / "peer-secret-lab2",
        fleet_reader="hamta-fleet:abc=",
    )
    assert agent["agent"]["cluster"] == "lab2"
    assert agent["agent"]["peers"] == {"p2node2": "198.19.195.52:7946"}
    assert agent["agent"]["fleet_reader"] == "hamta-fleet:abc="
    assert agent["vip"]["address"] == "198.19.195.101/24"
    one = configs.agent_config(
        topology,
        "node1",
        tmp_path,
        credentials=tmp_path / "zk-credentials",
        device="/dev/loop8",
        fence_command=["true"],
        peer_secret=tmp_path / "peer-secret",
    )
    assert one["agent"]["cluster"] == "lab" and "fleet_reader" not in one["agent"]
    assert one["agent"]["peers"] == {"node2": "198.19.195.22:7946"}


# ------------------------------------------------------------------ two pairs in namespaces


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two pairs on the lab's one ensemble, with their agents, without monitors."""
    directory = tmp_path_factory.mktemp("pairs") / "lab"
    # A run killed half-way may have left namespaces of this prefix behind.
    Lab(directory.parent / "leftovers", prefix=PREFIX, subnet=SUBNET, pairs=2).down()
    built = Lab(directory, prefix=PREFIX, subnet=SUBNET, pairs=2)
    try:
        built.up(wait=90.0, monitors=False)
        yield built
    finally:
        built.down()


def roles(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{pair: {node: (role, epoch)}}`` from ``hamta fleet status --json``."""
    return {
        p["pair"]: {n["node"]: (n["role"], n["epoch"]) for n in p["nodes"]} for p in status["pairs"]
    }


@pytest.mark.root
def test_each_pair_has_its_own_active_node_vip_and_spool(pairs: Lab) -> None:
    assert pairs.pair_names == ("lab", "lab2")
    for pair in pairs.pair_names:
        active = pairs.wait_active(30.0, pair=pair)
        assert active in pairs.pair_nodes(pair)
        assert pairs.vip_holders(pair) == [active]
        assert pairs.spool_mounted_on(pair) == [active]
    status = pairs.status(cluster=False)
    assert set(status["pairs"]) == {"lab", "lab2"}
    # Each pair's agents authenticate as their own user.
    assert pairs.directory.joinpath("zk-credentials-lab2").read_text().startswith("hamta-lab2:")


@pytest.mark.root
def test_a_failover_in_pair_1_leaves_pair_2_untouched_under_load(pairs: Lab) -> None:
    before = roles(pairs.fleet_status())
    assert set(before) == {"lab", "lab2"}
    old = pairs.wait_active(30.0, pair="lab")
    other = pairs.wait_active(30.0, pair="lab2")
    assert before["lab2"][other][0] == "active"

    load: list[SendResult] = []
    sender = threading.Thread(
        target=lambda: load.append(pairs.send(60, pair="lab2", timeout=40.0, connections=2))
    )
    sender.start()
    pairs.kill_node(old)
    new = pairs.wait_active(30.0, other_than=old, pair="lab")
    sender.join(60.0)

    assert new != old and new in pairs.pair_nodes("lab")
    assert load, "the load on pair 2 did not finish"
    assert load[0].all_acked, load[0].summary()  # no refusal, no error on pair 2
    assert pairs.wait_active(5.0, pair="lab2") == other
    after = roles(pairs.fleet_status())
    assert after["lab2"][other] == before["lab2"][other]  # same role, same epoch
    assert after["lab"][new][0] == "active"
    assert after["lab"][new][1] > before["lab"][old][1]


# ------------------------------------------------------------------ chaos --pair, without root


def _decision(at: float, was: str, role: str) -> str:
    stamp = datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")
    fields = {"event": "Decision", "was": was, "role": role, "trigger": "t", "ts": stamp}
    return json.dumps(fields) + "\n"


def test_a_role_change_in_another_pair_fails_the_iteration(tmp_path: Path) -> None:
    lab = Lab(tmp_path / "lab", prefix="hp", subnet=SUBNET, pairs=2, pair="lab")  # never up
    other = lab.for_pair("lab2")
    assert other.nodes == ("p2node1", "p2node2") and other.vip == "198.19.195.101"
    for node in other.nodes:
        other.node_dir(node).mkdir(parents=True)
    wall = 1_800_000_000.0
    (other.node_dir("p2node1") / "agent.log").write_text(
        _decision(wall + 5, "active", "active")  # no change: not counted
        + _decision(wall + 10, "active", "demoting")
        + _decision(wall + 500, "passive", "promoting")  # after the iteration
    )
    changes = role_changes_logged(other, 0.0, 100.0, wall)
    assert changes == ["p2node1: active -> demoting (t)"]
    quiet = PairOutcome("lab2", sent=50, acked=50, refused=0, failed=0, lost=0, role_changes=())
    assert quiet.problems == []
    hurt = PairOutcome("lab2", 50, 47, 2, 1, 1, tuple(changes))
    assert [p.split(":")[1].strip() for p in hurt.problems] == [
        "role changed",
        "2 attempt(s) refused, 1 cut off",
        "1 acknowledged message(s) lost",
    ]


def test_chaos_refuses_a_pair_the_lab_would_not_have() -> None:
    done = subprocess.run(
        [*HAMTA, "chaos", "run", "--scenario", "kill-node", "--pair", "lab3", "--pairs", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "no pair 'lab3' in the lab (pairs: lab, lab2)" in done.stderr


def test_lab_status_marks_each_pairs_vip_holder_and_lists_the_pairs() -> None:
    host = {"namespace": "hp-x", "address": "198.19.195.1", "exists": True, "processes": []}
    status = {
        "prefix": "hp",
        "directory": "/lab",
        "up": True,
        "subnet": SUBNET,
        "vip": "198.19.195.100/24",
        "zookeeper_hosts": "",
        "hosts": {n: host for n in ("node1", "node2", "p2node1", "p2node2")},
        "zookeeper": {},
        "relays": {"node1": "active", "node2": "standby", "p2node1": None, "p2node2": "active"},
        "vip_holders": ["node1"],
        "spool_mounted_on": ["node1"],
        "loop_device": "/dev/loop1",
        "pairs": {
            "lab": {
                "nodes": ["node1", "node2"],
                "vip": "v1",
                "vip_holders": ["node1"],
                "spool_mounted_on": ["node1"],
            },
            "lab2": {
                "nodes": ["p2node1", "p2node2"],
                "vip": "v2",
                "vip_holders": ["p2node2"],
                "spool_mounted_on": ["p2node2"],
            },
        },
    }
    text = format_status(status)
    assert "[relay active] [VIP] [spool mounted]" in text.splitlines()[7]  # p2node2
    assert "pair lab2: p2node1, p2node2; VIP v2 on p2node2" in text
