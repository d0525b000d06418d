"""Failsafe in the lab: every ZooKeeper server stopped under client load (issue 17, section 1).

With the peer channel up, the active node serves on through the outage on its peer's lease:
no refusal, and it says "serving in failsafe since ..." (its log, and ``hamta cluster status``
from its state directory while ZooKeeper cannot be read). With the channel cut as well
(nftables on the peer port), it has nothing to confirm with and demotes as before.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from chaos.faults import agent_pid
from cluster.lab import partitions
from cluster.lab.history import LoadRun
from cluster.lab.lab import Lab
from cluster.lab.topology import NODES
from cluster.zookeeper import ZooKeeperServer
from tests.support.agents import wait_for
from tests.support.lab_checks import Sampler, agent_decisions, drained, wait_pair, wait_until
from tests.support.labs import module_lab

pytestmark = pytest.mark.root
HAMTA = (sys.executable, "-m", "hamtactl")

PREFIX = "hf1"
SUBNET = "198.19.150.0/24"
OUTAGE = 12.0  # seconds: several leases (3 s) and session timeouts (2 s) long


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with module_lab(tmp_path_factory.mktemp("failsafe"), PREFIX, SUBNET) as built:
        yield built


def stop_zookeeper(lab: Lab) -> None:
    for server in lab.ensemble.servers:
        server.kill()


def start_zookeeper(lab: Lab) -> None:
    for server in lab.ensemble.servers:
        server.start()
    for server in lab.ensemble.servers:
        server.wait_serving(60)


def local_status(lab: Lab, node: str) -> str:
    """``hamta cluster status`` with ``node``'s configuration, while ZooKeeper is down."""
    done = subprocess.run(
        [*HAMTA, "cluster", "status", "--config", str(lab.node_dir(node) / "agent.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done
    return done.stdout


def test_a_zookeeper_outage_under_load_costs_no_refusal(lab: Lab, tmp_path: Path) -> None:
    active = wait_pair(lab)
    with Sampler(lab):
        load = LoadRun(lab, tmp_path / "history.jsonl", rate=20, connections=2)
        try:
            wait_until(lambda: len(load.attempts()) >= 20, 20, "load started")
            fault = time.monotonic()  # the load's clock
            stop_zookeeper(lab)
            try:
                time.sleep(OUTAGE / 2)
                status = local_status(lab, active)
                time.sleep(max(0.0, OUTAGE - (time.monotonic() - fault)))
            finally:
                start_zookeeper(lab)
            assert wait_pair(lab) == active
            time.sleep(2)
        finally:
            attempts = load.stop()
    refused = [a for a in attempts if a.outcome != "acked"]
    during = [a for a in attempts if fault <= a.start <= fault + OUTAGE]
    print(f"ZooKeeper down {OUTAGE:g}s: {len(during)} attempts, {len(refused)} not acknowledged")
    assert len(during) > OUTAGE * 10  # the load went on throughout
    assert refused == [], refused[:5]
    assert f"this node ({active}), by its agent: active" in status
    assert "serving in failsafe since" in status
    decisions = agent_decisions(lab, active)
    entered = [d for d in decisions if d["trigger"] == "failsafe_entered"]
    assert entered and str(entered[-1]["note"]).startswith("serving in failsafe")
    assert not any(d["trigger"] == "session_lost" for d in decisions)
    drained(lab, attempts)
    verdict = load.verdict(attempts)
    assert verdict.ok, verdict


def test_with_the_peer_channel_cut_too_the_active_node_demotes(lab: Lab) -> None:
    active = wait_pair(lab)
    # ZooKeeper first, then the channel at once: the question is a quorum loss with nothing to
    # confirm with (a channel cut alone is tests/test_peer_channel_cut_lab.py's). With the
    # ensemble gone the passive node's session is suspended and it fences nobody; the lease it
    # granted last runs out. The channel comes back before the ensemble does, so that the test
    # ends on a plain outage.
    fault = time.monotonic()
    stop_zookeeper(lab)
    partitions.cut_peer_channel(lab, active)
    try:
        try:
            # The agent's own decision, not an SMTP probe: a probe slow under load is no demotion.
            wait_until(
                lambda: any(d["trigger"] == "session_lost" for d in agent_decisions(lab, active)),
                15,
                "the active node demoted (session_lost)",
            )
            demoted = time.monotonic() - fault
        finally:
            partitions.lift(lab, active)
    finally:
        start_zookeeper(lab)
    print(f"demoted {demoted:.2f}s after ZooKeeper stopped, the peer channel cut")
    assert demoted < 5.0
    wait_pair(lab)


def on_a_follower(lab: Lab, node: str) -> ZooKeeperServer:
    """The follower ``node``'s agent is connected to; while it is on the ensemble's leader,
    the leader is restarted (its sessions move, and a restart costs no demotion)."""
    for _ in range(6):
        server: ZooKeeperServer = wait_for(
            partial(lab.ensemble.server_of, agent_pid(lab, node)), 10, f"{node}'s server"
        )
        if server.mode() == "follower":
            return server
        server.stop()
        server.start()
        server.wait_serving(60)
        wait_pair(lab)
    raise AssertionError(f"{node} kept coming back to the ensemble's leader")


def test_a_stopped_zookeeper_leader_costs_no_demotion(lab: Lab, tmp_path: Path) -> None:
    """SIGSTOP of the ensemble's leader: its followers answer reads from memory until they elect
    another (2.5 s of the lab's ticks, and the election), yet commit nothing; the active node's
    heartbeat cannot be written, and its session deadline comes first. The passive node, its
    reads answered by a follower, is cut off all the same (its syncs go unanswered) and grants
    the lease. The CI's chaos run saw it refuse as "connected", and the active node demote."""
    active = wait_pair(lab)
    passive = next(node for node in NODES if node != active)
    follower = on_a_follower(lab, passive)
    active = wait_pair(lab)
    leader = next(s for s in lab.ensemble.servers if s.mode() == "leader")
    decisions = len(agent_decisions(lab, active))
    with Sampler(lab):
        load = LoadRun(lab, tmp_path / "history.jsonl", rate=20, connections=2)
        try:
            wait_until(lambda: len(load.attempts()) >= 20, 20, "load started")
            leader.freeze()
            try:
                time.sleep(8.0)  # the election, and the sessions back on the new leader
            finally:
                leader.thaw()
            leader.wait_serving(60)
            time.sleep(2.0)
        finally:
            attempts = load.stop()
    triggers = [d["trigger"] for d in agent_decisions(lab, active)[decisions:]]
    print(f"leader {leader.spec.id} stopped, {passive} on {follower.spec.id}: {triggers}")
    # Past its session deadline (the followers give up on the leader after 2.5 s) on the
    # passive node's lease, and nothing else.
    assert triggers[:1] == ["failsafe_entered"], triggers
    assert set(triggers) <= {"failsafe_entered", "failsafe_ended"}, triggers
    assert wait_pair(lab) == active
    refused = [a for a in attempts if a.outcome != "acked"]
    assert refused == [], refused[:5]
    drained(lab, attempts)


def in_failsafe(lab: Lab, node: str) -> bool:
    """The node's last decision put it in failsafe."""
    decisions = agent_decisions(lab, node)
    return bool(decisions) and decisions[-1]["trigger"] == "failsafe_entered"


def lab_command(lab: Lab, *words: str) -> subprocess.CompletedProcess[str]:
    argv = [*HAMTA, "lab", *words, "--dir", str(lab.directory)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def test_as_a_newcomer_sees_it_serve_on_and_then_stop_for_the_peer(lab: Lab) -> None:
    """What ``lab up`` suggests trying: both nodes cut off from ZooKeeper (the ensemble itself
    runs on), mail still flows; ZooKeeper back for the passive node only: it takes over, after
    the failsafe node stopped (the sampler sees no overlap)."""
    active = wait_pair(lab)
    passive = next(node for node in NODES if node != active)
    with Sampler(lab):
        try:
            for node in (passive, active):
                cut = lab_command(lab, "cut", node, "--from", "zookeeper")
                assert cut.returncode == 0, cut.stderr
            wait_until(lambda: in_failsafe(lab, active), 15, f"{active} serving in failsafe")
            time.sleep(2.0)  # past its session's deadline: on the leases alone
            sent = lab_command(lab, "send", "--count", "5")
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert in_failsafe(lab, active), agent_decisions(lab, active)[-3:]
            assert lab_command(lab, "heal", passive).returncode == 0
            assert lab.wait_active(30, other_than=active) == passive
        finally:
            for node in NODES:
                lab_command(lab, "heal", node)
    if not lab.node_pids(active):  # fenced by its peer's takeover: started again
        lab.start_agent(active)
    assert wait_pair(lab) == passive
