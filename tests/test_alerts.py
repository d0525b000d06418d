"""The shipped Prometheus rules (alerts/): promtool's checks, and a real Prometheus on a relay."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import smtplib
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hamta.epoch_token import write_token
from tests.conftest import RelayFactory
from tests.support import free_port
from tests.support.relay import RelayProcess
from tests.test_delivery import send

ALERTS = Path(__file__).resolve().parent.parent / "alerts"
RULES = ALERTS / "hamta.rules.yml"
RULE_TESTS = ALERTS / "hamta.rules.test.yml"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

EXPECTED_ALERTS = {
    "HamtaNoActiveNode", "HamtaMultipleActiveNodes", "HamtaRelayNotReady", "HamtaRelayDown",
    "HamtaQueueDepthHigh", "HamtaQueueDepthCritical", "HamtaDeliveryStalled",
    "HamtaBounceRateHigh", "HamtaBounceRateCritical", "HamtaComplaintRateHigh",
}  # fmt: skip

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus)"
)
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None, reason="prometheus not installed (Debian package prometheus)"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


@needs_promtool
def test_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 14 rules found" in result.stdout


@needs_promtool
def test_rules_pass_their_unit_tests() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_every_alert_has_a_unit_test() -> None:
    tests = RULE_TESTS.read_text()
    for name in EXPECTED_ALERTS:
        assert f"alertname: {name}\n        exp_alerts:\n          - exp_labels" in tests, name
        assert f"alertname: {name}\n        exp_alerts: []" in tests, name


# ------------------------------------------------------------ a real Prometheus


class Prometheus:
    """A Prometheus server on loopback scraping the given targets as job "hamta", every second."""

    def __init__(self, workdir: Path, targets: list[str], rules: Path) -> None:
        self.port = free_port("127.0.0.1")
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(rules))}\n"
            "scrape_configs:\n  - job_name: hamta\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n"
        )
        self.data = workdir / "data"
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        assert PROMETHEUS is not None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.data}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait_for(lambda: self._get("/-/ready") is not None, timeout, "Prometheus ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                body: bytes = r.read()
                return body
        except (urllib.error.URLError, OSError):
            return None

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/PATH; its ``data``."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = self._get(f"/api/v1/{path}{query}")
        assert body is not None, f"Prometheus did not answer /api/v1/{path}: {self.logs()}"
        reply = json.loads(body)
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector."""
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def alerts(self) -> dict[str, list[dict[str, Any]]]:
        """Active (pending or firing) alerts by name."""
        found: dict[str, list[dict[str, Any]]] = {}
        for alert in self.api("alerts")["alerts"]:
            found.setdefault(alert["labels"]["alertname"], []).append(alert)
        return found

    def wait_for(self, check: Any, timeout: float, what: str) -> Any:
        """Poll ``check`` until it returns something true; return that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.logs()}")
            value = check()
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"no {what} after {timeout}s: {self.logs()}")

    def firing(self, name: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until alert ``name`` fires; its alerts."""

        def check() -> list[dict[str, Any]]:
            return [a for a in self.alerts().get(name, []) if a["state"] == "firing"]

        result: list[dict[str, Any]] = self.wait_for(check, timeout, f"{name} firing")
        return result

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture
def short_rules(tmp_path: Path) -> Path:
    """The shipped rules with every ``for:`` cut to 1s, so a test sees them fire."""
    path = tmp_path / "hamta.rules.yml"
    path.write_text(re.sub(r"(?m)^(\s+for:) \S+$", r"\1 1s", RULES.read_text()))
    return path


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    started: list[Prometheus] = []

    def start(relays: list[RelayProcess], rules: Path) -> Prometheus:
        targets = [relay.admin_url.removeprefix("http://") for relay in relays]
        server = Prometheus(tmp_path / "prometheus", targets, rules)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@needs_prometheus
def test_prometheus_scrapes_a_relay_and_alerts_on_it(
    make_relay: RelayFactory, prometheus_for: Any, short_rules: Path, tmp_path: Path
) -> None:
    relay = make_relay(standby=True)
    instance = relay.admin_url.removeprefix("http://")
    prometheus: Prometheus = prometheus_for([relay], short_rules)

    prometheus.wait_for(lambda: prometheus.query('up{job="hamta"} == 1'), 30, "scrape")
    queue = prometheus.wait_for(
        lambda: prometheus.query('hamta_queue_messages{job="hamta"}'), 30, "queue metric"
    )
    assert queue[0]["metric"]["instance"] == instance and queue[0]["value"][1] == "0"

    # The rules as Prometheus loaded them: every alert, each with severity and its annotations.
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert all(rule["health"] == "ok" for rule in rules), rules
    alerting = {rule["name"]: rule for rule in rules if rule["type"] == "alerting"}
    assert set(alerting) == EXPECTED_ALERTS
    for name, rule in alerting.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
        assert "README, Alerts" in rule["annotations"]["runbook"], name

    # A warm standby alone: no node is active. It is not ready, but by design: no alert for that.
    fired = prometheus.firing("HamtaNoActiveNode")
    assert fired[0]["labels"]["severity"] == "critical"
    assert "nobody accepts mail" in fired[0]["annotations"]["summary"]
    assert "HamtaRelayNotReady" not in prometheus.alerts()

    storage = tmp_path / "storage"
    token = write_token(storage, 1)
    result = relay.cli("relay", "activate", "--socket", str(relay.control),
                       "--epoch", "1", "--token", str(token))  # fmt: skip
    assert result.returncode == 0, result.stderr
    ready = f'hamta_active{{instance="{instance}"}} == 1 and hamta_ready == 1'
    prometheus.wait_for(lambda: prometheus.query(ready), 30, "active and ready")
    # A scrape in the middle of the activation may have seen it active but not yet ready.
    prometheus.wait_for(
        lambda: not {"HamtaNoActiveNode", "HamtaRelayNotReady"} & set(prometheus.alerts()),
        30,
        "HamtaNoActiveNode resolved",
    )

    # Mail for a domain whose MX refuses connections: queued, never delivered.
    send(relay.port, "a@origin.test", ["x@deadmx.test"])
    relay.wait_events("TransientFailure")
    stalled = prometheus.firing("HamtaDeliveryStalled")
    assert stalled[0]["labels"]["instance"] == instance
    assert stalled[0]["annotations"]["summary"] == (
        f"hamta on {instance} delivers nothing with 1 messages queued"
    )

    # A newer term takes the spool: the relay stops serving it but still holds it until the
    # agent deactivates it. Active and not ready: that is the alert.
    write_token(storage, 2)
    with contextlib.suppress(smtplib.SMTPException):  # 421 once it has seen the new term
        send(relay.port, "a@origin.test", ["y@deadmx.test"])
    relay.wait_events("RelayFenced")
    not_ready = prometheus.firing("HamtaRelayNotReady")
    assert not_ready[0]["labels"]["instance"] == instance
    assert not_ready[0]["annotations"]["summary"] == f"Active hamta relay {instance} is not ready"
    assert "hamta_ready is 0" in not_ready[0]["annotations"]["description"]
