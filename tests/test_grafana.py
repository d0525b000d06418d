"""The Grafana dashboard (grafana/hamta-dashboard.json): every panel's query, run for real.

A real Prometheus, loaded with the shipped rules (the rate panels read its recording rules),
scrapes a real relay that delivered and bounced mail; each panel's PromQL must be accepted and
the panels that the relay's traffic feeds must have data.
"""

from __future__ import annotations

import json
import smtplib
from pathlib import Path
from typing import Any

from tests.conftest import RelayFactory
from tests.support import RecordingSink
from tests.support.prometheus import Prometheus
from tests.test_alerts import RULES, needs_prometheus

DASHBOARD = Path(__file__).resolve().parent.parent / "grafana" / "hamta-dashboard.json"
FED_BY_TRAFFIC = {
    "Cluster role",
    "Queue depth",
    "Messages per second",
    "Bounces by class (1 h)",
    "Bounces by reply code (1 h)",
    "Top bouncing destinations (1 h)",
    "Takeovers (24 h)",
}


def _targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def test_the_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    assert {title for title, _ in _targets()} >= FED_BY_TRAFFIC


@needs_prometheus
def test_every_panel_query_runs_on_a_real_prometheus(
    make_relay: RelayFactory, sink: RecordingSink, prometheus_for: Any
) -> None:
    relay = make_relay({"retry": {"first_delay": "60s", "max_delay": "60s", "jitter": 0.0}})
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        for rcpt in ["ok1@sink.test", "ok2@sink.test", "reject1@sink.test", "defer1@sink.test"]:
            client.sendmail("", [rcpt], b"Subject: hi\r\n\r\nhello\r\n")
    relay.wait_events("Bounce")
    relay.wait_events("TransientFailure")
    prometheus: Prometheus = prometheus_for([relay], RULES)
    # Two scrapes at least: rate() and increase() need two samples.
    prometheus.wait_for(
        lambda: prometheus.query('count_over_time(up{job="hamta"}[1m]) >= 3'), 30, "scrapes"
    )
    empty = []
    for title, expr in _targets():
        result = prometheus.query(expr)  # asserts Prometheus accepted the expression
        if title in FED_BY_TRAFFIC and not result:
            empty.append(f"{title}: {expr}")
    assert empty == [], empty
    code = prometheus.query('sum by (code) (increase(hamta_bounce_replies_total{job="hamta"}[1h]))')
    assert {r["metric"]["code"] for r in code} >= {"550"}
