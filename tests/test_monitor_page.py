"""The monitor's status page in Debian's chromium (Playwright), against a running ``hamta
monitor run`` whose SMTP peer goes down and comes back: it renders under the CSP without
errors, its figures are the JSON API's, and its incidents (acknowledged through the API, one in
a maintenance window) and maintenance windows are what ``/api/incidents`` and
``/api/maintenance`` return. The monitor knows a cluster (a real ZooKeeper, node1 active and
node2 passive as their agents publish them) and a second check location runs beside it: each
component shows every location's verdict, and the outage says both locations saw it. The
screenshot goes to the test's tmp dir; to docs/ only with ``HAMTA_UPDATE_SCREENSHOTS=1`` (so
that a test run leaves the tree clean)."""

from __future__ import annotations

import datetime as dt
import os
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.zookeeper import ZooKeeperEnsemble
from tests.support.browser import CHROMIUM, launch_chromium
from tests.support.monitor_peers import SmtpPeer, Tarpit
from tests.support.monitor_process import MonitorProcess
from tests.support.pair import active_and_passive

DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "monitor-status-page.png"


def _screenshot_path(tmp_path: Path) -> Path:
    if os.environ.get("HAMTA_UPDATE_SCREENSHOTS") == "1":
        return DOCS_SCREENSHOT
    return tmp_path / "monitor-status-page.png"


def _maintenance_now(check: str) -> str:
    """A one-off window over ``check`` running from an hour ago to an hour ahead."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    start, end = (now + dt.timedelta(hours=h) for h in (-1, 1))
    return (
        "[[maintenance]]\n"
        'name = "tarpit tuning"\n'
        f'checks = ["{check}"]\n'
        f"start = {start.isoformat().replace('+00:00', 'Z')}\n"
        f"end = {end.isoformat().replace('+00:00', 'Z')}\n"
    )


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


@pytest.fixture
def pair(zookeeper: ZooKeeperEnsemble) -> Iterator[dict[str, Any]]:
    """A cluster of its own: node1 active (the leader), node2 passive, as their agents write."""
    name = f"pg{uuid.uuid4().hex[:10]}"
    with active_and_passive(zookeeper.hosts, name):
        yield {"cluster": {"zookeeper": zookeeper.hosts, "cluster": name, "poll_every": "0.2s"}}


def test_the_status_page_shows_what_the_api_says_in_a_real_browser(
    tmp_path: Path, pair: dict[str, Any]
) -> None:
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
        monitor_process = MonitorProcess(
            tmp_path / "monitor",
            checks,
            extra=_maintenance_now("slow-mx"),
            top={"location": "arbiter"},
            cluster=pair["cluster"],
        )
        # The other check location watches mx only.
        client_process = MonitorProcess(
            tmp_path / "client", checks[:1], top={"location": "client"}, cluster=pair["cluster"]
        )
        with monitor_process as monitor, client_process as client:
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
            # Acknowledged through the API while it is open, as the page would.
            opened = _wait(
                lambda: [
                    i for i in monitor.get("/api/incidents")["incidents"] if i["check"] == "mx"
                ],
                10,
                "the incident opened",
            )
            acked = monitor.post(f"/api/incidents/{opened[0]['id']}/ack", {"by": "alice"})
            assert acked["acked_by"] == "alice"
            # The other location saw mx down too: the incident says so before it ends.
            client.wait_states({"mx": "down"})
            _wait(
                lambda: (
                    monitor.get(f"/api/incidents/{opened[0]['id']}")["locations"]
                    == ["arbiter", "client"]
                ),
                15,
                "the incident seen from client",
            )
            with SmtpPeer(port=peer.port):
                monitor.wait_states({"mx": "up", "slow-mx": "degraded"})
                client.wait_states({"mx": "up"})
                _wait(
                    lambda: (
                        monitor.get("/api/checks")["checks"][0]["locations"]
                        == {"arbiter": "up", "client": "up"}
                    ),
                    15,
                    "both locations' verdicts of mx",
                )
                _wait(
                    lambda: monitor.get(f"/api/incidents/{opened[0]['id']}")["resolved"],
                    10,
                    "the incident resolved",
                )
                outages = _wait(
                    lambda: monitor.get("/api/outages")["outages"], 10, "the outage in the API"
                )
                assert [o["check"] for o in outages] == ["mx"] and outages[0]["end"] is not None
                assert _status(monitor.url + "/static/../monitor.toml") == 404
                assert _status(monitor.url + "/static/nothing.js") == 404
                uptime_before = monitor.get("/api/uptime")
                shown = _browse(playwright, monitor.url, _screenshot_path(tmp_path))
                api_incidents = [
                    monitor.get(f"/api/incidents/{i['id']}")
                    for i in monitor.get("/api/incidents")["incidents"]
                ]
                api_maintenance = monitor.get("/api/maintenance")["maintenance"]
                api_uptime = monitor.get("/api/uptime")
                api_checks = {row["name"]: row for row in monitor.get("/api/checks")["checks"]}

    assert shown["errors"] == [], shown["errors"]
    assert "default-src 'self'" in shown["csp"]
    assert all(url.startswith(monitor.url) for url in shown["requests"]), shown["requests"]
    assert shown["states"] == {name: row["state"] for name, row in api_checks.items()}
    # Each component shows every location's verdict, as /api/checks gives them.
    assert shown["locations"] == {name: row["locations"] for name, row in api_checks.items()}
    assert shown["locations"]["slow-mx"] == {"arbiter": "degraded"}  # watched from here only
    assert shown["overall"] == "1 degraded"  # slow-mx; mx is up again

    # The uptime cells are the API's figures, as they stood between the test's two reads: each
    # time only grows (CI once saw mx fail again, under load, between the page's look and the
    # second read).
    before = {c["name"]: c["ranges"] for c in uptime_before["checks"]}
    for check in api_uptime["checks"]:
        for name, figures in check["ranges"].items():
            cell = shown["uptime"][check["name"]][name]
            earlier = before[check["name"]][name]
            for field in ("failing", "serving", "maintenance"):
                low, high = earlier[f"{field}_s"], figures[f"{field}_s"]
                assert low <= float(cell[field]) <= high, (check["name"], name, field)
            if figures["ratio"] is None:
                held = figures["maintenance_s"] > 0
                assert cell["text"] == ("maintenance" if held else "\u2013")
                assert cell["ratio"] == "null"
            else:
                assert cell["text"] == f"{float(cell['ratio']) * 100:.3f} %"
    mx_24h = shown["uptime"]["mx"]["24h"]
    assert 0 < float(mx_24h["ratio"]) < 1 and float(mx_24h["failing"]) > 0
    assert float(mx_24h["maintenance"]) == 0
    # slow-mx has been in its maintenance window all along: none of its time counts.
    slow_24h = shown["uptime"]["slow-mx"]["24h"]
    assert float(slow_24h["maintenance"]) > 0 and slow_24h["ratio"] == "null"
    assert float(slow_24h["serving"]) == float(slow_24h["failing"]) == 0
    assert slow_24h["text"] == "maintenance"

    # The incidents are the API's: the outage of mx (critical, acknowledged by alice, resolved)
    # and the degraded slow-mx (a warning, open, in the maintenance window), with timelines.
    assert [i["id"] for i in shown["incidents"]] == [str(i["id"]) for i in api_incidents]
    for page_row, api_row in zip(shown["incidents"], api_incidents, strict=True):
        assert page_row["severity"] == api_row["severity"]
        assert page_row["state"] == api_row["state"]
        assert float(page_row["opened"]) == api_row["opened"]
        assert page_row["resolved"] == str(api_row["resolved"]).replace("None", "null")
        assert page_row["acked_by"] == (api_row["acked_by"] or "")
        assert page_row["maintenance"] == (api_row["maintenance"] or "")
        assert page_row["events"] == [step["event"] for step in api_row["timeline"]]
        assert page_row["locations"] == ",".join(api_row["locations"])
    by_check = {i["check"]: i for i in api_incidents}
    mx, slow = by_check["mx"], by_check["slow-mx"]
    assert mx["severity"] == "critical" and mx["acked_by"] == "alice" and mx["resolved"]
    events = [e["event"] for e in mx["timeline"]]
    # The acknowledgement and the other location's note race: either may come first.
    assert events[0] == "opened" and events[-1] == "resolved"
    assert sorted(events[1:-1]) == ["acknowledged", "seen-from"]
    assert slow["severity"] == "warning" and slow["resolved"] is None
    assert slow["maintenance"] == "tarpit tuning"
    # Acknowledged on the page: the store has it, with its timeline line; nothing left to ack.
    assert slow["acked_by"] == "bob" and "acknowledged by bob" in slow_facts(shown, slow)
    assert [e["event"] for e in slow["timeline"]][-1] == "acknowledged"
    assert shown["ack_forms"] == 0
    mx_shown = next(i for i in shown["incidents"] if i["id"] == str(mx["id"]))
    assert "acknowledged by alice" in mx_shown["facts"]
    assert mx["locations"] == ["arbiter", "client"] and slow["locations"] == ["arbiter"]
    assert "seen from arbiter, client" in mx_shown["facts"]
    slow_shown = next(i for i in shown["incidents"] if i["id"] == str(slow["id"]))
    assert "in maintenance (tarpit tuning)" in slow_shown["facts"]
    assert "ongoing" in slow_shown["facts"] and slow_shown["class"] == "incident ongoing"
    (window,) = api_maintenance
    assert window["active"] and window["checks"] == ["slow-mx"]
    assert shown["maintenance"] == [
        {
            "name": "tarpit tuning",
            "class": "maintenance active",
            "text": shown["maintenance"][0]["text"],
        }
    ]
    assert "tarpit tuning (slow-mx): now:" in shown["maintenance"][0]["text"]
    assert "node1activeactive" in shown["cluster"] and "node2passivestandby" in shown["cluster"]
    assert min(shown["painted"]) > 200, shown["painted"]
    assert _screenshot_path(tmp_path).stat().st_size > 10_000


def slow_facts(shown: dict[str, Any], row: dict[str, Any]) -> str:
    return str(next(i["facts"] for i in shown["incidents"] if i["id"] == str(row["id"])))


def _browse(playwright: Any, url: str, screenshot: Path) -> dict[str, Any]:
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
            page.wait_for_function("() => document.body.dataset.loaded === 'yes'", timeout=15_000)
            # Acknowledge the open incident on the page, as an operator would.
            ack = page.locator("#incidents li.ongoing form.ack")
            assert ack.count() == 1
            ack.locator("input").fill("bob")
            ack.locator("button").click()
            page.wait_for_function(
                "() => [...document.querySelectorAll('#incidents li.ongoing')]"
                ".every((li) => li.dataset.ackedBy === 'bob')",
                timeout=15_000,
            )
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
                            serving: td.dataset.serving, failing: td.dataset.failing,
                            maintenance: td.dataset.maintenance};
                    }
                }
                return {
                    states: Object.fromEntries(rows.map((r) => [r.dataset.check, r.dataset.state])),
                    locations: Object.fromEntries(rows.map((r) => [r.dataset.check,
                        Object.fromEntries([...r.querySelectorAll('td.locations .badge')].map(
                            (b) => [b.dataset.location, b.dataset.state]))])),
                    uptime,
                    overall: document.getElementById('overall').textContent,
                    ack_forms: document.querySelectorAll('#incidents form.ack').length,
                    incidents: [...document.querySelectorAll('#incidents > li.incident')].map(
                        (li) => ({id: li.dataset.id, opened: li.dataset.opened,
                                  resolved: li.dataset.resolved, class: li.className,
                                  severity: li.dataset.severity, state: li.dataset.state,
                                  acked_by: li.dataset.ackedBy,
                                  maintenance: li.dataset.maintenance,
                                  locations: li.dataset.locations,
                                  facts: li.querySelector('.facts').textContent,
                                  events: [...li.querySelectorAll('.steps li')].map(
                                      (s) => s.dataset.event)})),
                    maintenance: [...document.querySelectorAll('#maintenance > li')].map(
                        (li) => ({name: li.dataset.name, class: li.className,
                                  text: li.textContent})),
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
            page.screenshot(path=str(screenshot), full_page=True)
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
