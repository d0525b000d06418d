"""bench/partition_baseline.py: keepalived + Postfix through the chaos suite's partitions.

What the comparison in the chaos report claims is checked here on the real thing: a node cut off
from everything keeps the virtual IP while its peer takes it too (split brain), and a cut from
ZooKeeper changes nothing for a pair that does not use it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.lab import netns
from cluster.lab.topology import Topology

pytestmark = [pytest.mark.root, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "partition_baseline.py"
PREFIX = "hpt"
SUBNET = "198.18.5.0/24"


def test_keepalived_gives_the_vip_to_both_nodes_of_a_partition() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--prefix", PREFIX, "--subnet", SUBNET],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {item["scenario"]: item for item in json.loads(done.stdout.strip().splitlines()[-1])}
    assert set(results) == {"partition-zk", "partition-node"}
    cut = results["partition-node"]
    assert cut["split_brain"] and cut["two_vip_holders_s"] > 1.0, cut
    assert not results["partition-zk"]["split_brain"], results["partition-zk"]
    namespaces = Topology.build(PREFIX, SUBNET).namespaces
    assert not any(netns.exists(name) for name in namespaces)
