"""The live dashboard: its history from real counters, and its page in a real browser.

The browser test loads a relay that delivered and bounced mail into Debian's chromium, driven
by Playwright, and checks that the charts drew lines from the relay's data (pixels on the
canvases, not just elements), that the bounce classes and codes, the bouncing destination and
the relay's own takeover are shown; the screenshot is kept in ``test-artifacts/``.
"""

from __future__ import annotations

import itertools
import json
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest

from hamta import activations
from hamta.dashboard import Figures, History, read_figures
from tests.conftest import RelayFactory
from tests.support import RecordingSink
from tests.support.browser import CHROMIUM, launch_chromium

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
EXPOSITION = """\
# TYPE hamta_messages_received_total counter
hamta_messages_received_total 10.0
# TYPE hamta_deliveries_total counter
hamta_deliveries_total{outcome="delivered"} 6.0
hamta_deliveries_total{outcome="bounced"} 3.0
hamta_deliveries_total{outcome="deferred"} 1.0
# TYPE hamta_bounces_total counter
hamta_bounces_total{class="InvalidRecipient",kind="hard"} 2.0
hamta_bounces_total{class="QuotaIssues",kind="hard"} 1.0
hamta_bounces_total{class="QuotaIssues",kind="soft"} 4.0
# TYPE hamta_bounce_replies_total counter
hamta_bounce_replies_total{code="550"} 2.0
hamta_bounce_replies_total{code="452"} 4.0
"""


def test_figures_are_read_from_the_relay_s_counters() -> None:
    figures = read_figures(EXPOSITION)
    assert figures.totals == {"received": 10, "delivered": 6, "bounced": 3, "deferred": 1}
    assert figures.bounces_by_class == {"InvalidRecipient": 2, "QuotaIssues": 5}
    assert figures.bounces_by_code == {"550": 2, "452": 4}


def test_history_gives_rates_between_samples_and_keeps_only_the_last() -> None:
    history = History(size=3)

    def figures(delivered: float) -> Figures:
        return Figures({"delivered": delivered, "received": 2 * delivered}, {}, {})

    history.add(100.0, 5, figures(0))  # the first sample: no rate yet
    history.add(102.0, 7, figures(10))
    history.add(104.0, 9, figures(4))  # a counter went down (a worker restarted): no rate
    history.add(104.0, 9, figures(8))  # no time passed: ignored
    history.add(106.0, 3, figures(10))
    history.add(108.0, 1, figures(20))
    columns = history.columns()
    assert columns["t"] == [104.0, 106.0, 108.0]
    assert columns["depth"] == [9, 3, 1]
    assert columns["delivered_per_s"] == [None, 1.0, 5.0]
    assert columns["received_per_s"] == [None, 2.0, 10.0]
    assert history.view(2.0)["samples"] == 3


def test_activations_are_read_newest_first_past_a_torn_line(tmp_path: Path) -> None:
    for epoch in (1, 2, 3):
        activations.record(tmp_path, {"node": f"n{epoch}", "epoch": epoch})
    with open(tmp_path / activations.FILE, "ab") as log:
        log.write(b'{"node": "torn')  # a crash mid-line
    assert [a["epoch"] for a in activations.recent(tmp_path, limit=3)] == [3, 2]
    assert activations.recent(tmp_path / "nowhere") == []


def _send(port: int, recipients: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        for rcpt in recipients:
            client.sendmail("", [rcpt], f"Subject: to {rcpt}\r\n\r\nhello\r\n".encode())


def _history(relay: Any) -> dict[str, Any]:
    status, body = relay.get("/api/history")
    assert status == 200
    data: dict[str, Any] = json.loads(body)
    return data


def until_true(page: Any, predicate: str, timeout: float = 15.0) -> None:
    """Evaluate ``predicate`` (a function's source) in ``page`` until it returns true."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate):
        assert time.monotonic() < deadline, f"never true: {predicate}"
        page.wait_for_timeout(100)


def test_the_dashboard_draws_a_loaded_relay_in_a_real_browser(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/bootstrap installs it)")
    relay = make_relay(
        {
            "admin": {"dashboard_interval": "0.25s"},
            "retry": {"first_delay": "60s", "max_delay": "60s", "jitter": 0.0},
        }
    )
    deadline = time.monotonic() + 30
    for round_ in itertools.count():  # load over a few samples, so the charts have a shape
        # A new address to reject each time: a hard bounce suppresses the one before.
        _send(relay.port, [f"ok{i}@sink.test" for i in range(5)] + [f"reject{round_}@sink.test"])
        history = _history(relay)
        if history["samples"] >= 8 and history["bounces_by_class"]:
            break
        assert time.monotonic() < deadline, history
    _send(relay.port, ["full1@sink.test", "defer1@sink.test"])
    relay.wait_events("Bounce", 2)
    status, body = relay.get("/")
    assert status == 200 and b"uPlot.iife.min.js" in body
    assert relay.get("/static/../config.toml")[0] == 404
    assert relay.get("/static/nothing.js")[0] == 404

    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as driver:
        browser = launch_chromium(driver)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            # A Content-Security-Policy violation is reported on the console, not as an error.
            page.on(
                "console",
                lambda message: (
                    errors.append(message.text)
                    if "Content Security Policy" in message.text
                    else None
                ),
            )
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            response = page.goto(relay.admin_url + "/")
            assert response is not None
            assert "default-src 'self'" in response.headers["content-security-policy"]
            # Polled with evaluate (a function, called over the DevTools protocol), not
            # wait_for_function: that compiles its string in the page, which the dashboard's CSP
            # (no 'unsafe-eval') refuses whenever the first look is not already true (CI).
            until_true(
                page,
                "() => Number(document.querySelector('#chart-depth')?.dataset.points) >= 8"
                " && Number(document.querySelector('#chart-rates')?.dataset.points) >= 8",
            )
            until_true(page, "() => document.querySelectorAll('#bounce-classes .row').length >= 2")
            # The lines are on the canvases: count the pixels uPlot painted.
            painted = page.evaluate(
                """() => [...document.querySelectorAll('.chart canvas')].map((canvas) => {
                    const pixels = canvas.getContext('2d')
                        .getImageData(0, 0, canvas.width, canvas.height).data;
                    let n = 0;
                    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) n++;
                    return n;
                })"""
            )
            assert len(painted) == 2 and min(painted) > 500, painted
            classes = page.eval_on_selector_all(
                "#bounce-classes .row", "rows => rows.map(r => r.dataset.label)"
            )
            assert {"InvalidRecipient", "QuotaIssues"} <= set(classes)
            codes = page.eval_on_selector_all(
                "#bounce-codes .row", "rows => rows.map(r => r.dataset.label)"
            )
            assert "550" in codes
            assert "sink.test" in page.inner_text("#top-bouncing")
            assert page.inner_text("#role") == "active"
            assert len(page.query_selector_all("#failovers tbody tr")) == 1
            assert int(page.inner_text("#kpi-depth")) >= 1  # the deferred one
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert errors == []
            # Nothing from the network: every request went to the relay itself.
            assert all(url.startswith(relay.admin_url) for url in requests), requests
        finally:
            browser.close()
