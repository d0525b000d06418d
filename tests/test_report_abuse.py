"""The report addresses cannot be turned against anyone: forged, huge, deep or many reports.

Real relays, real SMTP clients (smtplib): what a stranger can send to the complaints and bounces
addresses must neither suppress recipients it names nor take the relay's CPU, disk or exceptions.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import DnsServer
from tests.support.relay import RelayProcess
from tests.test_bounce_intake import DSN
from tests.test_suppression import CLIENT_HELO, FBL, arf_report, rcpt, send

BOUNCES = "bounces@hamta.test"


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DnsServer, mx_port: int
) -> Iterator[RelayProcess]:
    """A relay with both report addresses."""
    process = RelayProcess(
        tmp_path_factory.mktemp("abuse"),
        {
            "dns": {"nameservers": [dns_server.nameserver]},
            "delivery": {"port": mx_port},
            "suppression": {"complaints_address": FBL, "bounces_address": BOUNCES},
        },
    )
    process.start()
    yield process
    process.stop()


def nested(depth: int, inner: bytes) -> bytes:
    """``inner`` wrapped in ``depth`` multipart/mixed parts."""
    body = inner
    for level in range(depth):
        boundary = f"b{level}".encode()
        body = (
            b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n--' + boundary
            + b"\r\n" + body + b"\r\n--" + boundary + b"--\r\n"
        )  # fmt: skip
    return b"From: robot@remote.test\r\nMIME-Version: 1.0\r\n" + body


def kept_reason(relay: RelayProcess, reply: str, event: str) -> str:
    """The reason a report was kept in quarantine (asserting it was, whole)."""
    match = re.match(r"^250 2\.0\.0 Ok: unreadable report kept as (\w+)$", reply)
    assert match is not None, reply
    (found,) = [e for e in relay.events(event) if e["queue_id"] == match.group(1)]
    assert Path(found["kept"]).is_file()
    return str(found["reason"])


@pytest.mark.parametrize(("address", "event"), [(FBL, "ComplaintUnparsed"),
                                                (BOUNCES, "BounceUnparsed")])  # fmt: skip
def test_a_report_nested_1000_deep_is_kept_not_an_exception(
    relay: RelayProcess, address: str, event: str
) -> None:
    data = nested(1000, arf_report("deep@sink.test"))
    reply = send(relay, address, data, sender="")
    assert "nested MIME parts" in kept_reason(relay, reply, event)
    assert rcpt(relay, "deep@sink.test")[0] == 250


def test_an_arf_naming_5000_recipients_suppresses_none(relay: RelayProcess) -> None:
    many = "".join(f"Original-Rcpt-To: <victim{n}@sink.test>\r\n" for n in range(5000))
    data = arf_report("victim-first@sink.test").replace(
        b"Arrival-Date:", many.encode() + b"Arrival-Date:"
    )
    started = time.monotonic()
    reply = send(relay, FBL, data)
    assert time.monotonic() - started < 2
    assert "suspicious" in kept_reason(relay, reply, "ComplaintUnparsed")
    for address in ("victim-first@sink.test", "victim0@sink.test", "victim4999@sink.test"):
        assert rcpt(relay, address)[0] == 250


def test_an_arf_naming_a_few_more_than_the_limit_is_kept(relay: RelayProcess) -> None:
    """Past the limit (10) but under the pre-parse measure: counted after parsing."""
    extra = "".join(f"Original-Rcpt-To: <few{n}@sink.test>\r\n" for n in range(12))
    data = arf_report("few-first@sink.test").replace(
        b"Arrival-Date:", extra.encode() + b"Arrival-Date:"
    )
    reason = kept_reason(relay, send(relay, FBL, data), "ComplaintUnparsed")
    assert reason == "suspicious: 13 recipients, at most 10", reason
    assert rcpt(relay, "few0@sink.test")[0] == 250


def test_a_dsn_naming_20000_recipients_is_kept_unread(relay: RelayProcess) -> None:
    block = (
        "Final-Recipient: rfc822; many{n}@sink.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 unknown user\r\n\r\n"
    )
    blocks = "".join(block.format(n=n) for n in range(20000)).encode()
    data = DSN.replace(b"Final-Recipient: rfc822; full@sink.test", blocks +
                       b"Final-Recipient: rfc822; full@sink.test")  # fmt: skip
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=30) as client:
        client.ehlo()
        client.mail("")
        client.rcpt(BOUNCES)
        code, text = client.data(data)
    assert time.monotonic() - started < 3
    reply = f"{code} {text.decode()}"
    assert "recipient fields" in kept_reason(relay, reply, "BounceUnparsed")
    assert rcpt(relay, "many0@sink.test")[0] == 250
