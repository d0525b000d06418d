"""One DSN per message, and a limit per sender domain: a relay cannot be a DSN amplifier.

A real relay, the test DNS (names it does not know are NXDOMAIN; nomail.test has a null MX) and
the recording MX sink, which refuses its ``reject*`` mailboxes with 550 5.1.1 and receives the
DSNs sent to senders at sink.test.
"""

from __future__ import annotations

import email
import email.message
import email.policy

from tests.conftest import RelayFactory
from tests.support import RecordingSink
from tests.test_delivery import send
from tests.test_suppression import metric


def final_recipients(data: bytes) -> list[str]:
    """The Final-Recipient of each per-recipient block of a DSN."""
    report = email.message_from_bytes(data, policy=email.policy.compat32)
    (status,) = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [
        str(block["Final-Recipient"]).partition(";")[2].strip()
        for block in blocks[1:]
        if isinstance(block, email.message.Message)
    ]


def test_a_message_failing_at_many_domains_gets_one_dsn(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay({"delivery": {"dsn_window": "1s"}})
    failing = (
        [f"u{n}@nx{n}.test" for n in range(10)]  # NXDOMAIN: one job, and a DSN, per domain
        + [f"reject-{n}@sink.test" for n in range(10)]  # 550 5.1.1 from the MX
        + ["x@nomail.test"]  # null MX
    )
    send(relay.port, "sender@sink.test", [*failing, "ok@sink.test"])
    assert sink.wait_for(2, timeout=20)
    relay.wait_queue_empty()
    by_sender = {m.mail_from: m for m in sink.messages}
    assert sink.count == 2, [m.rcpt_tos for m in sink.messages]  # was 13: one DSN per domain
    assert by_sender["sender@sink.test"].rcpt_tos == ("ok@sink.test",)
    dsn = by_sender[""]
    assert dsn.rcpt_tos == ("sender@sink.test",)
    assert sorted(final_recipients(dsn.data)) == sorted(failing)
    (queued,) = relay.events("DsnQueued")
    assert queued["failed_recipients"] == 21
    assert metric(relay, "hamta_dsns_total", outcome="queued") == 1


def test_dsns_to_one_sender_domain_are_rate_limited(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay({"delivery": {"dsn_window": "100ms", "dsn_rate_per_domain": 2}})
    for number in range(5):
        send(relay.port, f"victim{number}@sink.test", [f"u@gone{number}.test"])
    relay.wait_events("DsnRateLimited", count=3)
    relay.wait_queue_empty()  # the recipients are finished all the same
    assert sink.count == 2
    assert metric(relay, "hamta_dsns_total", outcome="queued") == 2
    assert metric(relay, "hamta_dsns_total", outcome="rate_limited") == 3
    assert relay.events("DsnRateLimited")[0]["sender_domain"] == "sink.test"
    # Another sender domain has a bucket of its own.
    send(relay.port, "someone@other.test", ["u@gone9.test"])
    relay.wait_events("DsnQueued", count=3)
