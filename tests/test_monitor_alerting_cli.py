"""The alerting sections through the command line: each bad one is exit 2 and one line naming
its key; ``hamta monitor incidents`` and ``hamta monitor ack`` on a real store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hamtactl import main
from monitor.incident_store import IncidentStore
from monitor.incidents import Severity
from monitor.store import Store
from monitor.verdicts import State

ROOT = Path(__file__).resolve().parent.parent
MX = '[[checks]]\nname = "mx"\nkind = "smtp"\nhost = "mx.example.org"\n'
HOOK = '[notifiers.hook]\nkind = "webhook"\nurl = "http://127.0.0.1:9/hook"\n'
MAIL = (
    '[notifiers.mail]\nkind = "email"\nsender = "m@example.org"\nrecipients = ["o@example.org"]\n'
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            HOOK + '[[escalation]]\nafter = "5m"\nnotifiers = ["pagerduty"]\n',
            "escalation: step 1: unknown notifier 'pagerduty' (configured: hook)",
        ),
        (
            '[[maintenance]]\nname = "w"\ndays = ["sun"]\ntime = 01:00:00\nduration = "2h"\n'
            'timezone = "Europe/Stokholm"\n',
            "maintenance #1: timezone: unknown time zone 'Europe/Stokholm'",
        ),
        (
            '[[maintenance]]\nname = "w"\nstart = 2026-12-07T10:00:00Z\n'
            "end = 2026-12-07T09:00:00Z\n",
            "maintenance #1: ends (2026-12-07 09:00:00+00:00) before it starts",
        ),
        (
            '[[maintenance]]\nname = "w"\ndays = ["someday"]\ntime = 01:00:00\nduration = "1h"\n',
            "maintenance #1: days: not a weekday: 'someday'",
        ),
        (
            MX + '[[maintenance]]\nname = "w"\nchecks = ["nx"]\nstart = 2026-12-07T10:00:00Z\n'
            "end = 2026-12-07T11:00:00Z\n",
            "maintenance: window 'w': unknown check 'nx'",
        ),
        (
            MX + MAIL + 'smarthost = "MX.example.org:587"\n',
            "notifiers: mail: smarthost 'MX.example.org:587' is monitored by check 'mx'",
        ),
        ('[notifiers.x]\nkind = "sms"\n', "notifiers 'x': unknown kind 'sms' (one of webhook,"),
        (
            '[notifiers.s]\nkind = "slack"\nurl = "hooks.slack.com/x"\n',
            "notifiers 's': url: not an http(s) URL: 'hooks.slack.com/x'",
        ),
        (
            '[notifiers.pd]\nkind = "pagerduty"\nrouting_key_file = "/nonexistent/key"\n',
            "notifiers 'pd': routing_key_file: /nonexistent/key: No such file or directory",
        ),
        ("[alerting]\nqueue = 0\n", "alerting.queue: Input should be greater than 0"),
    ],
)
def test_bad_alerting_configuration_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "monitor.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["monitor", "status", "--config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"monitor: {path}: "), err
    assert expected in err, err


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hamtactl", "monitor", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_a_routing_key_others_may_read_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("secret\n")
    key.chmod(0o644)
    path = tmp_path / "monitor.toml"
    path.write_text(f'[notifiers.pd]\nkind = "pagerduty"\nrouting_key_file = "{key}"\n')
    done = run("status", "--config", str(path))
    assert done.returncode == 2, done
    assert done.stderr.strip() == (
        f"monitor: {path}: notifiers 'pd': routing_key_file: {key} is mode 0644;"
        " a routing key must be 0600"
    )


def test_incidents_and_ack_through_the_store(tmp_path: Path) -> None:
    db = tmp_path / "monitor.sqlite"
    path = tmp_path / "monitor.toml"
    path.write_text(f'[store]\npath = "{db}"\n' + MX)

    async def seed() -> None:
        store = Store(db)
        incidents = IncidentStore(store)
        await incidents.open("mx", "smtp", Severity.CRITICAL, State.DOWN, 1000.0, "refused")
        resolved = await incidents.open(
            "mx", "smtp", Severity.WARNING, State.DEGRADED, 500.0, "slow"
        )
        await incidents.resolve(resolved.incident.id, 600.0, "fast again")
        await store.close()

    asyncio.run(seed())
    listed = run("incidents", "--json", "--config", str(path))
    assert listed.returncode == 0, listed
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["state"], r["resolved"]) for r in rows] == [
        (1, "down", None),
        (2, "degraded", 600.0),
    ]
    done = run("ack", "1", "--by", "alice", "--config", str(path))
    assert done.returncode == 0 and "acknowledged by alice" in done.stdout, done
    again = run("ack", "1", "--by", "bob", "--config", str(path))
    assert again.returncode == 0 and "acknowledged by alice" in again.stdout, again
    for ident, reason in (("2", "incident 2 is resolved already"), ("7", "no incident 7")):
        refused = run("ack", ident, "--config", str(path))
        assert refused.returncode == 1 and refused.stderr.strip() == f"monitor: {reason}"
    table = run("incidents", "--config", str(path))
    assert table.returncode == 0
    first = table.stdout.splitlines()[1].split()
    assert first[:4] == ["1", "mx", "critical", "down"] and "alice" in first, table.stdout
