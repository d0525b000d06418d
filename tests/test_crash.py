"""kill -9 under load: no acknowledged message is lost, nothing half-written is delivered."""

from __future__ import annotations

import contextlib
import random
import re
import smtplib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from tests.conftest import RelayFactory
from tests.support import RecordingSink

_ID = re.compile(rb"^X-Test-Id: (\S+)\r?$", re.MULTILINE)


@dataclass
class History:
    """What every sender saw: acknowledged, refused or unknown (no reply to DATA)."""

    acked: dict[str, str] = field(default_factory=dict)  # test id -> queue id
    unknown: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def payload(test_id: str) -> bytes:
    filler = (test_id * 40)[:1500]
    return (
        f"From: load@origin.test\r\nTo: x@sink.test\r\nSubject: {test_id}\r\n"
        f"X-Test-Id: {test_id}\r\n\r\n{filler}\r\nend of {test_id}\r\n"
    ).encode()


def sender(port: int, name: str, history: History, stop: threading.Event) -> None:
    """Send until told to stop, reconnecting whenever the relay is down."""
    n = 0
    while not stop.is_set():
        try:
            client = smtplib.SMTP("127.0.0.1", port, timeout=5)
            client.ehlo()
        except (smtplib.SMTPException, OSError):
            stop.wait(0.02)  # the relay is restarting; try again shortly
            continue
        try:
            while not stop.is_set():
                n += 1
                test_id = f"{name}-{n}"
                try:
                    if client.mail("load@origin.test")[0] != 250:
                        break
                    if client.rcpt(f"{test_id}@sink.test")[0] != 250:
                        break
                except (smtplib.SMTPException, OSError):
                    break  # no DATA was sent for this id
                try:
                    code, reply = client.data(payload(test_id))
                except smtplib.SMTPDataError as exc:
                    with history.lock:
                        history.refused.add(test_id)
                    if exc.smtp_code == 421:
                        break
                    continue
                except (smtplib.SMTPException, OSError):
                    with history.lock:
                        history.unknown.add(test_id)
                    break
                with history.lock:
                    if code == 250:
                        history.acked[test_id] = reply.decode().rsplit(" ", 1)[-1]
                    else:
                        history.refused.add(test_id)
        finally:
            with contextlib.suppress(OSError):
                client.close()


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_no_acknowledged_message(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    rng = random.Random(20261125)
    relay = make_relay({"delivery": {"max_connections_per_destination": 5}})
    history = History()
    stop = threading.Event()
    threads = [
        threading.Thread(target=sender, args=(relay.port, f"s{i}", history, stop), daemon=True)
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    kills = 6
    for _ in range(kills):
        # A random moment within the flood: the point is to land anywhere in the write path.
        time.sleep(rng.uniform(0.2, 1.2))
        relay.kill()
        relay.start()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    relay.wait_queue_empty(timeout=60)

    delivered: Counter[str] = Counter()
    for message in sink.messages:
        match = _ID.search(message.data)
        assert match, message.data[:200]
        test_id = match.group(1).decode()
        assert message.data.endswith(f"end of {test_id}\r\n".encode()), "a torn body was sent"
        delivered[test_id] += 1

    sent = set(history.acked) | history.unknown | history.refused
    assert len(history.acked) > 200, "the load was too light to prove anything"
    lost = [i for i in history.acked if i not in delivered]
    assert not lost, f"{len(lost)} acknowledged messages lost: {lost[:10]}"
    assert set(delivered) <= sent, "delivered something that was never sent"
    assert not [i for i in history.refused if i in delivered], "a refused message was delivered"
    # Delivery is at least once: a kill between the next hop's 250 and the durable record of
    # it sends that message again after the restart, acknowledged or not (an unknown one, too:
    # CI saw one), and a message sent again can be caught by the next kill too (seen once: one
    # message delivered three times). The record waits for the next group commit
    # (Spool.mark_done: delivery does not wait for it), so a kill catches, per connection, the
    # delivery in flight and those finished since the last commit: a few, not one (CI saw 32
    # extra deliveries for 6 kills of 5 connections; 8-13 here on a quiet machine). A recovery
    # that dropped Done records sends hundreds again (837 when it dropped two thirds of them).
    duplicates = {i: n for i, n in delivered.items() if n > 1}
    extra = sum(n - 1 for n in duplicates.values())
    assert all(n - 1 <= kills for n in duplicates.values()), duplicates
    assert extra <= kills * 5 * 4, duplicates  # 5: max_connections_per_destination
    recoveries = relay.events("QueueRecovered")
    assert len(recoveries) == kills + 1
    print(
        f"\nacked={len(history.acked)} unknown={len(history.unknown)} "
        f"refused={len(history.refused)} delivered={sum(delivered.values())} "
        f"duplicates={sum(c - 1 for c in delivered.values() if c > 1)} "
        f"recovered={[r['messages'] for r in recoveries]}"
    )
