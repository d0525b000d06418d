"""The monitor's command line: bad configuration files, ``check``, ``run`` with its API,
metrics and log, ``status``; and the relay check against a real ``hamta serve``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hamtactl import main
from monitor.checks import run_check
from monitor.config import parse_monitor_config
from monitor.observation import CheckContext, SystemClock
from monitor.verdicts import Outcome
from tests.support.monitor_peers import SmtpPeer, TestCa, render_checks, server_context
from tests.support.ports import free_port
from tests.support.relay import RelayProcess, read_events

ROOT = Path(__file__).resolve().parent.parent
MX = '[[checks]]\nname = "mx"\nkind = "smtp"\nhost = "127.0.0.1"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MX + "port = 70000\n", "check 'mx': port: Input should be less than 65536"),
        (MX + "intervall = '1m'\n", "check 'mx': intervall: unknown key"),
        (MX + "interval = 'soon'\n", "check 'mx': interval: not a duration: 'soon'"),
        (MX + "interval = '10s'\n", "check 'mx': timeout (30s) is longer than interval (10s)"),
        (MX + "failure_threshold = 0\n", "check 'mx': failure_threshold: Input should be greater"),
        ('[[checks]]\nname = "mx"\nkind = "smtp"\n', "check 'mx': host: Field required"),
        ('[[checks]]\nname = "x"\nkind = "ping"\n', "check 'x': unknown kind 'ping'"),
        ('[[checks]]\nname = "x"\nhost = "a"\n', "check 'x': no kind"),
        ('[[checks]]\nkind = "smtp"\nhost = "a"\n', "check #1: name: Field required"),
        (
            '[[checks]]\nname = "d"\nkind = "dns"\ndomain = "not a domain"\n',
            "check 'd': domain: not a domain name: 'not a domain'",
        ),
        (
            '[[checks]]\nname = "t"\nkind = "tls"\nendpoint = "https://mx:443"\n',
            "check 't': endpoint: use starttls://host:port or tls://host:port",
        ),
        (
            '[[checks]]\nname = "r"\nkind = "relay"\nurl = "ftp://x"\n',
            "check 'r': url: not an http(s) URL",
        ),
        (MX + MX, "checks: check name 'mx' is given twice"),
        (
            'relay_config = "/nonexistent/hamta.toml"\n',
            "relay_config: /nonexistent/hamta.toml: cannot read",
        ),
        ("[server]\nlisten = 'nowhere'\n", "server.listen: no port in 'nowhere'"),
        ("checks = [\n", "not valid TOML"),
    ],
)
def test_bad_configuration_is_one_clear_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    path = tmp_path / "monitor.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["monitor", "check", "mx", "--config", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"monitor: {path}: "), err
    assert expected in err, err


def test_python_m_monitor_reports_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "monitor.toml"
    path.write_text(MX + "port = 0\n")
    done = subprocess.run(
        [sys.executable, "-m", "hamtactl", "monitor", "status", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2, done
    assert (
        done.stderr.strip() == f"monitor: {path}: check 'mx': port: Input should be greater than 0"
    )


def test_check_now_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with SmtpPeer() as peer:
        path = tmp_path / "monitor.toml"
        checks: list[dict[str, Any]] = [
            {"name": "up", "kind": "smtp", "host": "127.0.0.1", "port": peer.port},
            {"name": "closed", "kind": "smtp", "host": "127.0.0.1", "port": free_port()},
        ]
        path.write_text(render_checks(checks))
        assert main(["monitor", "check", "up", "--config", str(path)]) == 0
        assert capsys.readouterr().out.startswith("up: up (")
        assert main(["monitor", "check", "closed", "--config", str(path)]) == 1
        assert "closed: down (" in capsys.readouterr().out
        assert main(["monitor", "check", "nope", "--config", str(path)]) == 2
        assert "no check named 'nope' (configured: up, closed)" in capsys.readouterr().err


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    with RelayProcess(tmp_path / "relay") as process:
        yield process


def relay_check(url: str, **extra: Any) -> tuple[Outcome, str]:
    config = parse_monitor_config(
        render_checks([{"name": "r", "kind": "relay", "url": url, "timeout": "3s", **extra}])
    )
    clock = SystemClock()
    seen = asyncio.run(run_check(config.checks[0], CheckContext(clock.time()), clock))
    return seen.outcome, seen.detail


def test_relay_check_against_hamta_serve(tmp_path: Path) -> None:
    process = RelayProcess(tmp_path / "relay")
    process.start()
    try:
        assert relay_check(process.admin_url) == (Outcome.SUCCESS, "active, queue 0, deferred 0")
    finally:
        process.stop()
    outcome, detail = relay_check(process.admin_url)
    assert outcome is Outcome.FAILURE and "/health/ready" in detail
    standby = RelayProcess(tmp_path / "standby", standby=True)
    standby.start()
    try:
        # A warm standby is never ready by design: "standby", not down (no incident).
        assert relay_check(standby.admin_url) == (Outcome.STANDBY, "warm standby (503)")
    finally:
        standby.stop()


def test_relay_check_warns_when_deferrals_pile_up(tmp_path: Path) -> None:
    dead = f"[127.0.0.1]:{free_port()}"  # the only route leads nowhere: every attempt defers
    overrides = {"delivery": {"routes": {"example.test": dead}}}
    with RelayProcess(tmp_path / "relay", overrides) as process:
        with smtplib.SMTP(process.host, process.port, timeout=10) as client:
            client.sendmail("a@sender.test", ["b@example.test"], b"Subject: t\r\n\r\nbody\r\n")
        deadline = time.monotonic() + 15
        while process.queue()["recipients_deferred"] == 0:
            assert time.monotonic() < deadline, process.queue()
            time.sleep(0.05)
        outcome, detail = relay_check(process.admin_url, max_deferred=0)
        assert relay_check(process.admin_url)[0] is Outcome.SUCCESS  # within the defaults
    assert outcome is Outcome.WARNING
    assert detail == "active, queue 1, deferred 1 (limits 10000 / 0)"


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


def test_run_serves_the_api_and_metrics_and_status_reads_them(
    tmp_path: Path, relay: RelayProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    ca = TestCa(tmp_path / "ca")
    certificate = ca.issue("mx", "mx.hamta.test", -1, 45)
    with SmtpPeer(starttls=server_context(*certificate)) as peer:
        tls = {"ca_file": str(ca.cert), "server_name": "mx.hamta.test"}
        checks: list[dict[str, Any]] = [
            {
                "name": "cert",
                "kind": "tls",
                "endpoint": f"starttls://127.0.0.1:{peer.port}",
                "interval": "1s",
                "timeout": "1s",
                **tls,
            },
            {
                "name": "mx",
                "kind": "smtp",
                "host": "127.0.0.1",
                "port": peer.port,
                "interval": "0.3s",
                "timeout": "0.3s",
            },
            {
                "name": "closed",
                "kind": "smtp",
                "host": "127.0.0.1",
                "port": free_port(),
                "interval": "0.2s",
                "timeout": "0.2s",
            },
            {
                "name": "relay",
                "kind": "relay",
                "url": relay.admin_url,
                "interval": "1s",
                "timeout": "1s",
            },
        ]
        path = tmp_path / "monitor.toml"
        path.write_text(
            render_checks(
                checks,
                server={"listen": listen},
                store={"path": str(tmp_path / "m.sqlite")},
                log={"file": str(tmp_path / "m.log")},
            )
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "hamtactl", "monitor", "run", "--config", str(path)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
        )
        try:
            wanted = {"mx": "up", "closed": "down", "relay": "up", "cert": "up"}
            states = wait_states(listen, wanted, process)
            metrics = get(f"http://{listen}/metrics").decode()
            assert main(["monitor", "status", "--config", str(path)]) == 0
            table = capsys.readouterr().out
            assert main(["monitor", "status", "--api", "--json", "--config", str(path)]) == 0
            from_api = json.loads(capsys.readouterr().out)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=15)
    assert code == 0, process.stderr.read() if process.stderr else ""
    assert states["relay"]["last"]["detail"] == "active, queue 0, deferred 0"
    assert states["closed"]["failures"] >= 3 and states["closed"]["since"] is not None
    assert 'hamta_monitor_check_up{check="mx",kind="smtp"} 1.0' in metrics
    assert 'hamta_monitor_check_up{check="closed",kind="smtp"} 0.0' in metrics
    assert 'hamta_monitor_check_state{check="closed",kind="smtp",state="down"} 1.0' in metrics
    assert 'hamta_monitor_check_latency_seconds{check="relay",kind="relay"}' in metrics
    expiry = re.search(
        r'hamta_monitor_certificate_expiry_days\{check="cert",kind="tls"\} (\S+)', metrics
    )
    assert expiry is not None and 44 < float(expiry.group(1)) <= 45, metrics
    lines = table.splitlines()
    assert lines[0].split() == ["CHECK", "KIND", "STATE", "SINCE", "LAST", "DETAIL"]
    assert lines[1].split()[:3] == ["cert", "tls", "up"]
    assert lines[3].split()[:3] == ["closed", "smtp", "down"]
    assert {row["name"]: row["state"] for row in from_api}["closed"] == "down"
    events = read_events(tmp_path / "m.log")
    names = [event["event"] for event in events]
    assert names[0] == "MonitorStarted" and names[-1] == "MonitorStopped"
    changed = {(e["check"], e["current"]) for e in events if e["event"] == "CheckStateChanged"}
    assert {("mx", "up"), ("closed", "down"), ("relay", "up")} <= changed


def wait_states(
    listen: str, wanted: dict[str, str], process: subprocess.Popen[bytes]
) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            rows = json.loads(get(f"http://{listen}/api/checks"))["checks"]
            states = {row["name"]: row for row in rows}
            if all(states[name]["state"] == state for name, state in wanted.items()):
                return states
        except OSError:
            rows = []
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)


def test_a_relay_config_with_a_bad_dkim_key_is_this_files_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    relay = tmp_path / "hamta.toml"
    missing = tmp_path / "gone.key"
    relay.write_text(
        f'[[dkim.keys]]\ndomain = "example.test"\nselector = "s1"\nkey = "{missing}"\n'
    )
    path = tmp_path / "monitor.toml"
    path.write_text(f'relay_config = "{relay}"\n')
    with pytest.raises(SystemExit):
        main(["monitor", "status", "--config", str(path)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"monitor: {path}: relay_config: {relay}: invalid configuration")
    assert f"cannot read DKIM key {missing}" in err


def test_run_stops_with_exit_1_when_its_store_cannot_be_opened(tmp_path: Path) -> None:
    store = tmp_path / "store-is-a-directory"
    store.mkdir()
    path = tmp_path / "monitor.toml"
    path.write_text(
        render_checks(
            [{"name": "mx", "kind": "smtp", "host": "127.0.0.1", "port": free_port()}],
            server={"listen": f"127.0.0.1:{free_port()}"},
            store={"path": str(store)},
            log={"file": str(tmp_path / "m.log")},
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "hamtactl", "monitor", "run", "--config", str(path)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1, done
    failed = read_events(tmp_path / "m.log", "MonitorFailed")
    assert len(failed) == 1 and "unable to open database file" in failed[0]["error"]
