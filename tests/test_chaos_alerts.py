"""The chaos report's alerts: which of the monitors' alerts fired per scenario, and when.

The selection and the report on made-up records; the lab's alert receiver for real (a
``python -m cluster.lab.alert_sink`` receiving a real ``hamta monitor run``'s webhook); and a
short chaos run with ``--monitors`` on a real lab (prefix ``hmc``, 198.19.166.0/24): killing the
active node raises the monitors' alerts, listed with their delay in the JSON and the HTML.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from chaos.alerts import iteration_alerts
from chaos.report import render_html
from cluster.lab.alert_sink import read_record, record_line
from tests.support import free_port
from tests.support.monitor_process import MonitorProcess
from tests.support.ports import listening
from tests.support.relay import HAMTA
from tests.test_chaos_report import iteration, parse

ROOT = Path(__file__).resolve().parent.parent
FAULT = 1_000_000.0


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.2)
    return found


def note(
    event: str, location: str, incident: int, opened: float, received: float
) -> dict[str, Any]:
    return {
        "received": received,
        "location": location,
        "event": event,
        "incident": incident,
        "opened": datetime.fromtimestamp(opened, UTC).isoformat().replace("+00:00", "Z"),
        "check": "node1-smtp",
        "severity": "critical",
        "state": "down" if event == "trigger" else "up",
        "detail": "refused",
        "step": 1 if event == "trigger" else None,
    }


def test_an_iteration_s_alerts_are_its_fault_s_triggers_and_their_resolves() -> None:
    records = [
        note("trigger", "inet", 1, FAULT - 30, FAULT - 29),  # an earlier iteration's
        note("resolve", "inet", 1, FAULT - 30, FAULT + 1.0),  # ... resolved during this one
        note("trigger", "client", 7, FAULT + 1.2, FAULT + 1.5),
        note("trigger", "inet", 2, FAULT + 0.9, FAULT + 1.1),
        note("resolve", "inet", 2, FAULT + 0.9, FAULT + 9.0),
        note("trigger", "inet", 3, FAULT + 50, FAULT + 50.5),  # after the window
    ]
    alerts = iteration_alerts(records, FAULT, FAULT + 20)
    assert [(a["location"], a["incident"], a["event"]) for a in alerts] == [
        ("inet", 2, "trigger"),
        ("client", 7, "trigger"),
        ("inet", 2, "resolve"),
    ]
    assert [a["after_s"] for a in alerts] == [1.1, 1.5, 9.0]
    assert alerts[0]["opened_after_s"] == 0.9 and alerts[0]["check"] == "node1-smtp"
    assert "received" not in alerts[0]  # the delay says it


def test_the_report_lists_each_iteration_s_alerts_with_their_delay() -> None:
    alerts = iteration_alerts([note("trigger", "inet", 2, FAULT + 0.9, FAULT + 1.1)], FAULT, 1e9)
    with_alerts = replace(iteration("kill-node", 1), alerts=alerts)
    quiet = replace(iteration("kill-node", 2), alerts=[])
    without = iteration("kill-relay", 1)  # a run without --monitors
    page = render_html([with_alerts, quiet, without], title="t")
    parser = parse(page)
    rows = [attrs for tag, attrs in parser.starts if tag == "tr" and "data-check" in attrs]
    assert rows == [{"data-check": "node1-smtp", "data-after": "1.1"}]
    assert "1.10 s" in parser.texts["td"] and "inet" in parser.texts["td"]
    assert page.count("no alert from the monitors") == 1
    assert page.count("<b>alerts</b>") == 2
    assert with_alerts.as_dict()["alerts"] == alerts and without.as_dict()["alerts"] is None


def test_the_lab_s_alert_receiver_records_a_real_monitor_s_webhook(tmp_path: Path) -> None:
    assert record_line(b"[1]", "/inet", 1.0) is None
    assert record_line(b"{}", "/", 1.0) is None
    assert record_line(b"not json", "/inet", 1.0) is None
    port = free_port()
    record = tmp_path / "alerts.jsonl"
    argv = [sys.executable, "-m", "cluster.lab.alert_sink", "--listen", f"127.0.0.1:{port}"]
    receiver = subprocess.Popen([*argv, "--record", str(record)], cwd=ROOT)
    try:
        # Caps for a process that never starts, not goals: under the parallel suite on a loaded
        # machine, starting an interpreter alone took over 20 s.
        wait_for(lambda: listening(port), 90, "the receiver listening")
        check = {"name": "mx", "kind": "smtp", "host": "127.0.0.1", "port": free_port()}
        check |= {"interval": "0.3s", "timeout": "0.25s", "failure_threshold": 1}
        sections: dict[str, Any] = {"alerting": {"tick": "0.1s"}}
        sections["notifiers.lab"] = {"kind": "webhook", "url": f"http://127.0.0.1:{port}/inet"}
        extra = '[[escalation]]\nafter = "0s"\nnotifiers = ["lab"]\n'
        with MonitorProcess(tmp_path / "m", [check], extra, **sections):
            lines = wait_for(lambda: read_record(record), 90, "the trigger recorded")
    finally:
        receiver.terminate()
        receiver.wait(10)
    assert lines[0]["location"] == "inet" and lines[0]["event"] == "trigger"
    assert lines[0]["check"] == "mx"
    # What the chaos harness reads of it: the delay from a fault just before the monitor ran.
    (alert,) = iteration_alerts(lines[:1], lines[0]["received"] - 60, lines[0]["received"])
    assert 0 < alert["opened_after_s"] <= alert["after_s"] == 60


@pytest.mark.root
def test_a_short_chaos_run_with_monitors_reports_the_alerts_of_each_scenario(
    tmp_path: Path, short_tmp: Path
) -> None:
    output = tmp_path / "report"
    argv = [*HAMTA, "chaos", "run", "--scenario", "kill-node", "--monitors"]
    # The lab's sockets in a short directory: tmp_path is too deep under xdist.
    argv += ["--output", str(output), "--workdir", str(short_tmp)]
    argv += ["--prefix", "hmc", "--subnet", "198.19.166.0/24"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    (item,) = [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]
    alerts = item["alerts"]
    # The killed node's SMTP and relay, seen down from both locations: alerts within seconds.
    triggers = [a for a in alerts if a["event"] == "trigger"]
    assert {a["location"] for a in triggers} == {"inet", "client"}, alerts
    killed = {a["check"] for a in triggers}
    assert killed & {"node1-smtp", "node2-smtp"}, alerts
    assert "vip-smtp" not in killed  # the failover is an event, not an alert
    assert all(0 < a["after_s"] < 30 for a in triggers), alerts
    page = (output / "report.html").read_text()
    assert "<table class='alerts'>" in page and "alerts 0" not in done.stdout
