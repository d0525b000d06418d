"""Asynchronous bounces: DSNs sent to the bounces address are read, classed, and suppress.

A real relay receives, over SMTP, the kind of report Postfix sends when a mailbox it accepted
mail for turns out not to exist: the unknown recipient is suppressed before the 250, the full
mailbox and the delayed one are only logged; unreadable mail is kept, never lost.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamta.report_quarantine import quarantine_refusal
from hamta.return_paths import SECRET_FILE, ReturnPaths
from tests.conftest import RelayFactory
from tests.support import DnsServer, RecordingSink
from tests.support.relay import RelayProcess
from tests.test_suppression import CLIENT_HELO, metric, rcpt, send

BOUNCES = "bounces@hamta.test"

DSN = b"""\
From: MAILER-DAEMON@mx.remote.test (Mail Delivery System)\r
Subject: Undelivered Mail Returned to Sender\r
To: bounces+msg-4711@hamta.test\r
Date: Wed, 25 Nov 2026 22:10:05 +0000 (UTC)\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type=delivery-status;\r
 boundary="9B095B5ADSN=_01HH"\r
\r
--9B095B5ADSN=_01HH\r
Content-Type: text/plain; charset=us-ascii\r
\r
This is the mail system at host mx.remote.test.\r
I'm sorry to have to inform you that your message could not\r
be delivered to one or more recipients.\r
\r
--9B095B5ADSN=_01HH\r
Content-Type: message/delivery-status\r
\r
Reporting-MTA: dns; mx.remote.test\r
X-Postfix-Queue-ID: 9B095B5A\r
Arrival-Date: Wed, 25 Nov 2026 22:10:01 +0000 (UTC)\r
\r
Final-Recipient: rfc822; Gone@Sink.test\r
Original-Recipient: rfc822;gone@sink.test\r
Action: failed\r
Status: 5.1.1\r
Remote-MTA: dns; mailstore.remote.test\r
Diagnostic-Code: smtp; 550 5.1.1 <gone@sink.test>: Recipient address rejected:\r
 User unknown in virtual mailbox table\r
\r
Final-Recipient: rfc822; full@sink.test\r
Action: failed\r
Status: 5.2.2\r
Diagnostic-Code: smtp; 552 5.2.2 <full@sink.test>: Mailbox full\r
\r
Final-Recipient: rfc822; slow@sink.test\r
Action: delayed\r
Status: 4.4.1\r
Diagnostic-Code: X-Postfix; connect to mailstore.remote.test[198.18.1.1]:25:\r
 Connection timed out\r
\r
--9B095B5ADSN=_01HH\r
Content-Type: text/rfc822-headers\r
\r
From: news@origin.test\r
To: gone@sink.test\r
Subject: the November letter\r
Message-ID: <4711@origin.test>\r
\r
--9B095B5ADSN=_01HH--\r
"""


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DnsServer, mx_port: int
) -> Iterator[RelayProcess]:
    """A relay with a bounces address."""
    process = RelayProcess(
        tmp_path_factory.mktemp("bounces"),
        {
            "dns": {"nameservers": [dns_server.nameserver]},
            "delivery": {"port": mx_port},
            "suppression": {"bounces_address": BOUNCES},
        },
    )
    process.start()
    yield process
    process.stop()


def return_path_of(relay: RelayProcess, sink: RecordingSink, recipient: str) -> str:
    """The signed return path the relay gives mail from the bounces address to ``recipient``."""
    sink.clear()
    send(relay, recipient, b"Subject: the November letter\r\n\r\nhello\r\n", sender=BOUNCES)
    assert sink.wait_for(1, timeout=15)
    (message,) = sink.messages
    assert message.rcpt_tos == (recipient,)
    return message.mail_from


def signed_for(relay: RelayProcess, recipient: str, days_ago: float = 0) -> str:
    """A return path signed with the relay's secret (on its spool), as of ``days_ago``."""
    secret = (relay.spool / SECRET_FILE).read_bytes()
    return ReturnPaths(BOUNCES, secret, 7, lambda: time.time() - days_ago * 86400).sign(recipient)


def test_a_dsn_of_an_unknown_recipient_suppresses_it_before_the_250(
    relay: RelayProcess, sink: RecordingSink
) -> None:
    return_path = return_path_of(relay, sink, "gone@sink.test")
    assert re.match(r"^bounces\+\d+\.[0-9a-f]{16}\.gone=sink\.test@hamta\.test$", return_path)
    reply = send(relay, return_path, DSN, sender="")  # the signed return path, null sender
    assert re.match(r"^250 2\.0\.0 Ok: bounce report read as \w+$", reply), reply
    # Durable before the 250: the very next RCPT is refused.
    code, text = rcpt(relay, "gone@sink.test")
    assert code == 550 and text.startswith("5.1.1 <gone@sink.test>: recipient suppressed"), text
    assert rcpt(relay, "full@sink.test")[0] == 250  # over quota: it exists
    assert rcpt(relay, "slow@sink.test")[0] == 250  # only delayed
    events = {e["recipient"]: e for e in relay.events("AsyncBounce")}
    assert events["gone@sink.test"]["bounce_class"] == "InvalidRecipient"
    assert events["gone@sink.test"]["newly_suppressed"] is True
    assert events["full@sink.test"]["bounce_class"] == "QuotaIssues"
    assert events["full@sink.test"]["newly_suppressed"] is False
    assert (events["slow@sink.test"]["action"], events["slow@sink.test"]["kind"]) == (
        "delayed",
        "soft",
    )
    assert (
        metric(relay, "hamta_async_bounces_total", **{"class": "InvalidRecipient", "kind": "hard"})
        == 1
    )
    assert relay.queue()["depth"] == 0  # consumed, not relayed


def test_mail_to_the_bounces_address_that_is_no_dsn_is_kept(relay: RelayProcess) -> None:
    data = b"From: someone@remote.test\r\nSubject: out of office\r\n\r\nback monday\r\n"
    reply = send(relay, signed_for(relay, "away@sink.test"), data, sender="")
    match = re.match(r"^250 2\.0\.0 Ok: unreadable report kept as (\w+)$", reply)
    assert match is not None, reply
    (event,) = [e for e in relay.events("BounceUnparsed") if e["queue_id"] == match.group(1)]
    assert Path(event["kept"]).read_bytes() == data
    assert metric(relay, "hamta_async_bounces_unparsed_total") >= 1


def test_only_the_bounces_address_and_its_verp_forms_are_taken(relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as client:
        client.ehlo()
        client.mail("")
        assert client.rcpt("BOUNCES+x@hamta.test")[0] == 250
        code, text = client.rcpt("someone@sink.test")
        assert code == 452 and b"one recipient per transaction" in text
    # Look-alikes are ordinary recipients, relayed for a client of the relay networks.
    assert rcpt(relay, "bouncesx@hamta.test")[0] == 250
    assert rcpt(relay, "bounces@other.test")[0] == 250


def test_reports_to_keep_never_take_the_spool_s_reserved_room(
    make_relay: RelayFactory, tmp_path: Path
) -> None:
    """Mail to the report addresses comes from anywhere: it must not fill the spool's volume."""
    assert quarantine_refusal(tmp_path / "quarantine", 10, 0) is None
    assert "to stay free" in str(quarantine_refusal(tmp_path / "quarantine", 10, 2**62))
    relay = make_relay(
        {"suppression": {"bounces_address": BOUNCES}, "spool": {"min_free": "100000g"}}
    )
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as client:
        client.ehlo()
        client.mail("")
        assert client.rcpt(signed_for(relay, "away@sink.test"))[0] == 250
        code, text = client.data(b"Subject: out of office\r\n\r\nback monday\r\n")
    assert (code, text.decode()) == (452, "4.3.1 Insufficient system storage, try again later")
    assert relay.events("ReportNotKept")
    assert not (relay.spool / "quarantine").exists()
