"""The monitor knows the cluster: real ZooKeeper, znodes written by the agent's own coordinator.

Each test has a cluster of its own on the session's standalone server; the agents' side is
``cluster.coordination.Coordinator`` itself (publish_member, acquire_leadership,
record_failover), as cluster/executor.py uses it, never hand-made JSON.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.zookeeper import ZooKeeperEnsemble
from monitor.cluster_link import ClusterLink, ClusterSnapshot, relabel
from monitor.config import ConfigError, RelayCheck, parse_monitor_config
from monitor.failover_rules import (
    Grace,
    Held,
    decide,
    failovers_within,
    seen_from,
    takeovers,
)
from monitor.incidents import severity_of
from monitor.observation import Observation
from monitor.store import Store
from monitor.verdicts import CheckState, Outcome, State, StateChange, Thresholds, next_state
from tests.support import free_port
from tests.support.monitor_process import MonitorProcess
from tests.support.pair import active_and_passive
from tests.support.tcp_proxy import TcpProxy


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = condition()
        except OSError:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.1)


@pytest.fixture
def cluster_name() -> str:
    return f"m{uuid.uuid4().hex[:10]}"


@pytest.fixture
def pair(zookeeper: ZooKeeperEnsemble, cluster_name: str) -> Iterator[dict[str, Any]]:
    """node1 active (leader, epoch 1, one failover recorded), node2 passive: as agents write."""
    with active_and_passive(zookeeper.hosts, cluster_name) as (node1, node2, epoch):
        record = {"epoch": epoch, "node": "node1", "previous": "node2", "reason": "test"}
        node1.record_failover({**record, "at": time.time(), "steps": {}, "total": 0.5})
        yield {"hosts": zookeeper.hosts, "epoch": epoch, "node1": node1, "node2": node2}


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def fast(check: dict[str, Any]) -> dict[str, Any]:
    return {"interval": "0.5s", "timeout": "0.4s", "failure_threshold": 1, **check}


def test_api_cluster_shows_the_active_node_and_a_standby_relay_is_standby(
    tmp_path: Path, pair: dict[str, Any], cluster_name: str, make_relay: Any
) -> None:
    standby = make_relay(standby=True, name="standby")
    checks = [
        fast({"name": "warm-standby", "kind": "relay", "url": standby.admin_url}),
        fast({"name": "node2-relay", "kind": "relay", "url": closed_port_url(), "node": "node2"}),
        fast({"name": "node1-relay", "kind": "relay", "url": closed_port_url(), "node": "node1"}),
    ]
    link = {"zookeeper": pair["hosts"], "cluster": cluster_name, "poll_every": "0.2s"}
    with MonitorProcess(tmp_path / "m", checks, top={"location": "arbiter"}, cluster=link) as m:
        shown = wait_for(
            lambda: (c := m.get("/api/cluster"))["link"] == "up" and c, 20, "the link up"
        )
        assert shown["active"] == "node1"
        assert shown["epoch"] == pair["epoch"]
        nodes = {node["name"]: node for node in shown["nodes"]}
        assert nodes["node1"]["state"] == "active" and nodes["node1"]["role"] == "active"
        assert nodes["node2"]["state"] == "standby" and nodes["node2"]["role"] == "passive"
        assert [f["node"] for f in shown["failovers"]] == ["node1"]
        assert shown["failovers"][0]["previous"] == "node2"
        # The relay says it is a warm standby; the cluster says node2 is passive; node1 is the
        # active node, and its relay unreachable is an outage.
        rows = m.wait_states(
            {"warm-standby": "standby", "node2-relay": "standby", "node1-relay": "down"}
        )
        assert "node2 is passive" in rows["node2-relay"]["last"]["detail"]
        # No incident for a standby; one for the active node's relay.
        incidents = m.get("/api/incidents")["incidents"]
        assert {incident["check"] for incident in incidents} == {"node1-relay"}
        # A failover inside the open incident is noted in its timeline, once.
        record = {"epoch": pair["epoch"], "node": "node1", "previous": "node2", "reason": "later"}
        pair["node1"].record_failover({**record, "at": time.time(), "steps": {}, "total": 0.1})
        ident = incidents[0]["id"]

        def noted() -> list[dict[str, Any]]:
            timeline = m.get(f"/api/incidents/{ident}")["timeline"]
            return [step for step in timeline if step["event"] == "failover"]

        notes = wait_for(noted, 10, "the failover in the incident's timeline")
        assert "failover to node1 from node2" in notes[0]["detail"]
        assert "later" in notes[0]["detail"]
        time.sleep(1.0)  # a few more rounds of the link: still noted once
        assert len(noted()) == 1


def test_two_locations_see_each_other_s_verdicts(
    tmp_path: Path, pair: dict[str, Any], cluster_name: str
) -> None:
    # No grace: the VIP's incident opens at once, to be noted as seen from the other location.
    link = {
        "zookeeper": pair["hosts"],
        "cluster": cluster_name,
        "poll_every": "0.2s",
        "failover_grace": "0s",
    }
    vip = fast({"name": "vip-smtp", "kind": "smtp", "host": "127.0.0.1", "port": free_port()})
    vip["service"] = True
    with (
        MonitorProcess(tmp_path / "inet", [vip], top={"location": "inet"}, cluster=link) as inet,
        MonitorProcess(
            tmp_path / "client", [vip], top={"location": "client"}, cluster=link
        ) as client,
    ):
        for monitor, other in ((inet, "client"), (client, "inet")):

            def seen(monitor: MonitorProcess = monitor, other: str = other) -> Any:
                found = monitor.get("/api/locations")["locations"].get(other)
                return found if found and found["checks"]["vip-smtp"]["state"] == "down" else None

            record = wait_for(seen, 20, f"{other}'s verdicts")
            assert record["location"] == other
            assert record["checks"]["vip-smtp"]["service"] is True
            assert record["checks"]["vip-smtp"]["kind"] == "smtp"
            assert record["checks"]["vip-smtp"]["target"].startswith("127.0.0.1:")
            assert record["at"] > time.time() - 30

            # The incident this location opened says the other location saw it too.
            def incidents(m: MonitorProcess = monitor) -> Any:
                return m.get("/api/incidents")["incidents"]

            ident = wait_for(incidents, 10, "it")
            ident = ident[0]["id"]

            def noted(m: MonitorProcess = monitor, ident: int = ident) -> Any:
                timeline = m.get(f"/api/incidents/{ident}")["timeline"]
                return [step for step in timeline if step["event"] == "seen-from"]

            assert wait_for(noted, 10, "seen from")[0]["detail"] == f"also seen from {other}"
        # What the agent's side would read: the znodes themselves, through its coordinator.
        raw = pair["node1"].monitor_states()
        assert set(raw) == {"inet", "client"}
        assert json.loads(raw["inet"])["checks"]["vip-smtp"]["state"] == "down"
    # A monitor that stops takes its ephemeral znode with it.
    wait_for(lambda: not pair["node1"].monitor_states(), 10, "the znodes gone")


def test_zookeeper_unreachable_the_checks_go_on_and_the_link_comes_back(
    tmp_path: Path, zookeeper: ZooKeeperEnsemble, pair: dict[str, Any], cluster_name: str
) -> None:
    spec = zookeeper.servers[0].spec
    with TcpProxy((spec.address, spec.client_port)) as proxy:
        link = {
            "zookeeper": proxy.hosts,
            "cluster": cluster_name,
            "poll_every": "0.2s",
            "session_timeout": "2s",
            "connect_timeout": "1s",
        }
        check = fast({"name": "r", "kind": "relay", "url": closed_port_url()})
        with MonitorProcess(tmp_path / "m", [check], top={"location": "far"}, cluster=link) as m:
            wait_for(lambda: m.get("/api/cluster")["link"] == "up", 20, "the link up")
            wait_for(lambda: "far" in pair["node1"].monitor_states(), 10, "published")
            proxy.sever()
            down = wait_for(
                lambda: (c := m.get("/api/cluster"))["link"] == "down" and c, 20, "link down"
            )
            assert down["detail"]
            # The checks go on meanwhile.
            before = m.wait_states({"r": "down"})["r"]["last"]["at"]
            # Away longer than the session (2 s): the server ends it, and the znode goes.
            wait_for(lambda: "far" not in pair["node1"].monitor_states(), 15, "znode expired")
            wait_for(lambda: m.get("/api/checks")["checks"][0]["last"]["at"] > before, 5, "runs")
            proxy.restore()
            wait_for(lambda: m.get("/api/cluster")["link"] == "up", 30, "the link back")
            assert m.get("/api/cluster")["active"] == "node1"
            # Its session may have expired meanwhile, and its znode with it: published again.
            wait_for(lambda: "far" in pair["node1"].monitor_states(), 10, "published again")
        log = (tmp_path / "m" / "monitor.log").read_text().splitlines()
        changes = [json.loads(line) for line in log if "ClusterLinkChanged" in line]
        links = [change["link"] for change in changes]
        # One line per change of the link's state: up, down (however many rounds), up.
        assert links == ["up", "down", "up"], links


# ------------------------------------------------------------------ pure parts, configuration


def test_standby_is_a_state_at_once_and_opens_no_incident() -> None:
    limits = Thresholds(failure_threshold=3)
    state, change = next_state("r", CheckState(State.UP), Outcome.STANDBY, 0.1, 5.0, "", limits)
    assert state.state is State.STANDBY and change is not None and change.at == 5.0
    assert severity_of(State.STANDBY) is None
    # Back to serving (after a switchover): up at once, nothing to recover from.
    state, change = next_state("r", state, Outcome.SUCCESS, 0.1, 6.0, "", limits)
    assert state.state is State.UP


def test_relabel_only_failures_of_a_node_the_cluster_says_is_passive() -> None:
    check = RelayCheck(kind="relay", name="r", url="http://127.0.0.1:1", node="node2")
    failed = Observation("r", "relay", Outcome.FAILURE, 0.1, "refused")
    nodes = ({"name": "node1", "state": "active"}, {"name": "node2", "state": "standby"})
    up = ClusterSnapshot(link="up", active="node1", nodes=nodes)
    assert relabel(failed, check, up).outcome is Outcome.STANDBY
    # A node without its member znode (agent dead, machine off) is down, not standby.
    gone = ({"name": "node1", "state": "active"}, {"name": "node2", "state": "absent"})
    assert relabel(failed, check, ClusterSnapshot(link="up", active="node1", nodes=gone)) == failed
    # Not passive: the active node, an unknown link, or no active node at all.
    assert relabel(failed, check, ClusterSnapshot(link="up", active="node2", nodes=nodes)) == failed
    assert relabel(failed, check, ClusterSnapshot(link="down", active="node1", nodes=nodes)) == (
        failed
    )
    assert relabel(failed, check, ClusterSnapshot(link="up", active=None, nodes=nodes)) == failed
    unnamed = RelayCheck(kind="relay", name="r", url="http://127.0.0.1:1")
    assert relabel(failed, unnamed, up) == failed


def test_the_cluster_section_is_checked(tmp_path: Path) -> None:
    config = parse_monitor_config('location = "inet"\n[cluster]\nzookeeper = "10.0.0.1:2181"\n')
    assert config.cluster is not None and config.cluster.failover_grace == 10.0
    assert config.location == "inet"
    assert parse_monitor_config("").cluster is None
    assert parse_monitor_config("").location  # the host name by default
    with pytest.raises(ConfigError, match=r"cluster\.zookeeper"):
        parse_monitor_config('[cluster]\nzookeeper = "host:notaport"\n')
    loose = tmp_path / "zk.secret"
    loose.write_text("hamta:pw\n")
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match=r"cluster\.credentials"):
        parse_monitor_config(f'[cluster]\nzookeeper = "h:2181"\ncredentials = "{loose}"\n')
    with pytest.raises(ConfigError, match="location"):
        parse_monitor_config('location = "a/b"\n')


# ------------------------------------------------------------------ failover grace


def test_the_grace_rule() -> None:
    grace, settle = 10.0, 4.0
    # Still down within the grace: wait; past it: an outage.
    assert decide(Held(100.0), 105.0, grace, settle, []) is Grace.HOLD
    assert decide(Held(100.0), 110.5, grace, settle, []) is Grace.OUTAGE
    # Back within the grace, a takeover inside (widened by the grace): a failover.
    assert decide(Held(100.0, 104.0), 104.0, grace, settle, [102.0]) is Grace.FAILOVER
    assert decide(Held(100.0, 104.0), 104.0, grace, settle, [113.0]) is Grace.FAILOVER
    # Back, no takeover yet: wait for the link to read one, then an outage.
    assert decide(Held(100.0, 104.0), 105.0, grace, settle, [50.0]) is Grace.HOLD
    assert decide(Held(100.0, 104.0), 108.0, grace, settle, [50.0]) is Grace.OUTAGE
    # Down longer than the grace: an outage, takeover or not.
    assert decide(Held(100.0, 111.0), 111.0, grace, settle, [105.0]) is Grace.OUTAGE
    assert takeovers([{"at": 3.0}, {"at": "x"}, {}], 5.0) == [3.0, 5.0]
    assert failovers_within([{"at": 3.0}, {"at": 9.0}], 2.0, 5.0) == [{"at": 3.0}]
    published = {"checks": {"vip": {"state": "down"}}}
    locations = {"inet": published, "client": published, "x": {"checks": {"vip": {"state": "up"}}}}
    assert seen_from("vip", locations, "inet") == ["client"]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class NullLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    info = warning = error = _record


def test_a_failover_under_the_grace_opens_no_incident_an_outage_does(
    tmp_path: Path, pair: dict[str, Any], cluster_name: str
) -> None:
    since = pair["node1"].view().leader.since
    clock = FakeClock(since + 1.0)
    config = parse_monitor_config(
        f'[cluster]\nzookeeper = "{pair["hosts"]}"\ncluster = "{cluster_name}"\n'
        '[[checks]]\nname = "vip"\nkind = "smtp"\nhost = "127.0.0.1"\nservice = true\n'
        '[[checks]]\nname = "other"\nkind = "smtp"\nhost = "127.0.0.1"\n'
    )
    told: list[StateChange] = []

    async def then(check: Any, change: StateChange) -> None:
        told.append(change)

    async def scenario() -> None:
        store = Store(tmp_path / "m.sqlite")
        log = NullLog()
        assert config.cluster is not None
        link = ClusterLink(config.cluster, "inet", config.checks, store, log, clock, then=then)
        vip, other = config.checks
        try:
            await link.step()
            assert link.snapshot.link == "up" and link.snapshot.active == "node1"
            # The VIP refused for 3 s around the takeover: an event, not an outage.
            await link.on_change(vip, StateChange("vip", State.UP, State.DOWN, since - 1, "x"))
            await link.on_change(vip, StateChange("vip", State.DOWN, State.UP, since + 2, "ok"))
            await link.step()
            assert told == []
            assert [e for e, _ in log.events if e == "FailoverSeen"] == ["FailoverSeen"]
            # Down long after the takeover: held for the grace, then the outage goes on.
            down = StateChange("vip", State.UP, State.DOWN, since + 100, "refused")
            clock.now = since + 100
            await link.on_change(vip, down)
            await link.step()
            assert told == []
            clock.now = since + 111
            await link.step()
            assert told == [down]
            # A check that is not the service's: straight on.
            plain = StateChange("other", State.UP, State.DOWN, since + 112, "refused")
            await link.on_change(other, plain)
            assert told == [down, plain]
        finally:
            await link.close()
            await store.close()

    asyncio.run(scenario())
