"""Admission: connection limits, session and DATA time limits, back-pressure, on a real relay.

Each test starts a ``hamta serve`` process with small limits and talks to it over raw sockets
(:class:`~tests.support.smtpwire.SmtpWire`), so the replies are seen exactly as a client sees them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RelayFactory
from tests.support.relay import RelayProcess
from tests.support.smtpwire import SmtpWire, SmtpWireError

MESSAGE = b"From: a@client.test\r\nSubject: admission\r\n\r\nbody\r\n.\r\n"


def metric(relay: RelayProcess, name: str, **labels: str) -> float:
    """One sample of the relay's /metrics (0 when absent)."""
    status, body = relay.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def closed_after(wire: SmtpWire) -> bool:
    """True when the server has closed the connection (EOF on the next read)."""
    try:
        wire.read_reply()
    except (SmtpWireError, ConnectionError):
        return True
    return False


def test_connections_over_the_limit_get_421_and_are_closed(make_relay: RelayFactory) -> None:
    relay = make_relay({"smtp": {"max_connections": 3, "max_connections_per_client": 3}})
    held = [SmtpWire(relay.host, relay.port, timeout=5) for _ in range(3)]
    try:
        assert all(w.greeting.code == 220 for w in held)
        with SmtpWire(relay.host, relay.port, timeout=5) as extra:
            assert extra.greeting.text == "421 4.7.0 Too many connections, try again later"
            assert closed_after(extra)
        [event] = relay.wait_events("ConnectionRefused")
        assert event["reason"] == "max_connections" and event["limit"] == 3
        refused = "hamta_smtp_connections_refused_total"
        assert metric(relay, refused, reason="max_connections") == 1
        held.pop().close()  # a slot frees, and the next client is served
        wait_until(lambda: metric(relay, "hamta_smtp_sessions") == 2)
        with SmtpWire(relay.host, relay.port, timeout=5) as again:
            assert again.greeting.code == 220
            assert again.command("EHLO client.test").code == 250
    finally:
        for wire in held:
            wire.close()


def test_one_address_outside_the_relay_networks_is_limited(make_relay: RelayFactory) -> None:
    # 127.0.0.1 is outside the relay networks here, like any client on the Internet.
    relay = make_relay(
        {"smtp": {"relay_networks": ["127.0.0.9/32"], "max_connections_per_client": 2}}
    )
    held = [SmtpWire(relay.host, relay.port, timeout=5) for _ in range(2)]
    try:
        with SmtpWire(relay.host, relay.port, timeout=5) as extra:
            assert extra.greeting.text == (
                "421 4.7.0 Too many connections from your address, try again later"
            )
            assert closed_after(extra)
        # Another address still gets in, and so does a relay client beyond the per-client limit.
        with SmtpWire(relay.host, relay.port, timeout=5, source_address=("127.0.0.2", 0)) as other:
            assert other.greeting.code == 220
        trusted = [
            SmtpWire(relay.host, relay.port, timeout=5, source_address=("127.0.0.9", 0))
            for _ in range(3)
        ]
        assert all(w.greeting.code == 220 for w in trusted)
        for wire in trusted:
            wire.close()
        [event] = relay.wait_events("ConnectionRefused")
        assert event["reason"] == "max_connections_per_client"
        assert event["client"] == "127.0.0.1" and event["limit"] == 2
        refused = "hamta_smtp_connections_refused_total"
        assert metric(relay, refused, reason="max_connections_per_client") == 1
    finally:
        for wire in held:
            wire.close()


def test_a_flood_from_outside_leaves_room_for_relay_clients(make_relay: RelayFactory) -> None:
    # Many addresses outside the relay networks (127.0.0.1-8 here) may not take the last tenth.
    relay = make_relay(
        {
            "smtp": {
                "relay_networks": ["127.0.0.9/32"],
                "max_connections": 10,
                "max_connections_per_client": 2,
            }
        }
    )
    held = []
    try:
        for n in range(1, 6):
            for _ in range(2):
                held.append(
                    SmtpWire(relay.host, relay.port, timeout=5, source_address=(f"127.0.0.{n}", 0))
                )
        greetings = [w.greeting.code for w in held]
        assert greetings == [220] * 9 + [421], greetings
        relay_client = SmtpWire(relay.host, relay.port, timeout=5, source_address=("127.0.0.9", 0))
        held.append(relay_client)
        assert relay_client.greeting.code == 220
        assert relay_client.command("EHLO client.test").code == 250
        with SmtpWire(relay.host, relay.port, timeout=5, source_address=("127.0.0.9", 0)) as late:
            assert late.greeting.code == 421  # now all ten are taken
    finally:
        for wire in held:
            wire.close()


def test_a_session_kept_alive_with_noop_ends_at_max_session_time(
    make_relay: RelayFactory,
) -> None:
    relay = make_relay({"smtp": {"max_session_time": "1500ms", "session_timeout": "30s"}})
    with SmtpWire(relay.host, relay.port, timeout=5) as wire:
        assert wire.command("EHLO client.test").code == 250
        started = time.monotonic()
        replies = []
        while time.monotonic() - started < 5:
            reply = wire.command("NOOP")
            replies.append(reply.text)
            if reply.code != 250:
                break
            time.sleep(0.2)
        assert replies[-1] == "421 4.4.2 Session time limit exceeded, closing connection"
        assert 1.3 < time.monotonic() - started < 3
        assert closed_after(wire)
    [event] = relay.wait_events("SessionCut")
    assert event["reason"] == "session_time"
    assert metric(relay, "hamta_smtp_sessions_cut_total", reason="session_time") == 1


def test_an_idle_session_is_told_why_it_is_closed(make_relay: RelayFactory) -> None:
    relay = make_relay({"smtp": {"session_timeout": "1s"}})
    with SmtpWire(relay.host, relay.port, timeout=5) as wire:
        assert wire.command("EHLO client.test").code == 250
        reply = wire.read_reply()  # nothing sent: the idle timeout speaks
        assert reply.text == "421 4.4.2 Idle timeout exceeded, closing connection"
    assert relay.wait_events("SessionCut")[0]["reason"] == "idle"


def test_slow_data_is_cut_and_nothing_is_queued(make_relay: RelayFactory) -> None:
    relay = make_relay({"smtp": {"min_data_rate": 1000, "data_rate_grace": "500ms"}})
    with SmtpWire(relay.host, relay.port, timeout=5) as wire:
        assert wire.command("EHLO client.test").code == 250
        assert wire.command("MAIL FROM:<a@client.test>").code == 250
        assert wire.command("RCPT TO:<r@sink.test>").code == 250
        assert wire.command("DATA").code == 354
        wire.send(b"Subject: slow\r\n\r\n")
        done = threading.Event()

        def trickle() -> None:  # 50 bytes a second, far below 1000
            while not done.wait(0.2):
                try:
                    wire.send(b"xxxxxxxxx\r\n")
                except OSError:
                    return

        sender = threading.Thread(target=trickle)
        started = time.monotonic()
        sender.start()
        try:
            cut = wire.read_reply()
        finally:
            done.set()
            sender.join()
        assert cut.text == "421 4.4.2 Data transfer too slow, closing connection"
        assert time.monotonic() - started < 3
    assert relay.wait_events("SessionCut")[0]["reason"] == "data_rate"
    assert relay.queue()["depth"] == 0
    assert metric(relay, "hamta_messages_received_total") == 0


def send_message(relay: RelayProcess, recipient: str) -> str:
    """One message over a fresh connection; the reply to MAIL if refused, else to DATA."""
    with SmtpWire(relay.host, relay.port, timeout=10) as wire:
        assert wire.command("EHLO client.test").code == 250
        mail = wire.command("MAIL FROM:<a@client.test>")
        if mail.code != 250:
            return mail.text
        assert wire.command(f"RCPT TO:<{recipient}>").code == 250
        assert wire.command("DATA").code == 354
        wire.send(MESSAGE)
        return wire.read_reply().text


def test_a_full_queue_pushes_back_at_mail(make_relay: RelayFactory) -> None:
    # deadmx.test's MX does not answer: what it is sent stays queued.
    relay = make_relay({"smtp": {"max_queued_messages": 2}})
    assert send_message(relay, "r@deadmx.test").startswith("250 2.0.0 Ok: queued as")
    assert send_message(relay, "r@deadmx.test").startswith("250 2.0.0 Ok: queued as")
    refused = send_message(relay, "r@deadmx.test")
    assert refused == "452 4.3.1 Insufficient system resources, try again later"
    [event] = relay.wait_events("BackPressure")
    assert event["reason"] == "queue" and event["value"] == 2 and event["limit"] == 2
    assert metric(relay, "hamta_smtp_backpressure_total", reason="queue") == 1
    assert relay.queue()["depth"] == 2


@pytest.mark.parametrize(("limit", "refused"), [("1m", True), ("64g", False)])
def test_memory_over_max_memory_pushes_back(
    make_relay: RelayFactory, limit: str, refused: bool
) -> None:
    relay = make_relay({"smtp": {"max_memory": limit}})
    reply = send_message(relay, "r@deadmx.test")
    if refused:  # a relay uses far more than a megabyte
        assert reply == "452 4.3.1 Insufficient system resources, try again later"
        [event] = relay.wait_events("BackPressure")
        assert event["reason"] == "memory" and event["value"] > 1024 * 1024
    else:
        assert reply.startswith("250 2.0.0 Ok: queued as")


@pytest.mark.parametrize(("soft", "hard"), [(512, 512), (256, 4096)])
def test_too_few_file_descriptors_are_raised_or_warned_about(
    make_relay: RelayFactory, soft: int, hard: int
) -> None:
    # The process starts as a service with these limits would (systemd's soft limit: 1,024).
    limits = f"import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
    relay = make_relay({"smtp": {"max_connections": 1000}}, prelude=limits)
    assert send_message(relay, "r@deadmx.test").startswith("250 2.0.0 Ok: queued as")
    needed = 1000 + 20 + 256  # sessions, one destination's connections, a margin
    if hard < needed:
        [low] = relay.events("DescriptorLimitLow")
        assert low["level"] == "warning" and low["limit"] == hard and low["needed"] == needed
    else:
        assert not relay.events("DescriptorLimitLow")
        [raised] = relay.events("DescriptorLimitRaised")
        assert raised["before"] == soft and raised["limit"] == needed
