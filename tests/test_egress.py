"""Egress sources and pools: mail leaves from the chosen address with its EHLO name."""

from __future__ import annotations

import smtplib
import time
from collections import Counter
from typing import Any

import pytest
from pydantic import ValidationError

from hamta.egress import Egress, EgressConfig, address_missing
from tests.conftest import RelayFactory
from tests.support import RecordingSink

# Loopback addresses every Linux host has (127.0.0.0/8 is on lo), and one it has not.
SOURCES: dict[str, Any] = {
    "a": {"address": "127.0.0.21", "ehlo_name": "a.egress.test"},
    "b": {"address": "127.0.0.22", "ehlo_name": "b.egress.test", "weight": 3},
    "gone": {"address": "192.0.2.55", "ehlo_name": "gone.egress.test"},
}
EGRESS: dict[str, Any] = {
    "sources": SOURCES,
    "pools": {
        "main": {"sources": ["a"]},
        "bulk": {"sources": ["b"]},
        "moved": {"sources": ["gone"]},
    },
    "default_pool": "main",
    "domains": {"bulk.example": "bulk", "moved.example": "moved"},
}


def _send(port: int, sender: str, rcpt: str, headers: str = "") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(sender, [rcpt], f"Subject: s\r\n{headers}\r\nbody\r\n".encode())


def test_mail_leaves_from_the_pool_of_its_domain_or_header(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay({"delivery": {"egress": EGRESS}})
    _send(relay.port, "x@other.example", "one@sink.test")  # default pool: a
    _send(relay.port, "x@bulk.example", "two@sink.test")  # its domain's pool: b
    _send(relay.port, "x@other.example", "three@sink.test", "X-Hamta-Pool: bulk\r\n")
    assert sink.wait_for(3, timeout=15)
    seen = {m.rcpt_tos[0]: m for m in sink.messages}
    assert (seen["one@sink.test"].peer_host, seen["one@sink.test"].ehlo) == (
        "127.0.0.21",
        "a.egress.test",
    )
    for rcpt in ("two@sink.test", "three@sink.test"):
        assert (seen[rcpt].peer_host, seen[rcpt].ehlo) == ("127.0.0.22", "b.egress.test")
    # The pool header is ours: stripped, the rest of the message as it was.
    assert b"X-Hamta-Pool" not in seen["three@sink.test"].data
    assert b"Subject: s\r\n" in seen["three@sink.test"].data
    events = {e["recipient"]: e for e in relay.wait_events("Delivery", 3)}
    assert events["three@sink.test"]["egress_source"] == "b"
    assert events["three@sink.test"]["egress_pool"] == "pool bulk by header"
    assert events["one@sink.test"]["egress_address"] == "127.0.0.21"
    assert relay.metric("hamta_egress_deliveries_total", source="b", outcome="delivery") == 2
    # The test DNS has no PTR for these addresses: warned about at start, and mail went.
    warnings = relay.wait_events("EgressPtrMismatch", 3)
    assert any("no PTR for 127.0.0.21" in w["warning"] for w in warnings)


def test_a_source_not_on_this_host_defers_with_its_reason(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay({"delivery": {"egress": EGRESS}})
    _send(relay.port, "x@moved.example", "later@sink.test")
    _send(relay.port, "x@other.example", "now@sink.test")  # the same destination still goes
    failure = relay.wait_events("TransientFailure")[0]
    assert "egress address 192.0.2.55 is not configured on this host" in failure["response"]
    assert failure["egress_source"] == "gone"
    assert failure["enhanced_code"] == "4.4.3"
    assert sink.wait_for(1, timeout=15)
    assert [m.rcpt_tos for m in sink.messages] == [("now@sink.test",)]
    # Kept for later, not lost. The sink has the other message a moment before the relay has
    # taken its 250 off the queue: wait for that, not for a fixed time.
    deadline = time.monotonic() + 15
    while relay.queue()["depth"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert relay.queue()["depth"] == 1


def test_weights_share_messages_deterministically() -> None:
    config = EgressConfig.model_validate(
        {"sources": SOURCES, "pools": {"p": {"sources": ["a", "b"]}}, "default_pool": "p"}
    )
    egress = Egress(config)
    picks = Counter(egress.choose(f"q{i}", "s@d.example", None)[0].name for i in range(4000))
    assert 850 < picks["a"] < 1150 and 2850 < picks["b"] < 3150, picks  # weights 1 and 3
    first = egress.choose("q7", "s@d.example", None)
    assert all(egress.choose("q7", "s@d.example", None) == first for _ in range(5))


def test_header_parsing_and_stripping_keep_every_other_byte() -> None:
    egress = Egress(EgressConfig.model_validate(EGRESS))
    body = b"Subject: a\r\nx-hamta-pool:\r\n bulk\r\nTo: b\r\n\r\nX-Hamta-Pool: main\r\n"
    assert egress.header_pool(body) == "bulk"
    assert egress.strip(body) == b"Subject: a\r\nTo: b\r\n\r\nX-Hamta-Pool: main\r\n"
    assert egress.header_pool(b"no header block") is None
    source, why = egress.choose("q", "s@x.example", "nosuch")
    assert source.name == "a" and "unknown pool 'nosuch'" in why


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"default_pool": None}, "default_pool must name"),
        ({"default_pool": "nosuch"}, "default_pool 'nosuch' names pool 'nosuch', not defined"),
        ({"pools": {"main": {"sources": ["zz"]}}}, "unknown sources: zz"),
        ({"domains": {"d.example": "nosuch"}}, "names pool 'nosuch'"),
        ({"sources": {**SOURCES, "c": {"address": "127.0.0.21", "ehlo_name": "c.x"}}}, "same"),
        ({"sources": {"a": {"address": "1.2.3.4", "ehlo_name": "not a name"}}}, "ehlo_name"),
        ({"header": "Bad: header"}, "not a header field name"),
    ],
)
def test_bad_configuration_is_refused_clearly(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        EgressConfig.model_validate({**EGRESS, **change})


def test_address_missing_names_an_address_this_host_lacks() -> None:
    assert address_missing("127.0.0.21") is None
    assert (
        address_missing("192.0.2.55") == "egress address 192.0.2.55 is not configured on this host"
    )
