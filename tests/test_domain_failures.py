"""A DNS answer does not suppress a domain's users: NXDOMAIN bounces, suppresses only if it goes on.

A real relay and the test DNS (names it does not know are NXDOMAIN); the suppression list in a
real SQLite file, including one written before entries could expire.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

from hamta.suppression import DomainFailurePolicy, SuppressionStore
from tests.conftest import RelayFactory
from tests.support import RecordingSink
from tests.test_delivery import send
from tests.test_suppression import rcpt


def test_nxdomain_bounces_but_suppresses_nobody(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay()
    send(relay.port, "sender@sink.test", ["user@outage.test"])
    assert sink.wait_for(1, timeout=15)  # the DSN
    bounce = relay.wait_events("Bounce")[0]
    assert bounce["enhanced_code"] == "5.1.2"
    relay.wait_queue_empty()
    assert rcpt(relay, "user@outage.test")[0] == 250  # was 550 5.1.1, for ever


def test_a_domain_failing_for_the_period_suppresses_for_a_while(make_relay: RelayFactory) -> None:
    relay = make_relay(
        {"suppression": {"domain_failure_period": "1s", "domain_failure_expiry": "3s"}}
    )
    deadline = time.monotonic() + 20
    sent = 0
    while True:
        send(relay.port, "", ["user@gone.test"])
        sent += 1
        relay.wait_events("Bounce", count=sent)
        relay.wait_queue_empty()
        code, text = rcpt(relay, "user@gone.test")
        if code != 250:
            break
        assert time.monotonic() < deadline, "never suppressed"
    assert sent >= 2  # one failure, however recent, suppresses nobody
    assert code == 550
    assert re.match(
        r"^5\.1\.2 <user@gone\.test>: recipient suppressed \(its domain failing since "
        r"\d{4}-\d\d-\d\d, until \d{4}-\d\d-\d\d\)$",
        text,
    ), text
    # And it expires.
    while rcpt(relay, "user@gone.test")[0] != 250:
        assert time.monotonic() < deadline + 10, "never expired"
        time.sleep(0.2)


def test_a_list_written_before_expiry_opens_and_migrates(tmp_path: Path) -> None:
    path = tmp_path / "suppression.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE suppression (address TEXT PRIMARY KEY, reason TEXT NOT NULL, "
        "created REAL NOT NULL, detail TEXT NOT NULL DEFAULT '') WITHOUT ROWID;"
        "CREATE TABLE complaint_domain (domain TEXT PRIMARY KEY, complaints INTEGER NOT NULL)"
        " WITHOUT ROWID;"
        "INSERT INTO suppression VALUES ('old@sink.test', 'hard-bounce', 1700000000, 'x');"
    )
    old.commit()
    old.close()
    store = SuppressionStore(path)
    entry = store.get("old@sink.test")
    assert entry is not None and entry.reason == "hard-bounce" and entry.expires is None
    now = time.time()
    _, added = store.add("new@sink.test", "domain-failure", "dns", when=now, expires=now + 60)
    assert added and store.get("new@sink.test") is not None
    assert store.get("new@sink.test", now + 61) is None  # expired: not suppressed
    # An expired entry is replaced by a new one, not kept.
    later = now + 120
    entry, added = store.add("new@sink.test", "hard-bounce", "mx said so", when=later)
    assert added and entry.reason == "hard-bounce" and entry.expires is None
    store.close()
    again = SuppressionStore(path)  # migrated once; opening again changes nothing
    assert [e.address for e in again.entries()] == ["old@sink.test", "new@sink.test"]
    # prune(before): entries expired and failure records last seen before it, nothing else.
    policy = DomainFailurePolicy(period=10, expiry=100)
    assert again.domain_failed("gone@nx.test", now, policy) is None
    assert again.add("soon@sink.test", "domain-failure", when=now, expires=now + 5)[1]
    assert again.prune(now - 10) == 0  # nothing that old
    assert again.prune(now + 3) == 1  # gone@'s record, last seen at now; soon@ expires at +5
    assert again.prune(now + 10) == 1  # soon@ has expired by then
    assert [e.address for e in again.entries()] == ["old@sink.test", "new@sink.test"]
    again.close()
