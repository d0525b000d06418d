"""A cut of the peer channel alone fences nobody (issue 17), in the lab.

The channel between the agents is cut with nftables (its UDP port dropped both ways on the
active node) while both nodes still reach ZooKeeper: the passive node stops hearing the leader,
but the leader's pulse in ZooKeeper goes on advancing, so it says so once
(``peer_channel_silent_leader_alive``) and fences nobody; the active node serves on, every
attempt acknowledged. Once the channel is back it says that too. A node that really dies
(frozen whole: its pulse stops with it) is still fenced and replaced on the fast path.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from cluster.lab import partitions
from cluster.lab.history import recovery_time
from cluster.lab.lab import Lab
from cluster.operator import format_status
from tests.support.lab_checks import Sampler, agent_decisions, drained, wait_pair, wait_until
from tests.support.labs import module_lab
from tests.test_fencing_lab import start_load

pytestmark = pytest.mark.root

PREFIX = "hq"
SUBNET = "198.19.201.0/24"
CUT = 8.0  # seconds: eight peer_timeouts, four session timeouts


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with module_lab(tmp_path_factory.mktemp("channel-cut"), PREFIX, SUBNET) as built:
        yield built


def other(node: str) -> str:
    return "node2" if node == "node1" else "node1"


def test_a_cut_peer_channel_fences_nobody_and_the_active_node_serves_on(
    lab: Lab, tmp_path: Path
) -> None:
    active = wait_pair(lab)
    passive = other(active)
    seen = len(agent_decisions(lab, passive))
    pids = set(lab.node_pids(active))
    with Sampler(lab):
        load = start_load(lab, tmp_path / "history.jsonl")
        try:
            fault = time.monotonic()  # the load's clock
            partitions.cut_peer_channel(lab, active)
            try:
                time.sleep(CUT)  # the fault's length: nothing is awaited, the load runs on
                assert wait_pair(lab) == active
                status = lab.cluster_status()  # ``hamta cluster status --json``
            finally:
                partitions.lift(lab, active)
            wait_until(
                lambda: any(
                    d["trigger"] == "peer_channel_heard" for d in agent_decisions(lab, passive)
                ),
                10,
                "the channel heard again",
            )
        finally:
            attempts = load.stop()
    decisions = agent_decisions(lab, passive)[seen:]
    triggers = [d["trigger"] for d in decisions]
    during = [a for a in attempts if fault <= a.start <= fault + CUT]
    refused = [a for a in attempts if a.outcome != "acked"]
    print(f"peer channel cut {CUT:g}s: {len(during)} attempts, {len(refused)} not acknowledged")
    print(f"{passive}'s decisions meanwhile: {triggers}")
    assert len(during) > CUT * 10  # the load went on throughout
    assert refused == [], refused[:5]
    # Not fenced: no fence was even started, and the active node's processes all live on.
    started = [step for d in decisions for step in cast(list[str], d["actions"])]
    assert "fence" not in started, decisions
    assert "peer_silent" not in triggers
    assert pids <= set(lab.node_pids(active))
    assert wait_pair(lab) == active
    # Said once, as a warning, and once when it ended.
    cut = [d for d in decisions if d["trigger"] == "peer_channel_silent_leader_alive"]
    assert len(cut) == 1, triggers
    assert cut[0]["level"] == "warning"
    assert "the peer channel is cut, not the node" in str(cut[0]["note"])
    # ... and shown by ``hamta cluster status`` while it lasted.
    assert status is not None
    assert {n["node"]: n["channel_silent"] for n in status["nodes"]} == {
        active: None,
        passive: active,
    }
    assert f"PEER CHANNEL CUT: {passive} hears nothing from {active}" in format_status(status)
    heard = [d for d in decisions if d["trigger"] == "peer_channel_heard"]
    assert [d["note"] for d in heard] == [
        f"peer channel to {active}: heard again over the peer channel"
    ]
    drained(lab, attempts)
    verdict = load.verdict(attempts)
    assert verdict.ok, verdict


def test_a_frozen_active_node_still_takes_the_fast_path(lab: Lab, tmp_path: Path) -> None:
    """Frozen whole (SIGSTOP: agent, relay and watchdog; nothing ends its session): its
    heartbeats and its pulse stop together, and the peer fences it and takes over before its
    session expires."""
    active = wait_pair(lab)
    peer = other(active)
    seen = len(agent_decisions(lab, peer))
    with Sampler(lab):
        load = start_load(lab, tmp_path / "history.jsonl")
        try:
            fault = time.monotonic()
            lab.kill_node(active, signal.SIGSTOP)
            assert lab.wait_active(30, other_than=active) == peer
            wait_until(lambda: recovery_time(load.attempts(), fault) is not None, 20, "a 250")
        finally:
            attempts = load.stop()
    rto = recovery_time(attempts, fault)
    decisions = agent_decisions(lab, peer)[seen:]
    triggers = [d["trigger"] for d in decisions]
    print(f"frozen {active}: {peer} serving after RTO {rto:.3f}s; its decisions: {triggers[:4]}")
    assert triggers[:2] == ["peer_silent", "peer_fenced"], triggers
    drained(lab, attempts)
    verdict = load.verdict(attempts)
    assert verdict.ok, verdict
