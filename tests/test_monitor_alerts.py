"""The monitor's Prometheus rules (alerts/monitor.rules.yml): promtool's checks and unit tests,
and a real Prometheus scraping a running ``hamta monitor`` whose SMTP peer goes away."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.monitor_peers import SmtpPeer
from tests.support.monitor_process import MonitorProcess
from tests.support.prometheus import PROMETHEUS, Prometheus, shorten_waits
from tests.test_alerts import needs_prometheus, needs_promtool

ALERTS = Path(__file__).resolve().parent.parent / "alerts"
RULES = ALERTS / "monitor.rules.yml"
RULE_TESTS = ALERTS / "monitor.rules.test.yml"
EXPECTED_ALERTS = {
    "HamtaMonitorCheckDown",
    "HamtaMonitorCheckDegraded",
    "HamtaMonitorCertificateExpiring",
    "HamtaMonitorCertificateExpiringSoon",
    "HamtaMonitorCertificateExpired",
    "HamtaMonitorNotScraped",
    "HamtaMonitorNotifierFailing",
}


def _promtool(*args: str) -> str:
    from tests.test_alerts import _promtool as run  # noqa: PLC0415

    result = run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_promtool
def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    assert "SUCCESS: 7 rules found" in _promtool("check", "rules", str(RULES))
    assert "SUCCESS" in _promtool("test", "rules", str(RULE_TESTS))


@needs_promtool
def test_every_alert_is_tested_firing_and_not_firing() -> None:
    tests = RULE_TESTS.read_text()
    assert set(re.findall(r"- alert: (\w+)", RULES.read_text())) == EXPECTED_ALERTS
    for name in EXPECTED_ALERTS:
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tests), name
        assert re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", tests), name


@pytest.fixture
def short_rules(tmp_path: Path) -> Path:
    """The shipped rules with every ``for:`` cut to 1s, so a test sees them fire."""
    return shorten_waits(RULES, tmp_path / "monitor.rules.yml")


@needs_prometheus
def test_prometheus_scrapes_a_monitor_and_a_down_check_fires(
    tmp_path: Path, short_rules: Path
) -> None:
    assert PROMETHEUS is not None
    peer = SmtpPeer()
    fast = {"interval": "0.3s", "timeout": "0.3s", "failure_threshold": 2}
    checks = [
        {"name": "mx", "kind": "smtp", "host": "127.0.0.1", "port": peer.port, **fast},
        {"name": "backup", "kind": "smtp", "host": "127.0.0.1", "port": peer.port, **fast},
    ]
    with MonitorProcess(tmp_path / "monitor", checks) as monitor:
        prometheus = Prometheus(
            tmp_path / "prometheus", [monitor.listen], short_rules, job="hamta-monitor"
        )
        prometheus.start()
        try:
            with peer:
                monitor.wait_states({"mx": "up", "backup": "up"})
                prometheus.wait_for(
                    lambda: prometheus.query(
                        'hamta_monitor_check_state{job="hamta-monitor",state="up"} == 1'
                    ),
                    30,
                    "the checks up in Prometheus",
                )
                rules = [
                    rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]
                ]
                assert {rule["name"] for rule in rules} == EXPECTED_ALERTS
                assert all(rule["health"] == "ok" for rule in rules), rules
                # Up to the first scrape the monitor was absent; not after it.
                prometheus.wait_for(lambda: not prometheus.alerts(), 30, "no alert")
            # The peer is gone: the monitor says down, Prometheus fires.
            monitor.wait_states({"mx": "down", "backup": "down"})
            fired = prometheus.firing("HamtaMonitorCheckDown", at_least=2)
            assert {alert["labels"]["check"] for alert in fired} == {"mx", "backup"}
            mx = next(alert for alert in fired if alert["labels"]["check"] == "mx")
            assert mx["labels"]["severity"] == "critical"
            assert mx["annotations"]["summary"] == f"Check mx is down (seen from {monitor.listen})"
            assert "HamtaMonitorNotScraped" not in prometheus.alerts()
        finally:
            prometheus.stop()
