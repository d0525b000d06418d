"""The relay's life: warm standby, activation, recovery after restart, graceful stop, CLI."""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import time
from pathlib import Path

from hamta import eventlog
from hamta.return_paths import SECRET_FILE
from tests.conftest import MX_HOST, RelayFactory
from tests.support import RecordingSink


def send_many(port: int, count: int, domain: str = "sink.test") -> list[str]:
    """Send ``count`` messages on one connection; return their queue ids."""
    qids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        for n in range(count):
            client.ehlo_or_helo_if_needed()
            client.mail("a@origin.test")
            client.rcpt(f"user{n}@{domain}")
            code, reply = client.data(f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode())
            assert code == 250, reply
            qids.append(reply.decode().rsplit(" ", 1)[-1])
    return qids


def port_is_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_warm_standby_activates_over_its_socket_and_goes_back(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay(standby=True)
    assert relay.get("/health/live")[0] == 200
    assert relay.get("/health/ready")[0] == 503
    assert not port_is_open(relay.port)

    result = relay.cli(
        "relay", "activate", "--spool", str(relay.spool), "--socket", str(relay.control)
    )
    assert result.returncode == 0, result.stderr
    activation = json.loads(result.stdout)
    assert activation["spool"] == str(relay.spool)
    assert activation["recovered_messages"] == 0
    assert activation["total_seconds"] < 5
    assert relay.get("/health/ready")[0] == 200
    send_many(relay.port, 3)
    assert sink.wait_for(3, timeout=10)

    result = relay.cli("relay", "deactivate", "--socket", str(relay.control))
    assert result.returncode == 0, result.stderr
    assert relay.get("/health/ready")[0] == 503
    assert not port_is_open(relay.port)
    # Activating a relay that is already active is refused with a clear word.
    relay.cli("relay", "activate", "--socket", str(relay.control))
    again = relay.cli("relay", "activate", "--socket", str(relay.control))
    assert again.returncode == 1
    assert "not standby" in again.stderr
    assert relay.terminate() == 0


def test_sigusr1_activates_a_standby_relay(make_relay: RelayFactory) -> None:
    relay = make_relay(standby=True)
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGUSR1)
    relay.wait_ready(10)
    assert port_is_open(relay.port)


def test_activation_on_a_locked_spool_fails_clearly(make_relay: RelayFactory) -> None:
    first = make_relay()
    second = make_relay(standby=True)
    result = second.cli(
        "relay", "activate", "--spool", str(first.spool), "--socket", str(second.control)
    )
    assert result.returncode == 1
    assert "in use by pid" in result.stderr
    assert second.get("/health/ready")[0] == 503
    assert second.get("/health/live")[0] == 200  # still warm, ready to try again


def open_files_under(pid: int, directory: Path) -> list[str]:
    """The files below ``directory`` that process ``pid`` holds open."""
    held = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink()
        except FileNotFoundError:  # closed while listed
            continue
        if target.is_relative_to(directory):
            held.append(str(target))
    return held


def test_an_activation_refused_after_the_spool_opened_leaves_it_closed(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    # The bounce secret is read after the spool is open: a bad one fails the activation there.
    relay = make_relay(
        {"suppression": {"bounces_address": "bounces@relay.hamta.test"}}, standby=True
    )
    relay.spool.mkdir(parents=True, exist_ok=True)
    secret = relay.spool / SECRET_FILE
    secret.write_bytes(b"short")
    activate = ("relay", "activate", "--spool", str(relay.spool), "--socket", str(relay.control))

    refused = relay.cli(*activate)
    assert refused.returncode == 1
    assert "cannot read or create the bounce secret" in refused.stderr
    assert open_files_under(relay.pid, relay.spool) == []  # the lock, journal and segments
    assert relay.get("/health/ready")[0] == 503

    secret.unlink()  # the operator removes the cause; the agent activates again
    result = relay.cli(*activate)
    assert result.returncode == 0, result.stderr
    send_many(relay.port, 2)
    assert sink.wait_for(2, timeout=10)


def test_queue_survives_restart_and_is_delivered_once(
    make_relay: RelayFactory, mx_port: int
) -> None:
    # No MX is up: everything stays queued across a graceful restart.
    relay = make_relay({"retry": {"first_delay": "200ms", "max_delay": "500ms", "jitter": 0.0}})
    qids = send_many(relay.port, 50)
    assert relay.queue()["depth"] == 50
    assert relay.terminate() == 0
    offline = relay.cli("queue", "--config", str(relay.config_path))
    assert offline.returncode == 0, offline.stderr
    assert "state: offline   messages queued: 50" in offline.stdout
    assert "sink.test" in offline.stdout

    relay.start()
    recovered = relay.wait_events("QueueRecovered", 2)[-1]
    assert recovered["messages"] == 50
    with RecordingSink(host=MX_HOST, port=mx_port) as late:
        assert late.wait_for(50, timeout=30)
        relay.wait_queue_empty()
        assert late.count == 50
    delivered = {e["queue_id"] for e in relay.events("Delivery")}
    assert delivered == set(qids)


def test_hamta_queue_summarises_a_running_relay_by_domain(make_relay: RelayFactory) -> None:
    relay = make_relay()
    send_many(relay.port, 4, domain="sink.test")
    send_many(relay.port, 2, domain="other.test")
    result = relay.cli("queue", "--config", str(relay.config_path), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["state"] == "active"
    assert summary["depth"] == 6
    # A session may hold one of them at any moment (no MX answers): it still counts, in flight.
    counts = {d: sum(row.values()) for d, row in summary["domains"].items()}
    assert counts == {"sink.test": 4, "other.test": 2}
    assert {tuple(row) for row in summary["domains"].values()} == {
        ("ready", "deferred", "in_flight")
    }


def test_hamta_queue_counts_a_recipient_being_delivered_in_flight(
    make_relay: RelayFactory, mx_port: int
) -> None:
    # The MX holds the delivery long enough for two CLI runs (a Python start each) to see it
    # in flight on a loaded machine: 3 s was outrun at a load average of 37.
    relay = make_relay({"delivery": {"connect_timeout": "3s", "command_timeout": "30s"}})
    with RecordingSink(host=MX_HOST, port=mx_port, slow_seconds=12.0) as sink:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:  # the MX answers late
            client.sendmail("a@origin.test", ["slow@sink.test"], b"Subject: slow\r\n\r\nx\r\n")
        deadline = time.monotonic() + 10
        while relay.queue()["in_flight"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        result = relay.cli("queue", "--config", str(relay.config_path), "--json")
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        table = relay.cli("queue", "--config", str(relay.config_path)).stdout
        _, body = relay.get("/api/domain/sink.test")
        view = json.loads(body)
        assert sink.wait_for(1, timeout=40)
    assert summary["domains"]["sink.test"]["in_flight"] == 1
    assert sum(summary["domains"]["sink.test"].values()) == summary["depth"]
    assert "in_flight" in table.splitlines()[1]
    assert view["queued_in_flight"] == 1
    assert view["queued"] == view["queued_ready"] + view["queued_deferred"] + 1


def test_sigterm_drains_with_421_and_exits_zero(make_relay: RelayFactory, mx_port: int) -> None:
    # A slow MX keeps deliveries in flight while the relay is asked to stop.
    with RecordingSink(host=MX_HOST, port=mx_port, slow_seconds=1.5) as slow:
        relay = make_relay({"node": {"stop_timeout": "5s"}})
        send_many(relay.port, 2, domain="sink.test")
        relay.wait_events("Reception", 2)
        assert slow.wait_for_connections(1, timeout=10)
        session = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
        session.ehlo()
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_events("RelayDeactivating")
        # A session opened before the stop is told to come back later.
        code, text = session.mail("a@origin.test")
        assert (code, text[:5]) == (421, b"4.3.2")
        # A new session during the drain is greeted with 421, not a reset.
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as raw:
            assert raw.recv(200).startswith(b"421 4.3.2")
        assert relay.proc.wait(timeout=20) == 0
    assert relay.events("RelayExited")


def test_relay_status_over_the_socket(make_relay: RelayFactory) -> None:
    relay = make_relay()
    result = relay.cli("relay", "status", "--socket", str(relay.control))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "active"


def test_relay_command_without_a_relay_says_so(make_relay: RelayFactory) -> None:
    relay = make_relay(start=False)
    result = relay.cli("relay", "status", "--socket", str(relay.control))
    assert result.returncode == 1
    assert "no relay control socket" in result.stderr


def test_a_line_cut_by_kill_9_does_not_damage_the_next_process_s_first_line(
    tmp_path: Path,
) -> None:
    log = tmp_path / "events.log"
    log.write_bytes(b'{"event":"Delivery","queue_id":"A1"}\n{"event":"Deliv')  # cut short
    eventlog.configure("info", log)
    eventlog.get_logger(node="n").info("RelayStarted")
    lines = log.read_bytes().splitlines()
    assert lines[1] == b'{"event":"Deliv'
    assert json.loads(lines[2])["event"] == "RelayStarted"
