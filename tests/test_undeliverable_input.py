"""What becomes of queued mail whose addresses or next hop cannot work: a failure, never silence.

A next hop without SMTPUTF8 gets no UTF-8 address: those recipients bounce at once with 5.6.7
(RFC 6531 3.4) and a DSN. Mail queued before reception checked addresses (a domain with an empty
or over-long label) is deferred with an event each attempt and bounced when its lifetime ends,
instead of crashing the delivery session and staying queued with no word.
"""

from __future__ import annotations

import asyncio
import email
import time
from email.message import Message
from pathlib import Path

from hamta.dsn import FailedRecipient, build_dsn
from hamta.spool import Spool
from tests.conftest import MX_HOST, RelayFactory
from tests.support import RecordingSink
from tests.support.smtpwire import Reply, SmtpWire
from tests.test_client_input import LONG_DOMAIN
from tests.test_reception import queue_id, session

ASCII_MX = "127.0.0.8"


def test_utf8_recipient_to_a_next_hop_without_smtputf8_bounces_with_5_6_7(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    with RecordingSink(host=ASCII_MX, smtputf8=False) as ascii_mx:
        relay = make_relay(
            {
                "delivery": {"routes": {"ascii.test": f"[{ASCII_MX}]:{ascii_mx.port}"}},
                "retry": {"first_delay": "200ms", "jitter": 0.0, "max_queue_lifetime": "30s"},
            }
        )
        with session(relay) as wire:
            assert wire.command("MAIL FROM:<sender@sink.test> SMTPUTF8").code == 250
            assert wire.command("RCPT TO:<jörg@ascii.test>").code == 250
            assert wire.command("RCPT TO:<plain@ascii.test>").code == 250
            assert wire.command("DATA").code == 354
            wire.send(b"Subject: utf8\r\n\r\nbody\r\n.\r\n")
            qid = queue_id(wire.read_reply())
        # The ASCII recipient is delivered; the other bounces at once (not retried forever).
        assert ascii_mx.wait_for(1, timeout=15)
        assert ascii_mx.messages[0].rcpt_tos == ("plain@ascii.test",)
        (bounce,) = relay.wait_events("Bounce", timeout=10)
        assert (bounce["queue_id"], bounce["recipient"]) == (qid, "jörg@ascii.test")
        assert bounce["enhanced_code"] == "5.6.7", bounce
        assert bounce["bounce_class"] != "InvalidRecipient"  # not a reason to suppress him
        assert sink.wait_for(1, timeout=15)  # the DSN to the sender
        dsn = sink.messages[0]
        assert dsn.rcpt_tos == ("sender@sink.test",) and b"Status: 5.6.7" in dsn.data
        relay.wait_queue_empty()
        assert not relay.events("TransientFailure")


def send(wire: SmtpWire, mail: str, rcpt: str) -> Reply:
    """One short message on an open session; the reply to its DATA."""
    assert wire.command(f"MAIL FROM:{mail}").code == 250
    assert wire.command(f"RCPT TO:{rcpt}").code == 250
    assert wire.command("DATA").code == 354
    wire.send(b"Subject: hop\r\n\r\nbody\r\n.\r\n")
    return wire.read_reply()


async def _spool_old_mail(path: Path, recipients: list[str]) -> list[str]:
    """Queue mail as a hamta that did not check addresses at RCPT would have: one per recipient."""
    spool = Spool(path)
    spool.open()
    await spool.recover()
    qids = []
    for recipient in recipients:
        body = f"From: sender@sink.test\r\nSubject: old\r\n\r\nto {recipient}\r\n".encode()
        message = await spool.append(body, "sender@sink.test", [recipient])
        qids.append(message.rec.qid)
    await spool.close()
    return qids


def test_queued_mail_whose_domain_breaks_routing_fails_loudly_then_bounces(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    # Left in a spool by a relay that took such addresses: they crashed the delivery task and
    # stayed queued with no event and no DSN.
    relay = make_relay(
        {"retry": {"first_delay": "200ms", "jitter": 0.0, "max_queue_lifetime": "3s"}},
        start=False,
    )
    recipients = ["a@x..test", "a@" + "d" * 64 + ".test", f"a@{LONG_DOMAIN}"]
    qids = asyncio.run(_spool_old_mail(relay.spool, recipients))
    relay.start()
    deadline = time.monotonic() + 20
    while {e["original_queue_id"] for e in relay.events("DsnQueued")} != set(qids):
        assert time.monotonic() < deadline, (relay.events("DsnQueued"), relay.queue())
        time.sleep(0.05)
    for qid in qids:
        # Each attempt is one event (the first may come after the lifetime already ran out).
        attempts = [
            e
            for name in ("TransientFailure", "Expiration")
            for e in relay.events(name)
            if e["queue_id"] == qid
        ]
        assert attempts and [e for e in attempts if e["event"] == "Expiration"], attempts
        assert all(e["enhanced_code"] == "4.4.3" for e in attempts), attempts
        assert all("cannot route" in e["response"] for e in attempts), attempts
    assert sink.wait_for(3, timeout=15)  # the three DSNs
    assert {m.rcpt_tos for m in sink.messages} == {("sender@sink.test",)}
    relay.wait_queue_empty()


def test_dsn_for_utf8_addresses_and_headers_is_ascii_where_rfc_3464_wants_it() -> None:
    dsn = build_dsn(
        reporting_mta="relay.hamta.test",
        queue_id="Q1",
        original_sender="sender@sink.test",
        arrival=0.0,
        failed=[FailedRecipient("ñandú@ascii.test", "5.6.7", "no SMTPUTF8 for jörg", "mx")],
        headers="Subject: héllo\r\n".encode(),
        now=0.0,
    )
    report = email.message_from_bytes(dsn)
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) == 2  # per message, per recipient
    block = blocks[1]
    assert isinstance(block, Message)
    # RFC 6533 3: a UTF-8 address as utf-8-addr-xtext, so the status part stays ASCII.
    assert block["Final-Recipient"] == "utf-8; \\x{F1}and\\x{FA}@ascii.test"
    assert block["Diagnostic-Code"] == "smtp; no SMTPUTF8 for j\\x{F6}rg"
    headers = next(p for p in report.walk() if p.get_content_type() == "text/rfc822-headers")
    assert headers.get_payload(decode=True) == "Subject: héllo\r\n".encode()


def test_utf8_mail_on_a_connection_the_next_hop_dropped_is_retried_not_bounced(
    make_relay: RelayFactory, mx_port: int
) -> None:
    # aiosmtplib forgets a connection's extensions when it is lost: an idle connection the MX
    # dropped says "no SMTPUTF8", which must not be taken for the MX's answer.
    relay = make_relay(
        {
            "delivery": {"idle_connection_timeout": "60s"},
            "retry": {"first_delay": "200ms", "jitter": 0.0},
        }
    )
    with RecordingSink(host=MX_HOST, port=mx_port) as first:
        with session(relay) as wire:
            queue_id(send(wire, "<sender@sink.test>", "<first@sink.test>"))
        assert first.wait_for(1, timeout=15)
    # The first MX is gone with the relay's idle connection; the same MX is back.
    with RecordingSink(host=MX_HOST, port=mx_port) as second:
        with session(relay) as wire:
            qid = queue_id(send(wire, "<sender@sink.test> SMTPUTF8", "<ñandú@sink.test>"))
        assert second.wait_for(1, timeout=15), relay.events("Bounce")
        assert second.messages[0].rcpt_tos == ("ñandú@sink.test",)
    assert not [e for e in relay.events("Bounce") if e["queue_id"] == qid]
    relay.wait_queue_empty()


def test_dsn_to_a_utf8_sender_names_him_in_utf8_not_in_an_encoded_word() -> None:
    dsn = build_dsn(
        reporting_mta="relay.hamta.test",
        queue_id="Q2",
        original_sender="jörg@origin.test",
        arrival=0.0,
        failed=[FailedRecipient("plain@ascii.test", "5.6.7", "no SMTPUTF8", "mx")],
        headers=b"Subject: x\r\n",
        now=0.0,
    )
    assert "\r\nTo: jörg@origin.test\r\n".encode() in dsn
