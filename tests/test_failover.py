"""Failover in the lab, for real: a pair of agents in namespaces under a continuous load.

Every test runs a client through the virtual IP and a sampler that checks, every 50 ms, that
at no instant two nodes hold the virtual IP, have the shared disk mounted, or listen for SMTP.
After each fault the whole history is checked against the sink: nothing acknowledged is lost.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.lab.history import LoadRun, recovery_time, unavailability
from cluster.lab.lab import Lab
from cluster.lab.topology import NODES
from tests.support.lab_checks import (
    Sampler,
    agent_decisions,
    drained,
    wait_pair,
    wait_until,
)
from tests.support.labs import module_lab

pytestmark = pytest.mark.root

PREFIX = "hft"
SUBNET = "198.19.246.0/24"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab with both agents for the whole module; each test leaves it with a pair."""
    # Under var/lab, where hamta looks for a lab when it is given no configuration.
    with module_lab(tmp_path_factory.mktemp("failover") / "var", PREFIX, SUBNET) as built:
        yield built


def test_kill_9_of_the_active_node_under_load(lab: Lab, tmp_path: Path) -> None:
    active = wait_pair(lab)
    peer = next(n for n in NODES if n != active)
    with Sampler(lab):
        load = LoadRun(lab, tmp_path / "history.jsonl", rate=20, connections=2)
        try:
            wait_until(lambda: len(load.attempts()) >= 20, 20, "load started")
            fault = time.monotonic()
            lab.kill_node(active)
            assert lab.wait_active(30, other_than=active) == peer
            wait_until(lambda: recovery_time(load.attempts(), fault) is not None, 20, "a 250")
            rto = recovery_time(load.attempts(), fault)
            assert rto is not None and rto < 10, rto
            assert lab.vip_holders() == [peer]
            assert lab.spool_mounted_on() == [peer]
            lab.start_agent(active)
            wait_pair(lab)
        finally:
            attempts = load.stop()
    drained(lab, attempts)
    verdict = load.verdict(attempts)
    assert verdict.ok, verdict
    assert verdict.acked > 20


def test_zookeeper_connection_loss_of_the_active_node(lab: Lab, tmp_path: Path) -> None:
    active = wait_pair(lab)
    peer = next(n for n in NODES if n != active)
    zookeeper = ", ".join(host.split(":")[0] for host in lab.zookeeper_hosts.split(","))
    rules = (
        "table inet hamta_test {\n chain out {\n  type filter hook output priority 0;\n"
        f"  ip daddr {{ {zookeeper} }} tcp dport 2181 drop\n }}\n}}\n"
    )
    with Sampler(lab):
        load = LoadRun(lab, tmp_path / "history.jsonl", rate=20, connections=2)
        try:
            wait_until(lambda: len(load.attempts()) >= 20, 20, "load started")
            fault = time.monotonic()
            cut = lab.exec(active, ["nft", "-f", "-"], input=rules)
            assert cut.returncode == 0, cut.stderr
            try:
                # The cut-off node demotes itself; the peer takes over once its session expired.
                assert lab.wait_active(30, other_than=active) == peer
                wait_until(lambda: recovery_time(load.attempts(), fault) is not None, 20, "a 250")
                cut_off = agent_decisions(lab, active)
                assert any(d["trigger"] == "session_lost" for d in cut_off), cut_off[-5:]
            finally:
                lab.exec(active, ["nft", "delete", "table", "inet", "hamta_test"])
            # The peer powered it off (the lab's STONITH) before taking over; powered on
            # again, the old active node comes back as passive.
            # (The sampler's look into the namespace is a process there for milliseconds.)
            wait_until(lambda: lab.node_pids(active) == [], 5, "the node powered off")
            lab.start_agent(active)
            assert wait_pair(lab) == peer
        finally:
            attempts = load.stop()
    drained(lab, attempts)
    verdict = load.verdict(attempts)
    assert verdict.ok, verdict


def test_planned_switchover_under_load_loses_nothing(lab: Lab, tmp_path: Path) -> None:
    active = wait_pair(lab)
    peer = next(n for n in NODES if n != active)
    config = lab.node_dir(active) / "agent.toml"
    command = [lab.python, "-m", "hamtactl", "cluster", "switchover", "--to", peer, "--json"]
    with Sampler(lab):
        load = LoadRun(lab, tmp_path / "history.jsonl", rate=20, connections=2)
        try:
            wait_until(lambda: len(load.attempts()) >= 20, 20, "load started")
            started = time.monotonic()
            done = lab.exec("client", [*command, "--config", str(config)], timeout=60)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["to"] == peer
            wait_until(lambda: recovery_time(load.attempts(), started) is not None, 20, "a 250")
            time.sleep(1)  # a second of load on the new active node
        finally:
            attempts = load.stop()
    refused_for = unavailability(attempts, started)
    assert refused_for < 5, f"clients were refused for {refused_for:.2f}s"
    assert wait_pair(lab) == peer
    drained(lab, attempts)
    verdict = load.verdict(attempts)
    assert verdict.ok, verdict


def test_hamta_cluster_commands_act_on_the_lab(lab: Lab) -> None:
    config = lab.node_dir(NODES[0]) / "agent.toml"
    status = lab.exec(
        "client", [lab.python, "-m", "hamtactl", "cluster", "status", "--config", str(config)]
    )
    assert status.returncode == 0, status.stderr
    assert "active" in status.stdout and "passive" in status.stdout
    history = lab.exec(
        "client", [lab.python, "-m", "hamtactl", "cluster", "history", "--config", str(config)]
    )
    assert history.returncode == 0 and "epoch" in history.stdout, history.stderr
    # From the host with no configuration at all, hamta finds the lab in ./var/lab.
    host = subprocess.run(
        [lab.python, "-m", "hamtactl", "cluster", "status", "--json"],
        cwd=lab.directory.parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert host.returncode == 0, host.stderr
    assert json.loads(host.stdout)["leader"] in NODES
