"""The round-trip check against a real ``hamta serve`` relay delivering to a recording sink.

The sink writes each message it accepts into a Maildir, as a probe mailbox's MTA would; the
check follows the probe in the relay's event log and in that Maildir. Each way it can stop is
made real: the relay refuses the recipient, the sink answers 451 (deferred), the sink is a
tarpit (queued: no attempt ends), the mailbox is not where the message goes (never arrived).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hamta.config import ConfigError
from monitor.checks import run_check
from monitor.checks.round_trip import PROBE_HEADER, Trail
from monitor.config import parse_monitor_config
from monitor.engine import thresholds
from monitor.metrics import MonitorMetrics
from monitor.observation import CheckContext, Observation, SystemClock
from monitor.verdicts import CheckState, Outcome, State, next_state
from tests.support.monitor_peers import Tarpit, render_checks
from tests.support.relay import RelayProcess
from tests.support.sink import Delivered, RecordingSink


class MaildirSink(RecordingSink):
    """A recording sink that also writes each message into ``maildir/new``, one file each."""

    def __init__(self, maildir: Path) -> None:
        super().__init__(slow_seconds=1.0)  # for slow* recipients only
        self.maildir = maildir
        for sub in ("new", "cur", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)

    def _record(self, message: Delivered) -> None:
        # Written in tmp/ and renamed into new/, as Maildir delivery does: never half a file.
        name = f"{len(list((self.maildir / 'tmp').iterdir()))}.{id(message)}.sink"
        (self.maildir / "tmp" / name).write_bytes(message.data)
        (self.maildir / "tmp" / name).rename(self.maildir / "new" / name)
        super()._record(message)


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A relay routing probe.test to a Maildir sink and tarpit.test to a tarpit."""
    base = tmp_path_factory.mktemp("round_trip")
    with MaildirSink(base / "Maildir") as sink, Tarpit(30.0) as tarpit:
        routes = {
            "probe.test": f"[{sink.host}]:{sink.port}",
            "tarpit.test": f"[127.0.0.1]:{tarpit.port}",
        }
        relay = RelayProcess(base / "relay", {"delivery": {"routes": routes}})
        relay.start()
        try:
            yield {"relay": relay, "sink": sink, "maildir": base / "Maildir", "base": base}
        finally:
            relay.stop()


ROUND_TRIP = {"name": "rt", "kind": "round_trip", "host": "h", "sender": "a@b.c"} | {
    "recipient": "p@q.r",
    "relay_log": "x",
}


def observe(relay: RelayProcess, **check: Any) -> Observation:
    definition = {
        "name": "rt",
        "kind": "round_trip",
        "host": "127.0.0.1",
        "port": relay.port,
        "sender": "monitor@monitor.test",
        "recipient": "probe@probe.test",
        "interval": 10,
        "timeout": 8,
        "poll": 0.05,
        **check,
    }
    config = parse_monitor_config(render_checks([definition]))
    clock = SystemClock()
    return asyncio.run(run_check(config.checks[0], CheckContext(clock.time()), clock))


def test_success_is_timed_and_the_probe_removed(path: dict[str, Any]) -> None:
    maildir: Path = path["maildir"]
    # Someone else's mail and a late probe of an earlier run of this check.
    (maildir / "cur" / "theirs").write_bytes(b"Subject: hello\r\n\r\nbody\r\n")
    (maildir / "new" / "late").write_bytes(f"{PROBE_HEADER}: rt 0123\r\n\r\nx\r\n".encode())
    seen = observe(path["relay"], relay_log=str(path["relay"].log_path), mailbox=str(maildir))
    assert seen.outcome is Outcome.SUCCESS, seen.detail
    facts = seen.facts
    assert facts["stage"] == "arrived"
    assert isinstance(facts["accepted_seconds"], float)
    assert isinstance(facts["delivered_seconds"], float)
    assert isinstance(facts["arrived_seconds"], float)
    assert 0 < facts["accepted_seconds"] <= facts["delivered_seconds"] <= facts["arrived_seconds"]
    assert facts["arrived_seconds"] <= seen.seconds < 5
    assert f"as {facts['queue_id']}" in seen.detail and "arrived" in seen.detail
    # Each step's time is a metric.
    metrics = MonitorMetrics(parse_monitor_config(render_checks([ROUND_TRIP])).checks)
    metrics.observe(
        parse_monitor_config(render_checks([ROUND_TRIP])).checks[0], seen, CheckState(State.UP)
    )
    text = metrics.exposition().decode()
    line = 'hamta_monitor_round_trip_seconds{check="rt",kind="round_trip",step="arrived"}'
    assert f"{line} {facts['arrived_seconds']}" in text
    # The sink got it, with the token; the mailbox holds no probe any more, theirs is kept.
    probe = path["sink"].messages[-1].data
    assert f"{PROBE_HEADER}: rt ".encode() in probe
    assert sorted(p.name for p in maildir.rglob("*") if p.is_file()) == ["theirs"]


def test_followed_in_the_log_alone(path: dict[str, Any]) -> None:
    # Looked at once a second: the time is the log line's, not when the line was read.
    seen = observe(path["relay"], relay_log=str(path["relay"].log_path), poll=1.0)
    assert seen.outcome is Outcome.SUCCESS, seen.detail
    assert seen.facts["stage"] == "delivered"
    assert isinstance(seen.facts["delivered_seconds"], float)
    # Found at the first look (already delivered) or at the second, a second later: either
    # way the time is the line's.
    assert seen.facts["delivered_seconds"] < 0.9 and seen.facts["delivered_seconds"] <= seen.seconds
    assert f"delivered {seen.facts['delivered_seconds']:.2f}s to" in seen.detail
    for leftover in path["maildir"].glob("new/*"):  # delivered, not looked for: tidy up
        leftover.unlink()


def test_a_slow_round_trip_is_degraded(path: dict[str, Any]) -> None:
    # The sink holds RCPT of slow* for 1 s: through, but slower than degraded_after.
    seen = observe(
        path["relay"],
        mailbox=str(path["maildir"]),
        recipient="slow@probe.test",
        degraded_after=0.5,
    )
    assert seen.outcome is Outcome.SUCCESS, seen.detail
    assert seen.seconds > 1.0 and seen.facts["stage"] == "arrived"
    check = parse_monitor_config(
        render_checks(
            [
                {"name": "rt", "kind": "round_trip", "host": "h", "sender": "a@b.c"}
                | {"recipient": "p@q.r", "mailbox": str(path["maildir"])}
                | {"degraded_after": 0.5}
            ]
        )
    ).checks[0]
    after, _ = next_state(
        "rt", CheckState(State.UP), seen.outcome, seen.seconds, 0, "", thresholds(check)
    )
    assert after.state is State.DEGRADED


def test_refused_names_the_reply(tmp_path: Path) -> None:
    # A relay that relays for nobody here: RCPT to another domain is refused.
    relay = RelayProcess(tmp_path / "closed", {"smtp": {"relay_networks": ["10.99.0.0/16"]}})
    relay.start()
    try:
        seen = observe(relay, relay_log=str(relay.log_path))
    finally:
        relay.stop()
    assert seen.outcome is Outcome.FAILURE
    assert seen.detail == "refused: RCPT TO 554 5.7.1 Relay access denied", seen.detail
    assert seen.facts["stage"] == "refused"


def test_deferred_names_the_reason(path: dict[str, Any]) -> None:
    seen = observe(
        path["relay"],
        relay_log=str(path["relay"].log_path),
        recipient="defer@probe.test",
        timeout=3,
    )
    assert seen.outcome is Outcome.FAILURE
    assert seen.facts["stage"] == "deferred"
    assert seen.detail.startswith("deferred: 451 4.3.0 Try again later (attempt "), seen.detail


def test_bounced_names_the_reply(path: dict[str, Any]) -> None:
    seen = observe(
        path["relay"], relay_log=str(path["relay"].log_path), recipient="reject@probe.test"
    )
    assert seen.outcome is Outcome.FAILURE
    assert seen.facts["stage"] == "bounced"
    assert seen.detail.startswith("bounced: 550 5.1.1 No such user (accepted "), seen.detail
    assert seen.seconds < 5  # at once: a bounce is final


def test_never_arrived_when_delivered_elsewhere(path: dict[str, Any], tmp_path: Path) -> None:
    # The relay delivers (its log says 250), but not into the mailbox the check watches.
    elsewhere = tmp_path / "other-mailbox"
    elsewhere.mkdir()
    seen = observe(
        path["relay"], relay_log=str(path["relay"].log_path), mailbox=str(elsewhere), timeout=2
    )
    assert seen.outcome is Outcome.FAILURE
    assert seen.facts["stage"] == "never_arrived"
    assert seen.detail.startswith("never arrived: delivered "), seen.detail
    assert "250" in seen.detail and "but not in the mailbox after" in seen.detail
    for leftover in path["maildir"].glob("new/*"):
        leftover.unlink()


def test_queued_when_no_attempt_ends(path: dict[str, Any]) -> None:
    seen = observe(
        path["relay"],
        relay_log=str(path["relay"].log_path),
        recipient="probe@tarpit.test",
        timeout=2,
    )
    assert seen.outcome is Outcome.FAILURE
    assert seen.facts["stage"] == "queued"
    assert seen.detail.startswith(f"queued: accepted as {seen.facts['queue_id']}, no delivery")
    # Within the check's timeout, not cut off by it: the detail says where it stopped.
    assert seen.seconds < 2


def test_timeout_with_the_mailbox_alone(path: dict[str, Any]) -> None:
    seen = observe(
        path["relay"], mailbox=str(path["maildir"]), recipient="probe@tarpit.test", timeout=2
    )
    assert seen.outcome is Outcome.FAILURE
    assert seen.detail.startswith("never arrived: accepted as "), seen.detail
    assert "not in the mailbox after 1.8s" in seen.detail


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({}, "check 'rt': give relay_log, mailbox or both"),
        ({"mailbox": "/nonexistent/box"}, "check 'rt': mailbox: no such directory"),
        ({"relay_log": "x", "recipient": "nobody"}, "check 'rt': recipient: not a mail address"),
        ({"relay_log": "x", "login": {"username": "u", "password_file": __file__}}, "starttls"),
    ],
)
def test_bad_definitions_name_the_check_and_key(keys: dict[str, Any], message: str) -> None:
    check = {"name": "rt", "kind": "round_trip", "host": "h", "sender": "a@b.c"}
    check.setdefault("recipient", "p@probe.test")
    with pytest.raises(ConfigError, match=message):
        parse_monitor_config(render_checks([{**check, **keys}]))


def test_followed_by_message_id_when_the_250_names_no_queue_id() -> None:
    # Another relay's 250 may name no queue id: its lines are matched by the probe's Message-ID,
    # and a line's time ("ts") is kept within what was seen (after the 250, by the read).
    trail = Trail(None, "<t.probe@m.test>", "p@probe.test", 0.1)
    ours = {"event": "Delivery", "message_id": "<t.probe@m.test>", "recipient": "p@probe.test"}
    other = {**ours, "message_id": "<other@m.test>", "response": "not ours"}
    trail.note([other, {**ours, "ts": "2026-01-01T00:00:00.300000Z"}], 0.5, 1767225600.0)
    seen = trail.last("Delivery")
    assert seen is not None and seen[1]["message_id"] == "<t.probe@m.test>"
    assert seen[0] == pytest.approx(0.3)
    trail.note([{**ours, "ts": "2026-01-01T00:00:09Z"}], 0.6, 1767225600.0)
    assert trail.last("Delivery") == (0.6, {**ours, "ts": "2026-01-01T00:00:09Z"})
