"""The lab's monitors check the round trip and each relay's admin endpoint, for real.

The sink's probe mailbox (a real ``python -m cluster.lab.sink`` taking mail over SMTP), the
monitor.toml the lab writes (parsed as ``hamta monitor`` parses it), and a whole lab (prefix
``hmt``, subnet 198.19.167.0/24): a probe through the VIP reaches the internet host's mailbox
from both locations, the active relay's admin endpoint is read from outside its node, the
passive one's is "standby", and ``hamta lab status`` prints it.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from cluster.lab.configs import relay_config
from cluster.lab.lab import Lab
from cluster.lab.monitors import format_verdicts, monitor_config
from cluster.lab.site import LabSite
from monitor.config import RelayCheck, RoundTripCheck, parse_monitor_config
from tests.support import free_port
from tests.support.labs import module_lab
from tests.support.ports import listening

PREFIX = "hmt"
SUBNET = "198.19.167.0/24"
ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.3)
    return found


def test_the_sink_keeps_probes_in_the_mailbox_and_out_of_the_record(tmp_path: Path) -> None:
    port = free_port()
    record, mailbox = tmp_path / "delivered.jsonl", tmp_path / "probe-mailbox"
    argv = [sys.executable, "-m", "cluster.lab.sink", "--listen", f"127.0.0.1:{port}"]
    argv += ["--record", str(record), "--mailbox", str(mailbox)]
    refused = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, cwd=ROOT, check=False
    )
    assert refused.returncode == 2 and "go together" in refused.stderr
    sink = subprocess.Popen([*argv, "--mailbox-domain", "probe.lab.test"], cwd=ROOT)
    try:
        wait_for(lambda: listening(port), 20, "the sink listening")
        message = EmailMessage()
        message["From"], message["Subject"] = "m@lab.test", "probe"
        message["X-Hamta-Probe"] = "round-trip TOKEN"
        message.set_content("probe\n")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            rcpts = ["inet@probe.lab.test", "Client@Probe.Lab.Test", "someone@a.lab.test"]
            client.send_message(message, to_addrs=rcpts)
    finally:
        sink.terminate()
        sink.wait(10)
    for folder in ("inet", "client"):
        (probe,) = (mailbox / folder).iterdir()
        assert b"X-Hamta-Probe: round-trip TOKEN" in probe.read_bytes()
    assert list((mailbox / ".tmp").iterdir()) == []
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [line["rcpt"] for line in lines] == ["someone@a.lab.test"]


def test_the_lab_s_monitors_check_the_round_trip_and_each_relay_s_admin_endpoint(
    tmp_path: Path,
) -> None:
    site = LabSite.build(tmp_path, PREFIX, SUBNET, sys.executable)
    site.credentials_path.write_text("hamta:secret\n")
    site.credentials_path.chmod(0o600)
    node1 = site.address("node1")
    relay = relay_config(site.topology, "node1", tmp_path / "node1", tmp_path / "spool")
    assert relay["admin"]["listen"] == f"{node1}:8025"  # reachable from the check locations
    for location in ("inet", "client"):
        (site.probe_mailbox / location).mkdir(parents=True)  # as Monitors.start makes it
        config = parse_monitor_config(monitor_config(site, location))
        checks = {check.name: check for check in config.checks}
        trip = checks["round-trip"]
        assert isinstance(trip, RoundTripCheck)
        assert trip.host == str(site.topology.vip.ip) and trip.mailbox is not None
        assert trip.recipient == f"{location}@probe.lab.test"
        assert trip.mailbox == site.probe_mailbox / location  # each removes only its own
        assert trip.timeout < trip.interval
        admin = checks["node1-relay"]
        assert isinstance(admin, RelayCheck)
        assert admin.url == f"http://{node1}:8025" and admin.node == "node1"
    verdicts = {
        "inet": [
            {
                "name": "round-trip",
                "kind": "round_trip",
                "state": "down",
                "last": {"detail": "never arrived: accepted as Q, not in the mailbox after 7.2s"},
            }
        ],
        "client": None,
    }
    shown = format_verdicts(verdicts)
    assert "  round trip from inet: down (never arrived: accepted as Q" in "\n".join(shown)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with module_lab(
        tmp_path_factory.mktemp("lab-monitor-checks"), PREFIX, SUBNET, monitors=True
    ) as built:
        yield built


def states(lab: Lab) -> dict[str, dict[str, str]]:
    return {
        location: {row["name"]: row["state"] for row in rows or []}
        for location, rows in lab.monitor_verdicts().items()
    }


@pytest.mark.root
def test_in_the_lab_a_probe_goes_round_and_the_relays_are_read_from_outside(lab: Lab) -> None:
    active = lab.wait_active()
    passive = "node2" if active == "node1" else "node1"
    wanted = {"round-trip": "up", f"{active}-relay": "up", f"{passive}-relay": "standby"}

    def seen() -> bool:
        found = states(lab)
        return all(
            wanted.items() <= found.get(location, {}).items() for location in ("inet", "client")
        )

    wait_for(seen, 90, f"{wanted} from both locations")
    verdicts = lab.monitor_verdicts()
    for location in ("inet", "client"):
        rows = {row["name"]: row for row in verdicts[location]}
        facts = rows["round-trip"]["last"]["facts"]
        assert facts["stage"] == "arrived" and 0 < facts["arrived_seconds"] < 8
        # The probes are swept away: the mailbox does not fill.
        assert len(list((lab.directory / "inet" / "probe-mailbox" / location).iterdir())) <= 1
        assert "ready" in rows[f"{active}-relay"]["last"]["detail"].lower() or (
            rows[f"{active}-relay"]["state"] == "up"
        )
    # No probe in the sink's record: the lab's own mail is counted there, not the monitors'.
    record = (lab.directory / "inet" / "delivered.jsonl").read_text()
    assert "probe.lab.test" not in record
    table = subprocess.run(
        [sys.executable, "-m", "hamtactl", "lab", "status", "--dir", str(lab.directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    ).stdout
    assert "round trip from inet: up (accepted" in table, table
    assert "round trip from client: up (accepted" in table, table
    assert f"{passive}-relay" in table
