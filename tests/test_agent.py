"""Two real agents on loopback with a real ZooKeeper: election, failover, switchover, pause.

Each agent starts its own relay; the pair shares a spool directory. What the lab adds (virtual
IP, block device, namespaces, partitions) is tested in test_lab.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.agent import trusted_failover
from cluster.config import load_agent_config
from cluster.coordination import Coordinator
from cluster.coordination_layout import ROOT, CoordinationError, Credentials
from cluster.decision_data import Role
from cluster.operator import OperatorError, operator_session, switchover
from cluster.zookeeper import ServerSpec, ZooKeeperServer
from tests.support import DnsServer, RecordingSink, free_port
from tests.support.agents import AgentNode, message_ids, wait_for

NODE_HOSTS = {"node1": "127.0.0.21", "node2": "127.0.0.22"}


@pytest.fixture(scope="module")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    """A standalone ZooKeeper on loopback with 250 ms ticks (2 s sessions allowed)."""
    spec = ServerSpec(1, "127.0.0.1", client_port=free_port("127.0.0.1"))
    server = ZooKeeperServer(spec, tmp_path_factory.mktemp("zk"), tick_ms=250)
    server.start()
    try:
        server.wait_serving(60)
        yield server
    finally:
        server.stop()


class Pair:
    """Two agent nodes, ZooKeeper credentials, and an operator's view of the cluster."""

    def __init__(
        self,
        tmp_path: Path,
        zookeeper: str,
        dns: DnsServer,
        mx_port: int,
        cluster: str,
        agent: dict[str, Any] | None = None,
    ) -> None:
        self.credentials = tmp_path / "zk-credentials"
        self.credentials.write_text(f"hamta:{cluster}-secret\n")
        self.credentials.chmod(0o600)
        # Each test's cluster has its own password: a chroot of its own, as two clusters of two
        # users need on one ensemble (the first one's /hamta is closed to the other).
        self.zookeeper = f"{zookeeper}/{cluster}"
        self.cluster = cluster
        smtp_port = free_port("127.0.0.21")
        relay: dict[str, dict[str, Any]] = {
            "dns": {"nameservers": [dns.nameserver]},
            "delivery": {"port": mx_port},
        }
        self.nodes = {
            name: AgentNode(
                tmp_path,
                name,
                host=host,
                smtp_port=smtp_port,
                zookeeper=self.zookeeper,
                shared_spool=tmp_path / "shared",
                credentials=self.credentials,
                relay=relay,
                agent={"cluster": cluster, **(agent or {})},
            )
            for name, host in NODE_HOSTS.items()
        }

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def operator(self) -> Coordinator:
        coordinator = Coordinator(
            self.zookeeper,
            self.cluster,
            "operator",
            session_timeout=4.0,
            credentials=Credentials.from_file(self.credentials),
        )
        coordinator.start(10)
        return coordinator

    def roles(self) -> dict[str, Role]:
        try:
            coordinator = self.operator()
        except CoordinationError:  # no agent has created the cluster yet
            return {}
        try:
            view = coordinator.view()
        finally:
            coordinator.stop()
        return {name: member.role for name, member in view.members.items()}

    def wait_active(self, timeout: float = 30.0, *, not_: str | None = None) -> AgentNode:
        """Wait until exactly one node is active (other than ``not_``) and passive peers idle."""

        def one_active() -> AgentNode | None:
            roles = self.roles()
            active = [name for name, role in roles.items() if role is Role.ACTIVE]
            if len(active) == 1 and active[0] != not_:
                return self.nodes[active[0]]
            return None

        node: AgentNode = wait_for(one_active, timeout, "one active node", every=0.1)
        return node

    def other(self, node: AgentNode) -> AgentNode:
        return next(n for n in self.nodes.values() if n is not node)


@pytest.fixture
def pair(
    tmp_path: Path,
    zookeeper: ZooKeeperServer,
    dns_server: DnsServer,
    mx_port: int,
    request: pytest.FixtureRequest,
) -> Iterator[Pair]:
    """Two agents in a cluster of their own (named after the test), stopped at the end.

    A test's ``agent_settings`` mark adds keys to both agents' ``[agent]`` section.
    """
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    mark = request.node.get_closest_marker("agent_settings")
    agent = dict(mark.args[0]) if mark is not None else {}
    built = Pair(tmp_path, zookeeper.hosts, dns_server, mx_port, name, agent)
    try:
        yield built
    finally:
        built.stop()


def test_first_election_one_active_node_serves_and_the_passive_holds_nothing(
    pair: Pair, sink: RecordingSink
) -> None:
    pair.start()
    active = pair.wait_active()
    passive = pair.other(active)
    wait_for(lambda: pair.roles().get(passive.name) is Role.PASSIVE, 20, "passive peer")
    assert active.accepts_mail()
    assert not passive.accepts_mail(), "the passive relay must not listen"
    acked = active.send(3, tag="first-")
    wait_for(lambda: len(sink.messages) >= 3, 20, "deliveries")
    assert message_ids(sink) >= set(acked)

    # One JSON decision line per decision, with its trigger; the promotion's steps are timed.
    decisions = active.events("Decision")
    assert decisions and all("trigger" in d and "role" in d for d in decisions)
    final = next(d for d in decisions if d["role"] == "active")
    assert set(final["steps"]) == {
        "acquire",
        "fence",
        "storage",
        "epoch",
        "vip",
        "relay",
        "probe",
        "publish",
    }

    status = active.cli("cluster", "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["leader"] == active.name
    assert {n["node"]: n["role"] for n in data["nodes"]} == {
        active.name: "active",
        passive.name: "passive",
    }
    history = json.loads(active.cli("cluster", "history", "--json").stdout)
    assert history[-1]["node"] == active.name
    assert {"acquire", "storage", "relay", "probe"} <= set(history[-1]["steps"])
    table = active.cli("cluster", "status").stdout
    assert active.name in table and "active" in table


def test_kill_9_of_the_active_agent_fails_over_and_replays_its_queue(
    pair: Pair, mx_port: int
) -> None:
    pair.start()
    first = pair.wait_active()
    second = pair.other(first)
    wait_for(lambda: pair.roles().get(second.name) is Role.PASSIVE, 20, "passive peer")
    # The MX is down: the messages stay queued on the shared spool.
    acked = first.send(5, tag="queued-")
    relays = first.relay_pids()
    assert relays, "the agent runs its relay as a child"
    killed_at = time.monotonic()
    first.kill(signal.SIGKILL)
    # The relay dies with its agent (parent-death signal): nothing serves without leadership.
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in relays), 5, "relay gone")
    new = pair.wait_active(timeout=30, not_=first.name)
    assert new is second
    wait_for(second.accepts_mail, 10, "the new active node accepts mail")
    rto = time.monotonic() - killed_at
    assert rto < 15, f"failover took {rto:.1f}s"
    # Now the MX comes up: the new active node delivers what the old one had acknowledged.
    with RecordingSink(host="127.0.0.5", port=mx_port) as sink:
        wait_for(lambda: message_ids(sink) >= set(acked), 30, "replay")
    history = json.loads(second.cli("cluster", "history", "--json").stdout)
    assert history[-1]["node"] == second.name
    assert history[-1]["previous"] == first.name
    assert history[-1]["epoch"] > history[-2]["epoch"]


def test_kill_9_of_the_active_agent_ends_its_session_at_once(pair: Pair) -> None:
    pair.start()
    first = pair.wait_active()
    second = pair.other(first)
    wait_for(lambda: pair.roles().get(second.name) is Role.PASSIVE, 20, "passive peer")
    handed = wait_for(lambda: first.events("WatchdogSession"), 10, "session handed over")
    session_id = int(handed[-1]["session_id"], 16)
    root = f"/{pair.cluster}{ROOT}/{pair.cluster}"
    operator = pair.operator()
    client = operator.client

    def owned(path: str) -> bool:
        stat = client.exists(path)
        return stat is not None and stat.ephemeralOwner == session_id

    try:
        assert owned(f"{root}/leader") and owned(f"{root}/members/{first.name}")
        killed_at = time.monotonic()
        first.kill(signal.SIGKILL)
        while owned(f"{root}/leader") or owned(f"{root}/members/{first.name}"):
            assert time.monotonic() - killed_at < 5, "the dead agent's znodes linger"
            time.sleep(0.01)
        gone = time.monotonic() - killed_at
    finally:
        operator.stop()
    # The session's timeout is 2 s: without the watchdog ending it, they would last about that
    # long. Under load a closed session can take as long to go as an expired one: the proof is
    # the watchdog's line that it closed this session (its line may follow the znodes' end).
    ended = wait_for(lambda: first.events("WatchdogSessionEnded"), 30, "the watchdog's line")
    assert len(ended) == 1, ended
    assert ended[0]["outcome"] == "closed", (ended, f"znodes gone after {gone:.2f}s")
    assert ended[0]["session_id"] == f"0x{session_id:x}"
    assert pair.wait_active(timeout=30, not_=first.name) is second


def test_planned_switchover_hands_over_with_nothing_lost(pair: Pair, sink: RecordingSink) -> None:
    pair.start()
    first = pair.wait_active()
    second = pair.other(first)
    wait_for(lambda: pair.roles().get(second.name) is Role.PASSIVE, 20, "passive peer")
    acked = first.send(5, tag="before-")
    result = first.cli("cluster", "switchover", "--to", second.name, "--json")
    assert result.returncode == 0, result.stderr
    moved = json.loads(result.stdout)
    assert moved["from"] == first.name and moved["to"] == second.name
    assert moved["seconds"] < 10
    assert pair.wait_active() is second
    acked += second.send(5, tag="after-")
    wait_for(lambda: message_ids(sink) >= set(acked), 30, "deliveries")
    # The old active node is passive, not failed, and may take over again later.
    wait_for(lambda: pair.roles().get(first.name) is Role.PASSIVE, 20, "old active passive")
    assert not first.accepts_mail()


def test_switchover_is_refused_with_a_reason_when_the_target_cannot_take_over(
    pair: Pair,
) -> None:
    pair.start()
    first = pair.wait_active()
    refused = first.cli("cluster", "switchover", "--to", "nosuchnode")
    assert refused.returncode == 1
    assert "nosuchnode is not a member" in refused.stderr
    itself = first.cli("cluster", "switchover", "--to", first.name)
    assert itself.returncode == 1 and "already the active node" in itself.stderr
    second = pair.other(first)
    second.stop()
    wait_for(lambda: second.name not in pair.roles(), 10, "peer gone")
    alone = first.cli("cluster", "switchover")
    assert alone.returncode == 1 and "no healthy passive node" in alone.stderr
    assert pair.roles()[first.name] is Role.ACTIVE
    # A decommissioned node is forgotten (no longer fenced); a connected one cannot be.
    connected = first.cli("cluster", "forget", "--node", first.name)
    assert connected.returncode == 1 and "stop its agent first" in connected.stderr
    forgotten = first.cli("cluster", "forget", "--node", second.name)
    assert forgotten.returncode == 0, forgotten.stderr


def test_of_two_switchovers_at_once_one_happens_and_the_other_is_told_it_is_in_progress(
    pair: Pair,
) -> None:
    pair.start()
    first = pair.wait_active()
    second = pair.other(first)
    wait_for(lambda: pair.roles().get(second.name) is Role.PASSIVE, 20, "passive peer")
    config = load_agent_config(first.config)
    start = threading.Barrier(2)
    outcomes: list[dict[str, Any] | str] = []

    def operator() -> None:
        with operator_session(config) as session:
            start.wait(10)
            try:
                outcomes.append(switchover(session, None, config.agent.heartbeat, 20.0, 30.0))
            except OperatorError as exc:
                outcomes.append(str(exc))

    threads = [threading.Thread(target=operator) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    done = [o for o in outcomes if isinstance(o, dict)]
    refused = [o for o in outcomes if isinstance(o, str)]
    assert len(done) == 1 and len(refused) == 1, outcomes
    assert done[0]["from"] == first.name and done[0]["to"] == second.name
    assert f"a switchover from {first.name} to {second.name} is in progress" in refused[0]
    assert pair.wait_active() is second
    # Once it is over, the next one is a switchover like any other.
    wait_for(lambda: pair.roles().get(first.name) is Role.PASSIVE, 20, "old active passive")
    back = first.cli("cluster", "switchover", "--json")
    assert back.returncode == 0, back.stderr
    assert json.loads(back.stdout)["to"] == first.name


def test_pause_stops_automatic_failover_until_resumed(pair: Pair) -> None:
    pair.start()
    first = pair.wait_active()
    second = pair.other(first)
    wait_for(lambda: pair.roles().get(second.name) is Role.PASSIVE, 20, "passive peer")
    paused = first.cli("cluster", "pause", "--reason", "kernel upgrade")
    assert paused.returncode == 0, paused.stderr
    status = json.loads(first.cli("cluster", "status", "--json").stdout)
    assert status["paused"]["reason"] == "kernel upgrade"
    first.kill(signal.SIGKILL)
    # The session expires after 2 s; give the passive node ample time to (wrongly) promote.
    time.sleep(6)
    assert pair.roles() == {second.name: Role.PASSIVE}
    assert not second.accepts_mail()
    resumed = second.cli("cluster", "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert pair.wait_active(timeout=20) is second


def _freeze_relay(node: AgentNode, seconds: float) -> None:
    """Stop the node's relay process (SIGSTOP) for ``seconds``: a relay too slow to answer."""
    pids = node.relay_pids()
    assert pids, "the active node runs no relay"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the outage being simulated, not a synchronisation
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.agent_settings({"health_timeout": "8s"})
def test_a_relay_slower_than_the_check_interval_but_within_health_timeout_keeps_leadership(
    pair: Pair,
) -> None:
    pair.start()
    first = pair.wait_active()
    second = pair.other(first)
    wait_for(lambda: pair.roles().get(second.name) is Role.PASSIVE, 20, "passive peer")
    _freeze_relay(first, 4.0)  # 8 checks' worth at the 500 ms interval
    wait_for(first.accepts_mail, 20, "the relay serving again")
    assert pair.roles() == {first.name: Role.ACTIVE, second.name: Role.PASSIVE}
    assert not [d for d in first.events("Decision") if d["trigger"] == "relay_unhealthy"]


def test_a_relay_that_stops_answering_makes_the_node_give_up_leadership(pair: Pair) -> None:
    pair.start()
    first = pair.wait_active()
    second = pair.other(first)
    wait_for(lambda: pair.roles().get(second.name) is Role.PASSIVE, 20, "passive peer")
    _freeze_relay(first, 4.0)  # three failed checks (500 ms wait, 500 ms apart) in 3 s
    assert pair.wait_active(timeout=40, not_=first.name) is second
    assert [d for d in first.events("Decision") if d["trigger"] == "relay_unhealthy"]


def test_a_graceful_stop_of_the_active_agent_hands_over_at_once(pair: Pair) -> None:
    pair.start()
    first = pair.wait_active()
    second = pair.other(first)
    wait_for(lambda: pair.roles().get(second.name) is Role.PASSIVE, 20, "passive peer")
    stopped_at = time.monotonic()
    first.stop()
    assert pair.wait_active(timeout=20) is second
    # No session expiry to wait for: the agent demoted (leadership last) before it exited.
    assert time.monotonic() - stopped_at < 8
    decisions = first.events("Decision")
    assert any(d["trigger"] == "stop" and d["role"] == "demoting" for d in decisions)
    assert decisions[-1]["role"] == "passive"
    assert any(e["step"] == "release" for e in first.events("StepDone"))
    assert first.proc is not None and first.proc.returncode == 0


def test_an_unreachable_zookeeper_is_a_clear_error(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    node = AgentNode(
        tmp_path,
        "lonely",
        host="127.0.0.23",
        smtp_port=free_port("127.0.0.23"),
        zookeeper=dead,
        shared_spool=tmp_path / "shared",
        credentials=None,
        agent={"session_timeout": "2s"},
    )
    result = node.cli("cluster", "status", timeout=60)
    assert result.returncode == 1
    assert "unreachable" in result.stderr and dead in result.stderr


def test_a_mistyped_cluster_name_is_an_error_not_a_new_cluster(
    tmp_path: Path, zookeeper: ZooKeeperServer
) -> None:
    node = AgentNode(
        tmp_path,
        "typo",
        host="127.0.0.23",
        smtp_port=free_port("127.0.0.23"),
        zookeeper=zookeeper.hosts,
        shared_spool=tmp_path / "shared",
        credentials=None,
        agent={"cluster": "no-such-cluster"},
    )
    result = node.cli("cluster", "status")
    assert result.returncode == 1
    assert "no cluster 'no-such-cluster'" in result.stderr
    assert node.cli("cluster", "status").returncode == 1  # and it was not created meanwhile


def test_a_takeover_stamped_by_a_clock_running_ahead_is_dated_when_first_seen() -> None:
    """A future stamp would block this node's takeovers for the writer's lead (seen: 45 s)."""
    trusted, seen = trusted_failover(1045.0, 1000.0, None)  # the taker's clock is 45 s ahead
    assert trusted == 1000.0
    assert trusted_failover(1045.0, 1003.0, seen) == (1000.0, seen)  # still the first sighting
    assert trusted_failover(990.0, 1003.0, seen) == (990.0, (990.0, 1003.0))  # a past stamp holds
    assert trusted_failover(1100.0, 1050.0, seen)[0] == 1050.0  # a new takeover, a new sighting


def _verdicts(location: str, vip: str) -> bytes:
    """A check location's published verdicts (monitor.cluster_link's format): the service's
    SMTP check in state ``vip``, since now."""
    now = time.time()
    check = {"kind": "smtp", "state": vip, "since": now, "target": "vip:25", "service": True}
    record = {"location": location, "at": now, "checks": {"vip-smtp": check}}
    return json.dumps(record).encode()


def test_check_locations_that_see_the_service_down_move_it_one_location_does_not(
    pair: Pair,
) -> None:
    pair.start()
    first = pair.wait_active()
    second = pair.other(first)
    wait_for(lambda: pair.roles().get(second.name) is Role.PASSIVE, 20, "passive peer")
    monitors = pair.operator()  # the monitors' session: their znodes are ephemeral
    try:
        monitors.publish_monitor("inet", _verdicts("inet", "down"))
        monitors.publish_monitor("client", _verdicts("client", "up"))
        # One location of two: the agent reads them every health check; give it several.
        time.sleep(2.5)
        assert pair.roles()[first.name] is Role.ACTIVE
        assert all(e.get("trigger") != "gray_failure" for e in first.events("Decision"))
        monitors.publish_monitor("client", _verdicts("client", "down"))
        assert pair.wait_active(timeout=20, not_=first.name) is second
        (decision,) = [e for e in first.events("Decision") if e.get("trigger") == "gray_failure"]
        assert decision["gray_failure"]["locations"] == ["client", "inet"]
        assert decision["gray_failure"]["checks"] == ["client/vip-smtp", "inet/vip-smtp"]
        # The new active node finds the checks down since before its term: it stays.
        wait_for(lambda: pair.roles().get(first.name) is Role.PASSIVE, 20, "old active passive")
        time.sleep(1.5)
        assert pair.roles()[second.name] is Role.ACTIVE
        assert not [e for e in second.events("Decision") if e.get("trigger") == "gray_failure"]
    finally:
        monitors.stop()
