"""Delivery against real MX sinks found through a real DNS server."""

from __future__ import annotations

import email
import smtplib
from email.message import Message
from pathlib import Path

from hamta.delivery import Reply
from tests.conftest import MX_HOST, TLS_MX_HOST, RelayFactory
from tests.support import PostfixSmtpSink, RecordingSink, make_self_signed


def send(
    relay_port: int,
    sender: str,
    recipients: list[str],
    body: str = "Hello.\r\n",
    *,
    subject: str = "test",
    host: str = "127.0.0.1",
) -> str:
    """Send one message through the relay with smtplib; return the 250 text."""
    with smtplib.SMTP(host, relay_port, timeout=10) as client:
        message = (
            f"From: {sender or 'MAILER-DAEMON@x.test'}\r\nTo: {', '.join(recipients)}\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject}@hamta.test>\r\n\r\n{body}"
        )
        refused = client.sendmail(sender, recipients, message.encode())
        assert not refused
        code, text = client.noop()
        assert code == 250
    return text.decode()


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data)


def test_delivers_through_mx_with_received_header(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay()
    send(relay.port, "alice@origin.test", ["bob@sink.test"], subject="first")
    assert sink.wait_for(1, timeout=10)
    delivered = sink.messages[0]
    assert delivered.mail_from == "alice@origin.test"
    assert delivered.rcpt_tos == ("bob@sink.test",)
    message = parse(delivered.data)
    assert "by relay.hamta.test (hamta) with ESMTP id" in message["Received"]
    assert message["Subject"] == "first"
    relay.wait_queue_empty()
    events = relay.wait_events("Delivery")
    assert len(events) == 1
    event = events[0]
    for key in (
        "queue_id",
        "message_id",
        "sender",
        "recipient",
        "domain",
        "mx_host",
        "mx_ip",
        "code",
        "enhanced_code",
        "response",
        "attempt",
        "size",
        "latency_ms",
    ):
        assert key in event, key
    assert event["mx_host"] == "mx1.sink.test"
    assert event["mx_ip"] == MX_HOST
    assert event["code"] == 250
    assert event["message_id"] == "<first@hamta.test>"
    reception = relay.events("Reception")[0]
    assert reception["queue_id"] == event["queue_id"]


def test_mx_preference_order_falls_over_to_next_mx(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    # pref.test: MX 10 on 127.0.0.6 (nothing listens), MX 20 on 127.0.0.5 (the sink).
    relay = make_relay()
    send(relay.port, "a@origin.test", ["x@pref.test"])
    assert sink.wait_for(1, timeout=15)
    assert relay.wait_events("Delivery")[0]["mx_host"] == "live.pref.test"


def test_falls_back_to_address_record_without_mx(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay()
    send(relay.port, "a@origin.test", ["x@amx.test"])
    assert sink.wait_for(1, timeout=10)
    assert relay.wait_events("Delivery")[0]["mx_host"] == "amx.test"


def test_null_mx_bounces_at_once_with_dsn(make_relay: RelayFactory, sink: RecordingSink) -> None:
    relay = make_relay()
    send(relay.port, "sender@sink.test", ["x@nomail.test"], subject="to-nullmx")
    # The only thing the sink sees is the DSN, sent to the original sender.
    assert sink.wait_for(1, timeout=10)
    dsn = sink.messages[0]
    assert dsn.mail_from == ""
    assert dsn.rcpt_tos == ("sender@sink.test",)
    report = parse(dsn.data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Final-Recipient: rfc822; x@nomail.test" in text
    assert "Status: 5.1.10" in text
    assert "Action: failed" in text
    headers = next(p for p in report.walk() if p.get_content_type() == "text/rfc822-headers")
    assert "Subject: to-nullmx" in headers.as_string()
    bounce = relay.wait_events("Bounce")[0]
    assert bounce["enhanced_code"] == "5.1.10"
    assert relay.events("TransientFailure") == []


def test_permanent_rejection_bounces_and_never_bounces_a_bounce(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay()
    send(relay.port, "sender@sink.test", ["reject-me@sink.test", "ok@sink.test"])
    # One delivery (ok@) and one DSN for reject-me@, in either order.
    assert sink.wait_for(2, timeout=10)
    by_sender = {m.mail_from: m for m in sink.messages}
    assert by_sender["sender@sink.test"].rcpt_tos == ("ok@sink.test",)
    assert "Status: 5.1.1" in by_sender[""].data.decode()
    # A message from the null sender that bounces gets no DSN at all.
    send(relay.port, "", ["reject-again@sink.test"])
    relay.wait_queue_empty()
    assert sink.count == 2
    assert relay.wait_events("DsnSuppressed")[0]["reason"] == "null sender"


def test_static_route_overrides_dns(make_relay: RelayFactory, sink: RecordingSink) -> None:
    # unrouted.test has no DNS records at all; the route alone gets it there.
    relay = make_relay({"delivery": {"routes": {"unrouted.test": f"[{MX_HOST}]:{sink.port}"}}})
    send(relay.port, "a@origin.test", ["x@unrouted.test"])
    assert sink.wait_for(1, timeout=10)
    event = relay.wait_events("Delivery")[0]
    assert event["mx_ip"] == MX_HOST


def test_connections_are_reused_for_several_messages(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay(
        {"delivery": {"max_connections_per_destination": 2, "idle_connection_timeout": "5s"}}
    )
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        for i in range(30):
            client.sendmail(
                "a@origin.test",
                [f"user{i}@sink.test"],
                f"Subject: {i}\r\n\r\nbody {i}\r\n".encode(),
            )
    assert sink.wait_for(30, timeout=20)
    assert sink.connections <= 4, sink.connections


def test_per_destination_concurrency_limit(make_relay: RelayFactory, mx_port: int) -> None:
    # Every recipient is slow, so sessions pile up to the limit and not beyond.
    with RecordingSink(host=MX_HOST, port=mx_port, slow_seconds=0.3) as slow_sink:
        relay = make_relay({"delivery": {"max_connections_per_destination": 3}})
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            for i in range(12):
                client.sendmail("a@origin.test", [f"slow{i}@sink.test"], b"Subject: s\r\n\r\nx\r\n")
        assert slow_sink.wait_for(12, timeout=30)
        assert slow_sink.connections == 3


def test_opportunistic_starttls_outbound(
    make_relay: RelayFactory, mx_port: int, tmp_path: Path
) -> None:
    cert, key = make_self_signed(tmp_path, "mx.tls.test")
    with RecordingSink(host=TLS_MX_HOST, port=mx_port, tls_cert=cert, tls_key=key) as tls_sink:
        relay = make_relay()
        send(relay.port, "a@origin.test", ["x@tls.test"])
        assert tls_sink.wait_for(1, timeout=10)
        assert tls_sink.messages[0].tls is True


def test_temporary_failure_is_retried_with_backoff(make_relay: RelayFactory, mx_port: int) -> None:
    # The MX answers DATA with 451 for a while, then recovers.
    relay = make_relay({"retry": {"first_delay": "200ms", "factor": 2.0, "jitter": 0.0}})
    with RecordingSink(host=MX_HOST, port=mx_port, data_reply="451 4.7.1 throttled") as busy:
        send(relay.port, "a@origin.test", ["x@sink.test"])
        relay.wait_events("TransientFailure", 3)
        assert busy.count == 0
    failures = relay.events("TransientFailure")
    assert [f["attempt"] for f in failures[:3]] == [1, 2, 3]
    assert failures[0]["code"] == 451 and failures[0]["enhanced_code"] == "4.7.1"
    with RecordingSink(host=MX_HOST, port=mx_port) as healthy:
        assert healthy.wait_for(1, timeout=15)
    relay.wait_queue_empty()


def test_dead_destination_is_deferred_not_lost(make_relay: RelayFactory, mx_port: int) -> None:
    relay = make_relay({"retry": {"first_delay": "300ms", "jitter": 0.0}})
    send(relay.port, "a@origin.test", ["x@sink.test"])  # nothing listens on the MX yet
    relay.wait_events("TransientFailure")
    failure = relay.events("TransientFailure")[0]
    assert failure["code"] is None and "refused" in failure["response"].lower()
    with RecordingSink(host=MX_HOST, port=mx_port) as late:
        assert late.wait_for(1, timeout=15)


def test_expired_message_bounces_with_delivery_time_expired(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay(
        {"retry": {"first_delay": "200ms", "jitter": 0.0, "max_queue_lifetime": "1s"}}
    )
    send(relay.port, "sender@sink.test", ["defer-forever@sink.test"])
    assert sink.wait_for(1, timeout=15)  # the DSN
    dsn = sink.messages[0]
    assert dsn.mail_from == "" and dsn.rcpt_tos == ("sender@sink.test",)
    assert "Status: 4.4.7" in dsn.data.decode()
    assert "expired" in parse(dsn.data)["Subject"]
    assert relay.wait_events("Expiration")
    relay.wait_queue_empty()


def test_delivers_to_postfix_smtp_sink_reusing_connections(
    make_relay: RelayFactory, mx_port: int
) -> None:
    # Postfix's smtp-sink as the receiving MX: a second, independent SMTP server implementation.
    with PostfixSmtpSink(host=MX_HOST, port=mx_port) as postfix_sink:
        relay = make_relay({"delivery": {"max_connections_per_destination": 2}})
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            for i in range(25):
                client.sendmail(
                    "a@origin.test",
                    [f"user{i}@sink.test"],
                    f"Subject: {i}\r\n\r\nbody {i}\r\n".encode(),
                )
        assert postfix_sink.wait_for(25, timeout=20)
        relay.wait_queue_empty()
        assert len(relay.events("Delivery")) == 25
        assert postfix_sink.sessions <= 2


def test_a_reply_without_an_enhanced_code_gets_the_class_of_its_basic_code() -> None:
    """A peer that answers a plain "250 OK" delivered: 2.0.0 in the log, not 4.0.0."""
    assert Reply(250, "OK").enhanced == "2.0.0"
    assert Reply(250, "2.1.5 Ok").enhanced == "2.1.5"
    assert Reply(451, "try later").enhanced == "4.0.0"
    assert Reply(550, "no").enhanced == "5.0.0"
    assert Reply(0, "connection refused").enhanced == "4.4.1"
