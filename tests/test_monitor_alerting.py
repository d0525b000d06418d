"""Alerting against real things: the engine runs a real SMTP check, incidents open and resolve
in the store, and the notifications reach a real HTTP server (webhook, Slack, Teams,
PagerDuty's Events API) and a recording SMTP sink (email)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from hamta import eventlog
from monitor.alerting import Alerting, assemble
from monitor.api import build_app
from monitor.config import parse_monitor_config
from monitor.engine import Engine
from monitor.incident_store import IncidentStore
from monitor.incidents import Severity
from monitor.metrics import RESULTS, MonitorMetrics
from monitor.notifiers import Notification
from monitor.notifiers.dispatch import Dispatcher
from monitor.observation import SystemClock
from monitor.store import Store
from monitor.verdicts import CheckState, State, StateChange
from tests.support.monitor_peers import SmtpPeer
from tests.support.ports import free_port
from tests.support.relay import read_events
from tests.support.sink import RecordingSink

INTERVAL = 0.1


@dataclass
class Receiver:
    """An HTTP server recording each POST's JSON body by path. ``/flaky`` answers 500 twice
    before it accepts; ``/hang`` never answers."""

    bodies: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    hits: Counter[str] = field(default_factory=Counter)
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    fail_first: int = 2
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        if request.path == "/hang":
            await asyncio.sleep(3600)
        if request.path == "/flaky" and self.hits[request.path] <= self.fail_first:
            return web.Response(status=500, text="not now")
        self.bodies[request.path].append(await request.json())
        self.times[request.path].append(time.time())
        return web.Response(text="ok")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        await runner.cleanup()


def toml_value(value: Any) -> str:
    return (
        json.dumps(value)
        if not isinstance(value, dict)
        else ("{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }")
    )


def render(
    port: int,
    notifiers: dict[str, dict[str, Any]],
    steps: list[tuple[str, list[str]]],
    extra: str = "",
    queue: int = 100,
) -> str:
    lines = [
        "[alerting]",
        f"queue = {queue}",
        'tick = "50ms"',
        'retry_wait = "10ms"',
        'retry_max_wait = "50ms"',
        "attempts = 3",
        "[[checks]]",
        'name = "mx"',
        'kind = "smtp"',
        'host = "127.0.0.1"',
        f"port = {port}",
        f'interval = "{INTERVAL}s"',
        f'timeout = "{INTERVAL}s"',
        "failure_threshold = 1",
        "success_threshold = 1",
    ]
    for name, keys in notifiers.items():
        lines.append(f"[notifiers.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in keys.items()]
    for after, names in steps:
        lines += ["[[escalation]]", f'after = "{after}"', f"notifiers = {json.dumps(names)}"]
    return "\n".join(lines) + "\n" + extra


@dataclass
class Monitor:
    engine: Engine
    alerting: Alerting
    dispatcher: Dispatcher
    store: Store
    incidents: IncidentStore
    metrics: MonitorMetrics


@asynccontextmanager
async def monitoring(tmp_path: Path, text: str) -> AsyncIterator[Monitor]:
    """The engine, the alerting and the dispatcher, wired as `hamta monitor run` wires them."""
    config = parse_monitor_config(text)
    eventlog.configure("info", tmp_path / "monitor.log")
    log = eventlog.get_logger(component="monitor")
    store = Store(tmp_path / "monitor.sqlite")
    clock = SystemClock()
    async with aiohttp.ClientSession() as session:
        alerting, dispatcher = assemble(config, store, session, log, clock, "test-monitor")
        metrics = MonitorMetrics(config.checks, notifications=dispatcher.counts)
        engine = Engine(
            config.checks,
            store,
            metrics,
            log,
            clock,
            on_change=alerting.on_change,
        )
        tasks = [asyncio.create_task(t) for t in (engine.run(), alerting.run(), dispatcher.run())]
        try:
            yield Monitor(engine, alerting, dispatcher, store, alerting.incidents, metrics)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await store.close()


async def until(predicate: Any, limit: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < limit, what
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def wait_state(monitor: Monitor, state: State, limit: float = 5.0) -> None:
    await until(
        lambda: monitor.engine.states.get("mx", CheckState()).state is state,
        limit,
        f"mx never {state}",
    )


async def recover(port: int) -> SmtpPeer:
    peer = SmtpPeer(port=port)
    await asyncio.to_thread(peer.__enter__)
    return peer


def test_every_notifier_hears_the_trigger_and_the_resolve(tmp_path: Path) -> None:
    port = free_port()
    key_file = tmp_path / "routing-key"
    key_file.write_text("R0UTINGKEY\n")
    key_file.chmod(0o600)
    sink = RecordingSink()
    sink.start()

    async def scenario() -> tuple[Receiver, list[dict[str, Any]], dict[str, Any]]:
        async with receiving() as receiver:
            notifiers: dict[str, dict[str, Any]] = {
                "hook": {"kind": "webhook", "url": receiver.url("/hook")},
                "slack": {"kind": "slack", "url": receiver.url("/slack")},
                "teams": {"kind": "teams", "url": receiver.url("/teams")},
                "pd": {
                    "kind": "pagerduty",
                    "url": receiver.url("/pd"),
                    "routing_key_file": str(key_file),
                    "source": "lab-monitor",
                },
                "mail": {
                    "kind": "email",
                    "smarthost": f"127.0.0.5:{sink.port}",
                    "sender": "monitor@example.org",
                    "recipients": ["ops@example.org"],
                    "starttls": False,
                },
            }
            # PagerDuty named again by a later step: still one trigger for the incident.
            steps = [("0s", list(notifiers)), ("0.2s", ["pd", "hook"])]
            async with monitoring(tmp_path, render(port, notifiers, steps)) as monitor:
                await wait_state(monitor, State.DOWN)
                await until(lambda: len(receiver.bodies["/pd"]) == 1, 5, "no trigger")
                row = (await monitor.incidents.open_incidents())[0]
                await until(lambda: time.time() > row.incident.opened + 0.4, 5, "")
                peer = await recover(port)
                try:
                    await wait_state(monitor, State.UP)
                    await until(lambda: len(receiver.bodies["/pd"]) == 2, 5, "no resolve")
                    await monitor.dispatcher.drain(5)
                    await until(lambda: sink.count >= 2, 5, "no mail")
                finally:
                    await asyncio.to_thread(peer.__exit__, None, None, None)
                rows = [row.as_dict() for row in await monitor.incidents.recent()]
                timeline = await monitor.incidents.timeline(rows[0]["id"])
        return receiver, rows, {"timeline": timeline}

    try:
        receiver, rows, more = asyncio.run(scenario())
        mails = sink.messages
    finally:
        sink.stop()
    # One incident, resolved; every notifier told twice (trigger, resolve), nothing more.
    assert len(rows) == 1 and rows[0]["resolved"] is not None, rows
    assert rows[0]["severity"] == "critical" and rows[0]["steps_fired"] == [1, 2]
    assert {path: len(b) for path, b in receiver.bodies.items()} == {
        "/hook": 2,
        "/slack": 2,
        "/teams": 2,
        "/pd": 2,
    }
    hook = receiver.bodies["/hook"]
    assert [b["event"] for b in hook] == ["trigger", "resolve"]
    assert hook[0]["check"] == "mx" and hook[0]["state"] == "down" and hook[1]["state"] == "up"
    trigger, resolve = receiver.bodies["/pd"]
    assert trigger["event_action"] == "trigger" and resolve["event_action"] == "resolve"
    assert trigger["dedup_key"] == resolve["dedup_key"] == f"test-monitor/incident/{rows[0]['id']}"
    assert trigger["routing_key"] == "R0UTINGKEY"
    assert trigger["payload"]["severity"] == "critical"
    assert trigger["payload"]["source"] == "lab-monitor"
    assert "mx is down" in trigger["payload"]["summary"]
    slack = receiver.bodies["/slack"][0]
    assert "mx is down" in slack["text"] and slack["blocks"][0]["type"] == "section"
    card = receiver.bodies["/teams"][0]["attachments"][0]
    assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert card["content"]["type"] == "AdaptiveCard"
    assert len(mails) == 2 and mails[0].rcpt_tos == ("ops@example.org",)
    body = mails[0].data.decode()
    assert "Subject: [hamta monitor] CRITICAL mx is down" in body
    assert f"incident: {rows[0]['id']}" in body
    events = [e["event"] for e in more["timeline"]]
    assert events[0] == "opened" and "escalated" in events and "resolved" in events
    assert events.count("notified") == 10, events  # 5 notifiers x (trigger, resolve)
    logged = [e["event"] for e in read_events(tmp_path / "monitor.log")]
    assert logged.count("IncidentOpened") == 1 and logged.count("IncidentResolved") == 1
    assert logged.count("NotificationSent") == 10


def test_a_failing_receiver_is_retried_and_a_hanging_one_holds_up_nothing(
    tmp_path: Path,
) -> None:
    port = free_port()

    async def scenario() -> tuple[Receiver, Monitor, list[dict[str, Any]], int]:
        async with receiving() as receiver:
            notifiers = {
                "flaky": {"kind": "webhook", "url": receiver.url("/flaky")},
                "stuck": {"kind": "webhook", "url": receiver.url("/hang"), "timeout": "0.3s"},
            }
            text = render(port, notifiers, [("0s", ["flaky", "stuck"])])
            async with monitoring(tmp_path, text) as monitor:
                await wait_state(monitor, State.DOWN)
                await until(lambda: len(receiver.bodies["/flaky"]) == 1, 5, "never delivered")
                # A full queue drops at once, counted, never waits.
                note = Notification("trigger", 99, "mx", "smtp", "critical", "down", "", 0, 0)
                start = time.monotonic()
                accepted = sum(monitor.dispatcher.submit("stuck", note) for _ in range(150))
                assert time.monotonic() - start < 0.1
                # Three attempts of 0.3 s on the hanging receiver, while the check runs on.
                await until(lambda: monitor.dispatcher.counts["stuck"].failed >= 1, 5, "no end")
                await asyncio.sleep(0.3)
                rows = await monitor.store.observations("mx")
        return receiver, monitor, rows, accepted

    receiver, monitor, rows, accepted = asyncio.run(scenario())
    flaky = monitor.dispatcher.counts["flaky"]
    assert receiver.hits["/flaky"] == 3 and flaky.retries == 2 and flaky.sent == 1
    stuck = monitor.dispatcher.counts["stuck"]
    assert stuck.retries >= 2 and stuck.failed >= 1
    assert accepted == 100 and stuck.dropped == 50  # queue = 100 (the default)
    # The check kept its 0.1 s schedule through the hang: no gap much over an interval.
    times = [row["at"] for row in rows]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 10 and max(gaps) < INTERVAL * 3, gaps
    print(f"\nchecks during a hanging notifier: {len(times)} runs, widest gap {max(gaps):.3f}s")
    logged = read_events(tmp_path / "monitor.log")
    assert sum(e["event"] == "NotificationRetry" for e in logged) >= 4
    assert any(e["event"] == "NotificationDropped" and e["dropped"] == 50 for e in logged)


def test_escalation_by_age_stops_at_an_acknowledgement(tmp_path: Path) -> None:
    port = free_port()

    async def scenario() -> tuple[Receiver, dict[str, Any], float]:
        async with receiving() as receiver:
            notifiers = {
                n: {"kind": "webhook", "url": receiver.url(f"/{n}")}
                for n in ("first", "second", "third")
            }
            steps = [("0s", ["first"]), ("0.3s", ["second"]), ("0.9s", ["third"])]
            async with monitoring(tmp_path, render(port, notifiers, steps)) as monitor:
                await wait_state(monitor, State.DOWN)
                await until(lambda: len(receiver.bodies["/second"]) == 1, 5, "no step 2")
                # Acknowledged through the monitor's own API, as the page will.
                row = (await monitor.incidents.open_incidents())[0]
                # The incident's age when the second step reached its receiver.
                second_after = receiver.times["/second"][0] - row.incident.opened
                listen = f"127.0.0.1:{free_port()}"
                app = build_app(monitor.store, MonitorMetrics([]), [], listen)
                runner = web.AppRunner(app)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", int(listen.split(":")[1])).start()
                try:
                    async with aiohttp.ClientSession() as client:
                        url = f"http://{listen}/api/incidents/{row.incident.id}/ack"
                        async with client.post(url, data="by=x") as refused:
                            assert refused.status == 415
                        async with client.post(url, json={"by": "alice"}) as answer:
                            assert answer.status == 200, await answer.text()
                        await asyncio.sleep(1.2)  # past the third step's age
                        async with client.get(f"http://{listen}/api/incidents/1") as answer:
                            detail = await answer.json()
                finally:
                    await runner.cleanup()
        return receiver, detail, second_after

    receiver, detail, second_after = asyncio.run(scenario())
    assert 0.3 <= second_after < 1.0, second_after
    assert len(receiver.bodies["/first"]) == 1 and len(receiver.bodies["/second"]) == 1
    assert receiver.bodies["/third"] == []
    assert detail["acked_by"] == "alice" and detail["steps_fired"] == [1, 2]
    assert "acknowledged" in [e["event"] for e in detail["timeline"]]
    logged = read_events(tmp_path / "monitor.log", "IncidentAcknowledged")
    assert len(logged) == 1 and logged[0]["by"] == "alice"


def test_a_maintenance_window_holds_the_alerts_and_keeps_the_incident(tmp_path: Path) -> None:
    port = free_port()
    window = (
        '[[maintenance]]\nname = "upgrade"\nchecks = ["mx"]\n'
        "start = 2000-01-01T00:00:00Z\nend = 2100-01-01T00:00:00Z\n"
    )

    async def scenario() -> tuple[Receiver, list[dict[str, Any]]]:
        async with receiving() as receiver:
            notifiers = {"hook": {"kind": "webhook", "url": receiver.url("/hook")}}
            text = render(port, notifiers, [("0s", ["hook"])], window)
            async with monitoring(tmp_path, text) as monitor:
                await wait_state(monitor, State.DOWN)
                await asyncio.sleep(0.5)  # ten ticks
                rows = [row.as_dict() for row in await monitor.incidents.recent()]
        return receiver, rows

    receiver, rows = asyncio.run(scenario())
    assert receiver.hits == Counter()
    assert len(rows) == 1 and rows[0]["maintenance"] == "upgrade" and rows[0]["steps_fired"] == []
    assert len(read_events(tmp_path / "monitor.log", "IncidentInMaintenance")) == 1


def test_a_full_queue_is_not_counted_as_told_and_a_removed_check_is_resolved(
    tmp_path: Path,
) -> None:
    port = free_port()

    async def seed() -> None:
        store = Store(tmp_path / "monitor.sqlite")
        incidents = IncidentStore(store)
        gone = await incidents.open("gone", "smtp", Severity.CRITICAL, State.DOWN, 1.0, "x")
        await incidents.fire_step(gone.incident.id, 0, ("hook",), 1.0)
        await store.close()

    async def scenario() -> tuple[Receiver, list[dict[str, Any]]]:
        await seed()
        async with receiving() as receiver:
            notifiers: dict[str, dict[str, Any]] = {
                "hook": {"kind": "webhook", "url": receiver.url("/hook")},
                "stuck": {"kind": "webhook", "url": receiver.url("/hang"), "timeout": "5s"},
            }
            text = render(port, notifiers, [("0s", ["hook", "stuck"])], queue=1)
            peer = await recover(port)  # mx is up until the queue is full
            async with monitoring(tmp_path, text) as monitor:
                # One notification in flight on the hanging receiver, one waiting: full.
                note = Notification("trigger", 99, "mx", "smtp", "critical", "down", "", 0, 0)
                assert monitor.dispatcher.submit("stuck", note)
                await until(lambda: receiver.hits["/hang"] == 1, 5, "not in flight")
                assert monitor.dispatcher.submit("stuck", note)
                await wait_state(monitor, State.UP)
                await asyncio.to_thread(peer.__exit__, None, None, None)
                await wait_state(monitor, State.DOWN)
                await until(lambda: len(receiver.bodies["/hook"]) == 2, 5, "not told")
                rows = [row.as_dict() for row in await monitor.incidents.recent()]
        return receiver, rows

    receiver, rows = asyncio.run(scenario())
    # The incident of a check no longer configured is resolved, and its notifier told.
    events = {(b["check"], b["event"]) for b in receiver.bodies["/hook"]}
    assert events == {("gone", "resolve"), ("mx", "trigger")}, events
    by_check = {row["check"]: row for row in rows}
    assert by_check["gone"]["resolved"] is not None
    # mx's step was spent, but only the notifier that took it counts as told.
    assert by_check["mx"]["steps_fired"] == [1] and by_check["mx"]["notified"] == ["hook"]


async def scrape(monitor: Monitor) -> dict[str, float]:
    """The monitor's /metrics through its real route, as samples by name and labels."""
    config_checks = monitor.engine.checks
    app = build_app(monitor.store, monitor.metrics, config_checks, "127.0.0.1:1")
    async with TestClient(TestServer(app)) as client:
        response = await client.get("/metrics", headers={"Host": "127.0.0.1"})
        text = await response.text()
    return {
        f"{sample.name}{json.dumps(sample.labels, sort_keys=True)}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_the_alerting_shows_on_metrics(tmp_path: Path) -> None:
    """Notifications sent, failed and dropped per notifier, and the open incidents by severity
    (read from the store at each scrape: the resolve shows at the next one)."""
    port = free_port()

    def n(notifier: str, result: str) -> str:
        return "hamta_monitor_notifications_total" + json.dumps(
            {"notifier": notifier, "result": result}, sort_keys=True
        )

    def sev(severity: str) -> str:
        return f'hamta_monitor_incidents_open{{"severity": "{severity}"}}'

    async def scenario() -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        async with receiving() as receiver:
            notifiers = {
                "flaky": {"kind": "webhook", "url": receiver.url("/flaky")},
                "dead": {"kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/"},
                "stuck": {"kind": "webhook", "url": receiver.url("/hang"), "timeout": "5s"},
            }
            text = render(port, notifiers, [("0s", ["flaky", "dead"])], queue=1)
            async with monitoring(tmp_path, text) as monitor:
                before = await scrape(monitor)
                await wait_state(monitor, State.DOWN)
                counts = monitor.dispatcher.counts
                await until(lambda: counts["flaky"].sent and counts["dead"].failed, 5, "no end")
                note = Notification("trigger", 99, "mx", "smtp", "critical", "down", "", 0, 0)
                assert monitor.dispatcher.submit("stuck", note)
                await until(lambda: receiver.hits["/hang"] == 1, 5, "not in flight")
                assert monitor.dispatcher.submit("stuck", note)
                assert not monitor.dispatcher.submit("stuck", note)  # the queue of 1 is full
                down = await scrape(monitor)
                peer = await recover(port)
                try:
                    await wait_state(monitor, State.UP)
                    await until(lambda: counts["flaky"].sent == 2, 5, "no resolve")
                    up = await scrape(monitor)
                finally:
                    await asyncio.to_thread(peer.__exit__, None, None, None)
        return before, down, up

    before, down, up = asyncio.run(scenario())
    # Every configured notifier and result is there from the start, at 0 (rate() needs it).
    assert all(before[n(name, r)] == 0 for name in ("flaky", "dead", "stuck") for r in RESULTS)
    assert before[sev("critical")] == before[sev("warning")] == 0
    assert down[n("flaky", "sent")] == 1 and down[n("flaky", "failed")] == 0
    assert down["hamta_monitor_notification_retries_total" + '{"notifier": "flaky"}'] == 2
    assert down[n("dead", "failed")] == 1 and down[n("dead", "sent")] == 0
    assert down["hamta_monitor_notification_retries_total" + '{"notifier": "dead"}'] == 2
    assert down[n("stuck", "dropped")] == 1
    assert down[sev("critical")] == 1 and down[sev("warning")] == 0
    assert up[sev("critical")] == 0 and up[n("flaky", "sent")] == 2


def test_an_incident_opened_during_a_tick_is_escalated_once(tmp_path: Path) -> None:
    """A new incident's own first escalation and the tick's pass run side by side: each step
    is sent once, whichever reads the incident first (without ``Alerting``'s lock both read it
    before either recorded its step, and the notifiers were told twice)."""
    names = [f"mx{i}" for i in range(12)]
    checks = "".join(
        f'[[checks]]\nname = "{name}"\nkind = "smtp"\nhost = "127.0.0.1"\nport = 9\n'
        for name in names
    )

    async def scenario() -> Receiver:
        async with receiving() as receiver:
            text = (
                f'[alerting]\ntick = "1h"\n{checks}'
                f'[notifiers.hook]\nkind = "webhook"\nurl = "{receiver.url("/hook")}"\n'
                '[[escalation]]\nafter = "0s"\nnotifiers = ["hook"]\n'
            )
            config = parse_monitor_config(text)
            eventlog.configure("info", tmp_path / "monitor.log")
            log = eventlog.get_logger(component="monitor")
            store = Store(tmp_path / "monitor.sqlite")
            async with aiohttp.ClientSession() as session:
                alerting, dispatcher = assemble(config, store, session, log, SystemClock(), "t")
                sending = asyncio.create_task(dispatcher.run())
                try:
                    now = time.time()
                    opened = [
                        alerting.on_change(
                            check, StateChange(check.name, State.UP, State.DOWN, now, "refused")
                        )
                        for check in config.checks
                    ]
                    done = asyncio.Event()

                    async def ticking() -> None:  # the tick, without its pause: always passing
                        while not done.is_set():
                            await alerting.escalate_all()

                    ticker = asyncio.create_task(ticking())
                    await asyncio.gather(*opened)
                    done.set()
                    await ticker
                    await dispatcher.drain(5)
                finally:
                    sending.cancel()
                    await asyncio.gather(sending, return_exceptions=True)
                    await store.close()
        return receiver

    receiver = asyncio.run(scenario())
    told = Counter(body["check"] for body in receiver.bodies["/hook"])
    assert told == Counter(dict.fromkeys(names, 1)), told
