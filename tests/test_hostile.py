"""The hostile client of the chaos suite against a real relay: every session gets its due reply.

``chaos.hostile`` holds every input a security review found harmful (invalid UTF-8 in MAIL
FROM, header injection through EHLO, addresses past RFC 5321's limits, UTF-8 without SMTPUTF8,
deep MIME, thousands of repeated headers, recipient floods, smuggling, idle crowds). Played over
real sockets against a ``hamta serve`` process, each must be refused where it must and answered
within the deadline, and afterwards the relay must still be ready and still deliver mail.
"""

from __future__ import annotations

import smtplib
import time

from chaos import hostile
from tests.support import RecordingSink

from .conftest import RelayFactory


def test_every_hostile_session_is_answered_and_the_relay_goes_on(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay()
    outcomes = hostile.run(relay.host, relay.port, "sink.test", flood=100, say=lambda _: None)
    problems = [f"{o.name}: {p}" for o in outcomes for p in o.problems]
    assert problems == []
    assert relay.proc is not None and relay.proc.poll() is None, relay.stderr()
    status, _ = relay.get("/health/ready")
    assert status == 200
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.sendmail("after@client.test", ["after@sink.test"], b"Subject: after\r\n\r\nok\r\n")
    deadline = time.monotonic() + 30
    while not any(b"Subject: after" in m.data for m in sink.messages):
        assert time.monotonic() < deadline, "the message sent after the hostile sessions"
        sink.wait_for(sink.count + 1, timeout=1)
    relay.wait_queue_empty()
    injected = [m.data[:300] for m in sink.messages if b"X-Injected-Via-EHLO" in m.data]
    assert injected == []
