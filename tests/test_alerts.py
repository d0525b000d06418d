"""The shipped Prometheus rules (alerts/): promtool's checks, and a real Prometheus on a relay."""

from __future__ import annotations

import contextlib
import shutil
import smtplib
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hamta.epoch_token import write_token
from tests.conftest import RelayFactory
from tests.support.prometheus import PROMETHEUS, Prometheus, shorten_waits
from tests.test_delivery import send

ALERTS = Path(__file__).resolve().parent.parent / "alerts"
RULES = ALERTS / "hamta.rules.yml"
RULE_TESTS = ALERTS / "hamta.rules.test.yml"
PROMTOOL = shutil.which("promtool")

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
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


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


@pytest.fixture
def short_rules(tmp_path: Path) -> Path:
    """The shipped rules with every ``for:`` cut to 1s, so a test sees them fire."""
    return shorten_waits(RULES, tmp_path / "hamta.rules.yml")


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
    result = relay.cli(
        "relay", "activate", "--socket", str(relay.control), "--epoch", "1", "--token", str(token)
    )
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
