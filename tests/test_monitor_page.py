"""The monitor's status page in Debian's chromium (Playwright), against a running ``hamta
monitor run`` whose SMTP peer goes down and comes back: it renders under the CSP without
errors, its figures are the JSON API's, the outage is listed; a screenshot goes to docs/."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import CHROMIUM, launch_chromium
from tests.support.monitor_peers import SmtpPeer, Tarpit
from tests.support.monitor_process import MonitorProcess

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "monitor-status-page.png"


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return value


def test_the_status_page_shows_what_the_api_says_in_a_real_browser(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/bootstrap installs it)")
    peer = SmtpPeer()
    fast = {"interval": "0.3s", "timeout": "0.3s", "failure_threshold": 2, "success_threshold": 2}
    with Tarpit(0.25) as tarpit:
        checks = [
            {"name": "mx", "kind": "smtp", "host": "127.0.0.1", "port": peer.port, **fast},
            # Answers, slowly: degraded, not down.
            {
                "name": "slow-mx",
                "kind": "smtp",
                "host": "127.0.0.1",
                "port": tarpit.port,
                "interval": "1s",
                "timeout": "0.9s",
                "degraded_after": "0.2s",
            },
        ]
        with MonitorProcess(tmp_path / "monitor", checks) as monitor:
            with peer:
                monitor.wait_states({"mx": "up"})
                # Some up time before the outage, so that the ratio is neither 0 nor 1.
                _wait(
                    lambda: (
                        monitor.get("/api/uptime")["checks"][0]["ranges"]["24h"]["serving_s"] >= 1.0
                    ),
                    10,
                    "a second up",
                )
            monitor.wait_states({"mx": "down"})
            with SmtpPeer(port=peer.port):
                monitor.wait_states({"mx": "up", "slow-mx": "degraded"})
                outages = _wait(
                    lambda: monitor.get("/api/outages")["outages"], 10, "the outage in the API"
                )
                assert [o["check"] for o in outages] == ["mx"] and outages[0]["end"] is not None
                assert _status(monitor.url + "/static/../monitor.toml") == 404
                assert _status(monitor.url + "/static/nothing.js") == 404
                shown = _browse(playwright, monitor.url)
                api_uptime = monitor.get("/api/uptime")
                api_checks = {row["name"]: row for row in monitor.get("/api/checks")["checks"]}

    assert shown["errors"] == [], shown["errors"]
    assert "default-src 'self'" in shown["csp"]
    assert all(url.startswith(monitor.url) for url in shown["requests"]), shown["requests"]
    assert shown["states"] == {name: row["state"] for name, row in api_checks.items()}
    assert shown["overall"] == "1 degraded"  # slow-mx; mx is up again

    # The uptime cells are the API's figures. The check's down time is over, so it is the same
    # at the page's look and the test's; up time only grew in between.
    for check in api_uptime["checks"]:
        for name, figures in check["ranges"].items():
            cell = shown["uptime"][check["name"]][name]
            assert float(cell["failing"]) == figures["failing_s"], (check["name"], name)
            serving = float(cell["serving"])
            assert serving <= figures["serving_s"] <= serving + 30, (check["name"], name)
            ratio = float(cell["ratio"])
            assert cell["text"] == f"{ratio * 100:.3f} %"
    mx_24h = shown["uptime"]["mx"]["24h"]
    assert 0 < float(mx_24h["ratio"]) < 1 and float(mx_24h["failing"]) > 0

    # The outage is the incident, with the API's times, and its timeline.
    assert shown["incident_source"] == "(outages of the last 90 days)"
    (incident,) = shown["incidents"]
    assert float(incident["start"]) == outages[0]["start"]
    assert float(incident["end"]) == outages[0]["end"]
    assert incident["title"] == "mx down" and incident["class"] == "incident resolved"
    assert len(incident["steps"]) == 2 and incident["steps"][1].endswith("recovered")
    assert shown["maintenance"] == "none"
    assert "does not report the cluster" in shown["cluster"]
    assert min(shown["painted"]) > 200, shown["painted"]
    assert SCREENSHOT.stat().st_size > 10_000


def _browse(playwright: Any, url: str) -> dict[str, Any]:
    with playwright.sync_playwright() as driver:
        browser = launch_chromium(driver)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            # Errors and CSP violations are reported on the console (a 404 of an optional
            # route too: Chromium logs every failed fetch, so those are told apart).
            page.on(
                "console",
                lambda message: (
                    errors.append(message.text)
                    if message.type == "error" and "404" not in message.text
                    else None
                ),
            )
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            response = page.goto(url + "/")
            assert response is not None
            page.wait_for_function("document.body.dataset.loaded === 'yes'", timeout=15_000)
            page.wait_for_function(
                "[...document.querySelectorAll('.chart')].length === 2"
                " && [...document.querySelectorAll('.chart')]"
                ".every((c) => Number(c.dataset.points) >= 1)",
                timeout=15_000,
            )
            shown: dict[str, Any] = page.evaluate(
                """() => {
                const rows = [...document.querySelectorAll('#checks tbody tr')];
                const uptime = {};
                for (const row of rows) {
                    uptime[row.dataset.check] = {};
                    for (const td of row.querySelectorAll('td.uptime')) {
                        uptime[row.dataset.check][td.dataset.range] = {
                            text: td.textContent, ratio: td.dataset.ratio,
                            serving: td.dataset.serving, failing: td.dataset.failing};
                    }
                }
                return {
                    states: Object.fromEntries(rows.map((r) => [r.dataset.check, r.dataset.state])),
                    uptime,
                    overall: document.getElementById('overall').textContent,
                    incident_source: document.getElementById('incident-source').textContent,
                    incidents: [...document.querySelectorAll('#incidents > li.incident')].map(
                        (li) => ({start: li.dataset.start, end: li.dataset.end,
                                  class: li.className,
                                  title: li.querySelector('b').textContent,
                                  steps: [...li.querySelectorAll('.steps li')].map(
                                      (s) => s.textContent)})),
                    maintenance: document.getElementById('maintenance').textContent.trim(),
                    cluster: document.getElementById('cluster').textContent,
                    painted: [...document.querySelectorAll('.chart canvas')].map((canvas) => {
                        const pixels = canvas.getContext('2d')
                            .getImageData(0, 0, canvas.width, canvas.height).data;
                        let n = 0;
                        for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) n++;
                        return n;
                    }),
                };
            }"""
            )
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            # Another range: each chart is read again over 7 days.
            page.click("#ranges button[data-range='7d']")
            page.wait_for_function(
                "() => [...document.querySelectorAll('.chart')]"
                ".every((c) => c.dataset.range === '7d')",
                timeout=15_000,
            )
            shown["errors"] = errors
            shown["csp"] = response.headers["content-security-policy"]
            shown["requests"] = requests
            return shown
        finally:
            browser.close()
