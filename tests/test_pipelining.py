"""Delivery with PIPELINING (RFC 2920) to a next hop that offers it: hamta.smtp_pipelining.

The next hop is the recording aiosmtpd sink with PIPELINING offered; Postfix's smtp-sink, which
offers it too, is the second implementation (tests/test_delivery.py).
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamta.smtp_pipelining import dot_stuffed
from tests.conftest import MX_HOST, TLS_MX_HOST, RelayFactory
from tests.support import RecordingSink, make_self_signed


@pytest.fixture
def pipelining_sink(mx_port: int) -> Iterator[RecordingSink]:
    with RecordingSink(host=MX_HOST, port=mx_port, pipelining=True) as recording:
        yield recording


def test_dot_stuffing_and_the_end_of_data() -> None:
    assert dot_stuffed(b"a\r\n.b\r\n..c\r\n") == b"a\r\n..b\r\n...c\r\n.\r\n"
    assert dot_stuffed(b".first\r\n") == b"..first\r\n.\r\n"
    assert dot_stuffed(b"no end") == b"no end\r\n.\r\n"
    assert dot_stuffed(b"") == b".\r\n"
    # Bare line ends (never in the spool; a DSN of some future kind) as aiosmtplib sends them.
    assert dot_stuffed(b"a\n.b\rc") == b"a\r\n..b\r\nc\r\n.\r\n"


def test_each_recipient_gets_its_own_reply_and_the_body_arrives_exact(
    make_relay: RelayFactory, pipelining_sink: RecordingSink
) -> None:
    relay = make_relay()
    body = b"Subject: dots\r\n\r\n.one dot\r\n..two dots\r\n.\r\nend\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        refused = client.sendmail(
            "sender@sink.test",
            ["ok@sink.test", "reject-me@sink.test", "defer-me@sink.test", "ok2@sink.test"],
            body,
        )
        assert not refused
    # The accepted two in one transaction; the DSN for reject-me@ from the null sender.
    assert pipelining_sink.wait_for(2, timeout=15)
    by_sender = {m.mail_from: m for m in pipelining_sink.messages}
    delivered = by_sender["sender@sink.test"]
    assert delivered.rcpt_tos == ("ok@sink.test", "ok2@sink.test")
    assert delivered.data.endswith(body)
    assert "Status: 5.1.1" in by_sender[""].data.decode()
    deferred = relay.wait_events("TransientFailure")  # retried meanwhile: one or more
    assert {(e["recipient"], e["code"]) for e in deferred} == {("defer-me@sink.test", 451)}


def test_the_envelope_and_data_travel_in_one_segment(
    make_relay: RelayFactory, pipelining_sink: RecordingSink
) -> None:
    relay = make_relay({"delivery": {"max_connections_per_destination": 1}})
    count = 12
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        for i in range(count):
            client.sendmail("a@origin.test", [f"user{i}@sink.test"], b"Subject: x\r\n\r\nhi\r\n")
    assert pipelining_sink.wait_for(count, timeout=20)
    relay.wait_queue_empty()
    # Per message: MAIL+RCPT+DATA, then the body (four reads without pipelining); per
    # connection: EHLO and QUIT.
    assert pipelining_sink.reads <= 2 * count + 2 * pipelining_sink.connections + 2, (
        pipelining_sink.reads,
        pipelining_sink.connections,
    )


def test_pipelining_inside_starttls(make_relay: RelayFactory, mx_port: int, tmp_path: Path) -> None:
    # The extensions of the EHLO after STARTTLS are the ones that count.
    cert, key = make_self_signed(tmp_path, "mx.tls.test")
    with RecordingSink(
        host=TLS_MX_HOST, port=mx_port, tls_cert=cert, tls_key=key, pipelining=True
    ) as tls_sink:
        relay = make_relay()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail(
                "a@origin.test", ["x@tls.test", "y@tls.test"], b"Subject: t\r\n\r\n.\r\n"
            )
        assert tls_sink.wait_for(1, timeout=15)
        (message,) = tls_sink.messages
        assert message.tls is True
        assert message.rcpt_tos == ("x@tls.test", "y@tls.test")
        assert message.data.endswith(b"Subject: t\r\n\r\n.\r\n")
