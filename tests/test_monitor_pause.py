"""``hamta cluster pause`` opens a maintenance window of the cluster's checks until ``resume``.

A real ``hamta monitor run`` linked to a real ZooKeeper, the pause written by the operator's
coordinator (as ``hamta cluster pause`` writes it), and a real HTTP server receiving the
webhook: the paused cluster's incident is recorded "in maintenance" and notifies nobody; a
check the pause does not cover alerts as usual; at ``resume`` the held step fires.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cluster.coordination import Coordinator
from cluster.coordination_layout import OPERATOR
from cluster.decision_data import Member, Role
from cluster.zookeeper import ZooKeeperEnsemble
from monitor.config import parse_monitor_config
from monitor.failover_rules import SEEN_FROM, incident_locations, states_by_location
from monitor.maintenance import active_window
from monitor.pause_window import PAUSE_WINDOW, Windows, cluster_checks
from tests.support import free_port
from tests.support.monitor_process import MonitorProcess
from tests.support.relay import read_events


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.1)
    return found


class Webhooks:
    """A real HTTP server on loopback recording each POSTed JSON body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Webhooks:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def triggers(self, check: str) -> list[dict[str, Any]]:
        return [b for b in list(self.bodies) if b["check"] == check and b["event"] == "trigger"]


@pytest.fixture
def cluster(zookeeper: ZooKeeperEnsemble) -> Iterator[tuple[str, Coordinator]]:
    """A cluster with node1 active, and an operator's session to pause and resume it."""
    name = f"p{uuid.uuid4().hex[:10]}"
    node1 = Coordinator(zookeeper.hosts, name, "node1")
    operator = Coordinator(zookeeper.hosts, name, OPERATOR)
    node1.start(10)
    operator.start(10)
    try:
        epoch = node1.acquire_leadership()
        assert epoch is not None
        node1.publish_member(Member("node1", Role.ACTIVE, epoch, True, True, heartbeat=time.time()))
        yield name, operator
    finally:
        operator.stop()
        node1.stop()


def test_a_pause_is_a_maintenance_window_of_the_cluster_s_checks_until_resume(
    tmp_path: Path, zookeeper: ZooKeeperEnsemble, cluster: tuple[str, Coordinator]
) -> None:
    name, operator = cluster
    operator.pause("alice", "kernel upgrade on node1")
    fast = {"interval": "0.3s", "timeout": "0.25s", "failure_threshold": 1}
    # Nothing listens on either port: both go down at once.
    vip = {"name": "vip", "kind": "smtp", "host": "127.0.0.1", "port": free_port(), **fast}
    vip["service"] = True
    mx = {"name": "mx-other", "kind": "smtp", "host": "127.0.0.1", "port": free_port(), **fast}
    link = {"zookeeper": zookeeper.hosts, "cluster": name, "poll_every": "0.2s"}
    link["failover_grace"] = "0s"
    with Webhooks() as hooks:
        notifier = {"kind": "webhook", "url": hooks.url}
        sections: dict[str, Any] = {"cluster": link, "alerting": {"tick": "0.1s"}}
        sections["notifiers.hook"] = notifier
        extra = '[[escalation]]\nafter = "0s"\nnotifiers = ["hook"]\n'
        with MonitorProcess(
            tmp_path, [vip, mx], extra, top={"location": "arbiter"}, **sections
        ) as m:
            # The check the pause does not cover alerts as usual.
            wait_for(lambda: hooks.triggers("mx-other"), 20, "mx-other's alert")

            def paused_incident() -> Any:
                rows = [i for i in m.get("/api/incidents")["incidents"] if i["check"] == "vip"]
                return rows[0] if rows and rows[0]["maintenance"] == PAUSE_WINDOW else None

            incident = wait_for(paused_incident, 20, "the vip's incident in maintenance")
            assert incident["steps_fired"] == [] and incident["notified"] == []
            windows = m.get("/api/maintenance")["maintenance"]
            assert len(windows) == 1
            shown = windows[0]
            assert shown["name"] == PAUSE_WINDOW and shown["active"] is True
            assert shown["checks"] == ["vip"]
            assert shown["by"] == "alice" and shown["reason"] == "kernel upgrade on node1"
            assert shown["end"] is None  # until resume
            assert m.get("/api/cluster")["paused"]["by"] == "alice"
            time.sleep(1.0)  # ten alerting ticks: still nothing for the vip
            assert hooks.triggers("vip") == []

            operator.resume()
            sent = wait_for(lambda: hooks.triggers("vip"), 20, "the held step after resume")
            assert sent[0]["incident"] == incident["id"]
            assert m.get("/api/maintenance")["maintenance"] == []
            assert m.get("/api/cluster")["paused"] is None
            timeline = m.get(f"/api/incidents/{incident['id']}")["timeline"]
            assert "maintenance" in [step["event"] for step in timeline]
    opened = read_events(tmp_path / "monitor.log", "MaintenanceFromPause")
    assert len(opened) == 1 and opened[0]["by"] == "alice" and opened[0]["checks"] == ["vip"]
    assert len(read_events(tmp_path / "monitor.log", "MaintenanceFromPauseEnded")) == 1


def test_the_pause_covers_the_cluster_s_checks_and_ended_pauses_stay_for_the_uptime() -> None:
    config = parse_monitor_config(
        '[[checks]]\nname = "vip"\nkind = "smtp"\nhost = "10.0.0.100"\nservice = true\n'
        '[[checks]]\nname = "n1"\nkind = "smtp"\nhost = "10.0.0.1"\nnode = "node1"\n'
        '[[checks]]\nname = "relay"\nkind = "relay"\nurl = "http://10.0.0.1:8025"\n'
        '[[checks]]\nname = "dns"\nkind = "dns"\ndomain = "example.org"\n'
    )
    assert cluster_checks(config.checks) == ("vip", "n1", "relay")
    windows = Windows((), config.checks)
    assert windows.follow({"by": "bob", "at": 100.0, "reason": ""}, 101.0) == "opened"
    assert windows.follow({"by": "bob", "at": 100.0, "reason": ""}, 102.0) is None  # the same
    assert active_window(windows, "vip", 5000.0) is not None
    assert active_window(windows, "dns", 5000.0) is None
    assert windows.pause is not None and math.isinf(windows.pause.end or 0.0)
    assert windows.follow(None, 200.0) == "closed"
    assert active_window(windows, "vip", 201.0) is None
    assert [(w.start, w.end) for w in windows] == [(100.0, 200.0)]  # for the uptime
    assert windows.shown() == ()  # but no longer listed as maintenance
    # A monitor with no check of the cluster opens no window: one with no checks covers all.
    bare = Windows((), [config.checks[3]])
    assert bare.follow({"by": "bob", "at": 1.0}, 2.0) is None and len(bare) == 0


def test_each_location_s_verdict_and_the_locations_that_saw_an_incident() -> None:
    published: dict[str, dict[str, Any]] = {
        "inet": {"checks": {"vip": {"state": "up"}}},
        "client": {"checks": {"vip": {"state": "down"}, "other": {"state": "up"}}},
        "odd": {"checks": {"vip": {}}},  # no state: left out
    }
    assert states_by_location("vip", published, "inet", "down") == {
        "inet": "down",  # this location's own state, fresher than what it published
        "client": "down",
    }
    assert states_by_location("mine", published, "inet", "up") == {"inet": "up"}
    timeline = [
        {"event": "opened", "detail": "down"},
        {"event": "seen-from", "detail": f"{SEEN_FROM}client"},
        {"event": "seen-from", "detail": f"{SEEN_FROM}client"},
    ]
    assert incident_locations("inet", timeline) == ["inet", "client"]
