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
from typing import Any

import dkim
import pytest

from hamta.config import ConfigError, parse_config
from hamta.return_paths import SECRET_FILE, ReturnPaths
from tests.conftest import RelayFactory
from tests.support import DnsServer, RecordingSink
from tests.support.relay import RelayProcess
from tests.test_bounce_intake import DSN, signed_for
from tests.test_dkim import TxtDnsServer, keygen
from tests.test_suppression import CLIENT_HELO, FBL, REPORTS, arf_report, metric, rcpt, send

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
            "suppression": {**REPORTS, "bounces_address": BOUNCES},
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
            b'Content-Type: multipart/mixed; boundary="'
            + boundary
            + b'"\r\n\r\n--'
            + boundary
            + b"\r\n"
            + body
            + b"\r\n--"
            + boundary
            + b"--\r\n"
        )
    return b"From: robot@remote.test\r\nMIME-Version: 1.0\r\n" + body


def kept_reason(relay: RelayProcess, reply: str, event: str) -> str:
    """The reason a report was kept in quarantine (asserting it was, whole)."""
    match = re.match(r"^250 2\.0\.0 Ok: unreadable report kept as (\w+)$", reply)
    assert match is not None, reply
    (found,) = [e for e in relay.events(event) if e["queue_id"] == match.group(1)]
    assert Path(found["kept"]).is_file()
    return str(found["reason"])


@pytest.mark.parametrize(
    ("address", "event"), [(FBL, "ComplaintUnparsed"), (BOUNCES, "BounceUnparsed")]
)
def test_a_report_nested_1000_deep_is_kept_not_an_exception(
    relay: RelayProcess, address: str, event: str
) -> None:
    data = nested(1000, arf_report("deep@sink.test"))
    if address == BOUNCES:
        address = signed_for(relay, "deep@sink.test")
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
    data = DSN.replace(
        b"Final-Recipient: rfc822; full@sink.test",
        blocks + b"Final-Recipient: rfc822; full@sink.test",
    )
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=30) as client:
        client.ehlo()
        client.mail("")
        client.rcpt(signed_for(relay, "many0@sink.test"))
        code, text = client.data(data)
    assert time.monotonic() - started < 3
    reply = f"{code} {text.decode()}"
    assert "recipient fields" in kept_reason(relay, reply, "BounceUnparsed")
    assert rcpt(relay, "many0@sink.test")[0] == 250


# ------------------------------------------------------------- who may complain


def test_a_complaint_from_outside_the_complaint_networks_suppresses_nobody(
    make_relay: RelayFactory,
) -> None:
    relay = make_relay(
        {"suppression": {"complaints_address": FBL, "complaint_networks": ["198.18.0.0/15"]}}
    )
    reply = send(relay, FBL, arf_report("forged@sink.test"))
    assert re.match(r"^250 2\.0\.0 Ok: report read as \w+$", reply), reply
    assert rcpt(relay, "forged@sink.test")[0] == 250
    (event,) = relay.events("ComplaintUntrusted")
    assert event["client"] == "127.0.0.1"
    assert metric(relay, "hamta_complaints_untrusted_total") == 1
    assert not relay.events("Complaint")
    assert not (relay.spool / "quarantine").exists()  # a stranger's mail takes no disk


@pytest.fixture(scope="module")
def reporter_dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TxtDnsServer, Path]]:
    """A feedback loop's DKIM key (fbl.reporter.test), published by dnsmasq."""
    key, name, strings = keygen(
        tmp_path_factory.mktemp("reporter-key"), "fbl.reporter.test", "fbl1", "rsa-sha256"
    )
    with TxtDnsServer({name: strings}) as server:
        yield server, key


def signed(report: bytes, key: Path, domain: str = "fbl.reporter.test") -> bytes:
    """The report as the feedback loop sends it: DKIM-signed by ``domain`` (dkimpy)."""
    report = report.replace(b"From: <abusedesk@example.com>", f"From: <fbl@{domain}>".encode())
    signature: bytes = dkim.sign(report, b"fbl1", domain.encode(), key.read_bytes())
    return signature + report


def test_a_complaint_signed_by_a_reporter_domain_counts_from_anywhere(
    make_relay: RelayFactory, reporter_dns: tuple[TxtDnsServer, Path]
) -> None:
    server, key = reporter_dns
    relay = make_relay(
        {
            "dns": {"nameservers": [server.nameserver]},
            "suppression": {
                "complaints_address": FBL,
                "complaint_dkim_domains": ["FBL.Reporter.test"],
            },
        }
    )
    assert "complaint recorded" in send(relay, FBL, signed(arf_report("real@sink.test"), key))
    assert rcpt(relay, "real@sink.test")[0] == 550
    assert relay.events("Complaint")[0]["vouched_by"] == "dkim d=fbl.reporter.test"
    # Unsigned, tampered, or signed by a domain not listed: read, and nobody suppressed.
    tampered = signed(arf_report("victim1@sink.test"), key).replace(
        b"victim1@sink.test", b"victim2@sink.test"
    )
    other = signed(arf_report("victim3@sink.test"), key, domain="other.reporter.test")
    for data in (arf_report("victim0@sink.test"), tampered, other):
        assert "report read as" in send(relay, FBL, data)
    for number in range(4):
        assert rcpt(relay, f"victim{number}@sink.test")[0] == 250
    assert metric(relay, "hamta_complaints_untrusted_total") == 3


# ------------------------------------------------------------- signed return paths


def test_a_forged_dsn_suppresses_nobody(relay: RelayProcess) -> None:
    """Plain, VERP-tagged, wrongly signed, too old, or signed for someone else: no effect."""
    good = signed_for(relay, "gone@sink.test")
    day, _, rest = good.removeprefix("bounces+").split(".", 2)
    wrong_mac = f"bounces+{day}.{'0' * 16}.{rest}"
    too_old = signed_for(relay, "gone@sink.test", days_ago=8)  # kept: 7 days
    someone_else = signed_for(relay, "other@sink.test")
    for address, reason in (
        (BOUNCES, "not signed"),
        ("bounces+msg-4711@hamta.test", "not signed"),
        (wrong_mac, "bad signature"),
        (too_old, "signed 8 days ago, kept 7"),
        (someone_else, None),  # verifies, but for other@, not the gone@ the DSN names
    ):
        reply = send(relay, address, DSN, sender="")
        assert re.match(r"^250 2\.0\.0 Ok: bounce report read as \w+$", reply), reply
        if reason is not None:
            assert relay.events("BounceUnverified")[-1]["reason"] == reason
    assert rcpt(relay, "gone@sink.test")[0] == 250
    assert metric(relay, "hamta_async_bounces_unverified_total", reason="bad") == 1
    assert metric(relay, "hamta_async_bounces_unverified_total", reason="not") == 2
    assert metric(relay, "hamta_async_bounces_unverified_total", reason="signed") == 1
    # Only the DSN to other@'s return path was read, and it suppressed nobody.
    assert [e["newly_suppressed"] for e in relay.events("AsyncBounce")] == [False] * 3


def test_mail_from_the_bounces_address_gets_a_return_path_per_recipient(
    relay: RelayProcess, sink: RecordingSink
) -> None:
    sink.clear()
    recipients = ["one@sink.test", "Two@Sink.test", "three@other.test"]
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as client:
        assert not client.sendmail(
            "bounces+campaign-7@hamta.test", recipients, b"Subject: x\r\n\r\nx\r\n"
        )
        assert not client.sendmail("news@origin.test", recipients[:2], b"Subject: y\r\n\r\ny\r\n")
    assert sink.wait_for(4, timeout=15)
    by_sender: dict[str, list[str]] = {}
    for message in sink.messages:
        by_sender.setdefault(message.mail_from, []).extend(message.rcpt_tos)
    assert sorted(by_sender.pop("news@origin.test")) == ["Two@Sink.test", "one@sink.test"]
    assert sorted(by_sender.values()) == [
        ["Two@Sink.test"],
        ["one@sink.test"],
        ["three@other.test"],
    ]
    secret = (relay.spool / SECRET_FILE).read_bytes()
    paths = ReturnPaths(BOUNCES, secret, 7, time.time)
    for sender, (recipient,) in by_sender.items():
        verified = paths.verify(sender)
        assert not isinstance(verified, str), (sender, verified)
        assert verified.recipient == recipient.lower()
    assert (relay.spool / SECRET_FILE).stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------- the disk and the rate


def junk(size: int) -> bytes:
    """Mail that is no report: kept in quarantine when it comes to a verified address."""
    line = b"x" * 76 + b"\r\n"
    return b"Subject: junk\r\n\r\n" + line * (size // len(line))


def data_reply(relay: RelayProcess, recipient: str, message: bytes) -> tuple[int, str]:
    """The reply to RCPT if refused, else to DATA."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as client:
        client.ehlo()
        client.mail("")
        code, text = client.rcpt(recipient)
        if code == 250:
            code, text = client.data(message)
        return code, text.decode()


def test_the_quarantine_has_a_quota_and_relayed_mail_still_flows(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay(
        {
            "suppression": {
                "bounces_address": BOUNCES,
                "quarantine_max_files": 3,
                "quarantine_max_size": "40k",
            }
        }
    )
    address = signed_for(relay, "someone@sink.test")
    replies = [data_reply(relay, address, junk(4000))[0] for _ in range(5)]
    assert replies == [250, 250, 250, 452, 452]
    assert data_reply(relay, address, junk(4000)) == (
        452,
        "4.3.4 Too many unreadable reports kept, try again later",
    )
    assert len(list((relay.spool / "quarantine").glob("*.eml"))) == 3
    assert (
        "quarantine full: 3 reports kept, at most 3" in relay.events("ReportNotKept")[-1]["error"]
    )
    sink.clear()
    send(relay, "still@sink.test", b"Subject: real mail\r\n\r\nflows\r\n")
    assert sink.wait_for(1, timeout=15)
    big = make_relay(
        {"suppression": {"bounces_address": BOUNCES, "quarantine_max_size": "40k"}}, name="big"
    )
    assert data_reply(big, signed_for(big, "someone@sink.test"), junk(50_000))[0] == 452


def test_kept_reports_are_swept_after_the_retention(make_relay: RelayFactory) -> None:
    relay = make_relay({"suppression": {"bounces_address": BOUNCES, "quarantine_retention": "2s"}})
    reply = send(relay, signed_for(relay, "someone@sink.test"), junk(1000), sender="")
    kept = Path(kept_reason_event(relay, reply)["kept"])
    assert kept.is_file()
    deadline = time.monotonic() + 15
    while kept.exists():
        assert time.monotonic() < deadline, "not swept"
        time.sleep(0.1)
    (event,) = relay.events("QuarantineSwept")
    assert event["files"] == [kept.name]


def kept_reason_event(relay: RelayProcess, reply: str) -> dict[str, Any]:
    """The BounceUnparsed event of a report kept in quarantine."""
    match = re.match(r"^250 2\.0\.0 Ok: unreadable report kept as (\w+)$", reply)
    assert match is not None, reply
    (found,) = [e for e in relay.events("BounceUnparsed") if e["queue_id"] == match.group(1)]
    return found


def test_reports_are_rate_limited_per_client(make_relay: RelayFactory) -> None:
    relay = make_relay(
        {
            "suppression": {
                "bounces_address": BOUNCES,
                "complaints_address": FBL,
                "report_rate_per_client": 3,
            }
        }
    )
    address = signed_for(relay, "someone@sink.test")
    codes = [data_reply(relay, target, junk(500))[0] for target in (address, FBL, address, FBL)]
    assert codes == [250, 250, 250, 450]
    assert data_reply(relay, BOUNCES, junk(500)) == (
        450,
        "4.7.1 Too many reports from your address, try again later",
    )
    assert relay.events("ReportRateLimited")[0]["client"] == "127.0.0.1"
    assert relay.events("ComplaintsIgnored")  # no reporter is trusted: said at activation
    assert rcpt(relay, "someone@sink.test")[0] == 250  # relayed mail is not limited
    # A configured complaint network (the feedback loops) is not limited.
    loop = make_relay({"suppression": {**REPORTS, "report_rate_per_client": 1}}, name="loop")
    assert [data_reply(loop, FBL, junk(500))[0] for _ in range(3)] == [250, 250, 250]


def test_bad_settings_are_named() -> None:
    bad = {
        'complaint_dkim_domains = ["not a domain"]': "not a domain: 'not a domain'",
        'complaint_networks = ["10.0.0.0/33"]': "suppression.complaint_networks.0",
        "report_max_recipients = 0": "greater than or equal to 1",
        "bounce_address_days = 0": "greater than or equal to 1",
        'quarantine_retention = "soon"': "not a duration: 'soon'",
        "report_rate_per_client = 0": "greater than 0",
    }
    for line, message in bad.items():
        with pytest.raises(ConfigError) as error:
            parse_config(f"[suppression]\n{line}\n")
        assert message in str(error.value), (line, str(error.value))
    with pytest.raises(ConfigError, match=r"delivery\.dsn_window"):
        parse_config('[delivery]\ndsn_window = "-1s"\n')
