"""Suppression and complaints: real relays, real SMTP clients, ARF reports, the CLI both ways.

A recipient is suppressed by a hard bounce of the InvalidRecipient class (the recording sink's
``reject*`` mailboxes answer ``550 5.1.1``), by a complaint (an RFC 5965 feedback report mailed to
the complaints address) or by ``hamta suppression add``; RCPT to it is then refused with a 5xx
saying why. The list lives on the spool, so it survives a restart on the same spool.
"""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RelayFactory
from tests.support import DnsServer, RecordingSink
from tests.support.relay import RelayProcess

FBL = "fbl@hamta.test"
# The complaints address, with the tests' client (loopback) as a trusted reporter network.
REPORTS = {"complaints_address": FBL, "complaint_networks": ["127.0.0.0/8"]}
CLIENT_HELO = "client.origin.test"
TODAY = datetime.now(UTC).strftime("%Y-%m-%d")


def arf_report(
    recipient: str | None,
    *,
    original_to: str = "<Undisclosed Recipients>",
    feedback_type: str = "abuse",
    headers_only: bool = False,
) -> bytes:
    """A feedback report in the shape of RFC 5965's appendix B.2 example."""
    rcpt_to = f"Original-Rcpt-To: <{recipient}>\r\n" if recipient else ""
    original_type = "text/rfc822-headers" if headers_only else "message/rfc822"
    body = "" if headers_only else "\r\nSpam Spam Spam\r\nSpam Spam Spam\r\n"
    return (
        "From: <abusedesk@example.com>\r\n"
        "Date: Thu, 8 Mar 2005 17:40:36 EDT\r\n"
        "Subject: FW: Earn money\r\n"
        f"To: <{FBL}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=feedback-report;\r\n"
        '     boundary="part1_13d.2e68ed54_boundary"\r\n'
        "\r\n"
        "--part1_13d.2e68ed54_boundary\r\n"
        'Content-Type: text/plain; charset="US-ASCII"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "This is an email abuse report for an email message received from IP\r\n"
        "192.0.2.1 on Thu, 8 Mar 2005 14:00:00 EDT.  For more information\r\n"
        "about this format please see http://www.mipassoc.org/arf/.\r\n"
        "\r\n"
        "--part1_13d.2e68ed54_boundary\r\n"
        "Content-Type: message/feedback-report\r\n"
        "\r\n"
        f"Feedback-Type: {feedback_type}\r\n"
        "User-Agent: SomeGenerator/1.0\r\n"
        "Version: 1\r\n"
        "Original-Mail-From: <somespammer@example.net>\r\n"
        f"{rcpt_to}"
        "Arrival-Date: Thu, 8 Mar 2005 14:00:00 EDT\r\n"
        "Reporting-MTA: dns; mail.example.com\r\n"
        "Source-IP: 192.0.2.1\r\n"
        "Authentication-Results: mail.example.com;\r\n"
        "               spf=fail smtp.mail=somespammer@example.com\r\n"
        "Reported-Domain: example.net\r\n"
        "Reported-Uri: http://example.net/earn_money.html\r\n"
        "\r\n"
        "--part1_13d.2e68ed54_boundary\r\n"
        f"Content-Type: {original_type}\r\n"
        "Content-Disposition: inline\r\n"
        "\r\n"
        "From: <somespammer@example.net>\r\n"
        "Received: from mailserver.example.net (mailserver.example.net\r\n"
        "        [192.0.2.1]) by example.com with ESMTP id M63d4137594e46;\r\n"
        "        Thu, 08 Mar 2005 14:00:00 -0400\r\n"
        f"To: {original_to}\r\n"
        "Subject: Earn money\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-type: text/plain\r\n"
        "Message-ID: <8787KJKJ3K4J3K4J3K4J3.mail@example.net>\r\n"
        "Date: Thu, 02 Sep 2004 12:31:03 -0500\r\n"
        f"{body}"
        "\r\n"
        "--part1_13d.2e68ed54_boundary--\r\n"
    ).encode()


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DnsServer, mx_port: int
) -> Iterator[RelayProcess]:
    """A relay with a complaints address."""
    process = RelayProcess(
        tmp_path_factory.mktemp("suppression"),
        {
            "dns": {"nameservers": [dns_server.nameserver]},
            "delivery": {"port": mx_port},
            "suppression": REPORTS,
        },
    )
    process.start()
    yield process
    process.stop()


def rcpt(relay: RelayProcess, recipient: str, sender: str = "a@origin.test") -> tuple[int, str]:
    """MAIL and RCPT on a fresh session; the RCPT reply."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as client:
        client.ehlo()
        code, _ = client.mail(sender)
        assert code == 250
        code, text = client.rcpt(recipient)
        return code, text.decode()


def send(relay: RelayProcess, recipient: str, message: bytes, sender: str = "a@x.test") -> str:
    """One message; the reply to DATA (which must be 250)."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as client:
        client.ehlo()
        assert client.mail(sender)[0] == 250
        code, text = client.rcpt(recipient)
        assert code == 250, text
        code, text = client.data(message)
        assert code == 250, text
        return f"{code} {text.decode()}"


def wait_refused(relay: RelayProcess, recipient: str, timeout: float = 15.0) -> str:
    """Poll RCPT until the recipient is refused; the refusal."""
    deadline = time.monotonic() + timeout
    while True:
        code, text = rcpt(relay, recipient)
        if code != 250:
            return f"{code} {text}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{recipient} still accepted after {timeout}s")
        time.sleep(0.05)


def metric(relay: RelayProcess, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    status, body = relay.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def cli(relay: RelayProcess, *args: str) -> tuple[int, str, str]:
    """``hamta suppression ...`` against the relay's configuration."""
    result = relay.cli("suppression", *args, "--config", str(relay.config_path))
    return result.returncode, result.stdout, result.stderr


# ------------------------------------------------------------------ hard bounces


def test_hard_bounce_of_an_unknown_recipient_suppresses_it(
    relay: RelayProcess, sink: RecordingSink
) -> None:
    send(relay, "reject-gone@sink.test", b"Subject: one\r\n\r\nbody\r\n")
    relay.wait_events("Bounce")
    refusal = wait_refused(relay, "reject-gone@sink.test")
    assert refusal == (
        f"550 5.1.1 <reject-gone@sink.test>: recipient suppressed (hard bounce on {TODAY})"
    )
    # Case does not get a suppressed recipient through.
    assert rcpt(relay, "Reject-Gone@SINK.test")[0] == 550
    (event,) = [e for e in relay.events("Suppressed") if e["recipient"] == "reject-gone@sink.test"]
    assert event["reason"] == "hard-bounce"
    assert event["detail"].startswith("InvalidRecipient: 550 5.1.1")
    assert rcpt(relay, "other@sink.test")[0] == 250
    relay.wait_queue_empty()


def test_a_soft_bounce_suppresses_nothing(relay: RelayProcess, sink: RecordingSink) -> None:
    send(relay, "full-box@sink.test", b"Subject: full\r\n\r\nbody\r\n")
    relay.wait_queue_empty()  # 552 5.2.2: bounced, but the mailbox exists
    assert rcpt(relay, "full-box@sink.test")[0] == 250


# -------------------------------------------------------------------- complaints


def test_arf_complaint_suppresses_the_recipient_and_is_counted(relay: RelayProcess) -> None:
    before = metric(relay, "hamta_complaints_total", domain="sink.test")
    reply = send(relay, FBL, arf_report("victim@sink.test"), sender="fbl-robot@example.com")
    assert re.match(r"^250 2\.0\.0 Ok: complaint recorded as \w+$", reply), reply
    # Recorded before the 250: refused at once, no polling.
    code, text = rcpt(relay, "victim@sink.test")
    assert (code, text) == (
        550,
        f"5.7.1 <victim@sink.test>: recipient suppressed (complaint on {TODAY})",
    )
    events = [e for e in relay.events("Complaint") if e["recipient"] == "victim@sink.test"]
    (event,) = events
    assert event["domain"] == "sink.test"
    assert event["feedback_type"] == "abuse"
    assert event["original_sender"] == "somespammer@example.net"
    assert event["original_message_id"] == "<8787KJKJ3K4J3K4J3K4J3.mail@example.net>"
    assert event["reporting_mta"] == "dns; mail.example.com"
    assert event["source_ip"] == "192.0.2.1"
    assert metric(relay, "hamta_complaints_total", domain="sink.test") == before + 1
    # Consumed, never relayed: nothing was queued for the complaints address.
    assert relay.queue()["depth"] == 0


def test_complaint_without_original_rcpt_to_uses_the_original_to(relay: RelayProcess) -> None:
    report = arf_report(None, original_to="Some One <Some.One@other.test>", headers_only=True)
    reply = send(relay, FBL, report)
    assert "complaint recorded" in reply
    assert rcpt(relay, "some.one@other.test")[0] == 550


def test_malformed_reports_are_kept_in_quarantine(relay: RelayProcess) -> None:
    not_arf = b"From: someone@example.com\r\nSubject: unsubscribe me\r\n\r\nplease\r\n"
    no_recipient = arf_report(None)  # the original's To: is "<Undisclosed Recipients>"
    for data, reason in (
        (not_arf, "not an ARF report: text/plain"),
        (no_recipient, "unusable recipient 'undisclosed recipients'"),
    ):
        reply = send(relay, FBL, data)
        match = re.match(r"^250 2\.0\.0 Ok: unreadable report kept as (\w+)$", reply)
        assert match is not None, reply
        qid = match.group(1)
        events = [e for e in relay.events("ComplaintUnparsed") if e["queue_id"] == qid]
        (event,) = events
        assert reason in event["reason"], event
        kept = Path(event["kept"])
        assert kept == relay.spool / "quarantine" / f"{qid}.eml"
        # Kept whole, exactly as received (smtplib sent these bytes).
        assert kept.read_bytes() == data
    assert relay.queue()["depth"] == 0


def test_not_spam_report_suppresses_nobody(relay: RelayProcess) -> None:
    reply = send(relay, FBL, arf_report("liked@sink.test", feedback_type="not-spam"))
    assert "not-spam report read" in reply
    assert rcpt(relay, "liked@sink.test")[0] == 250


def test_the_complaints_address_takes_no_other_recipient(relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as client:
        client.ehlo()
        client.mail("a@x.test")
        assert client.rcpt(FBL)[0] == 250
        code, text = client.rcpt("someone@sink.test")
        assert (code, text.decode()) == (
            452,
            "4.5.3 Reports (feedback, bounces) are taken one recipient per transaction",
        )


def test_complaint_domains_beyond_the_top_20_are_other(make_relay: RelayFactory) -> None:
    relay = make_relay({"suppression": REPORTS})
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as client:
        for number in range(22):
            refused = client.sendmail("robot@x.test", [FBL], arf_report(f"u@d{number:02}.test"))
            assert not refused
        # d00 ranks first again with its second complaint.
        assert not client.sendmail("robot@x.test", [FBL], arf_report("v@d00.test"))
    _, body = relay.get("/metrics")
    samples = {
        s.labels["domain"]: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "hamta_complaints_total"
    }
    assert samples["other"] == 2  # d20 and d21 came after 20 domains with as many
    assert samples["d00.test"] == 2
    assert len(samples) == 21, samples


def test_reports_come_from_outside_the_relay_networks(make_relay: RelayFactory) -> None:
    relay = make_relay({"smtp": {"relay_networks": ["198.18.0.0/15"]}, "suppression": REPORTS})
    code, text = rcpt(relay, "someone@sink.test")
    assert (code, text) == (554, "5.7.1 Relay access denied")
    assert "complaint recorded" in send(relay, FBL, arf_report("far@sink.test"))


# ------------------------------------------------------------------ persistence


def test_suppression_survives_a_restart_on_the_same_spool(make_relay: RelayFactory) -> None:
    relay = make_relay({"suppression": REPORTS})
    send(relay, FBL, arf_report("kept@sink.test"))
    relay.kill()  # no graceful close: the 250 came after the commit was durable
    relay.start()
    code, text = rcpt(relay, "kept@sink.test")
    assert (code, text) == (
        550,
        f"5.7.1 <kept@sink.test>: recipient suppressed (complaint on {TODAY})",
    )
    assert (relay.spool / "suppression.sqlite").exists()


# ------------------------------------------------------------------------- CLI


def entries(output: str) -> list[str]:
    """The addresses of ``hamta suppression list``'s table."""
    return [line.split()[0] for line in output.splitlines()[2:] if line.strip()]


def test_cli_with_the_relay_running_and_stopped(make_relay: RelayFactory) -> None:
    relay = make_relay()
    code, out, err = cli(relay, "add", "Manual@Sink.test", "--detail", "asked to be removed")
    assert code == 0, err
    assert out.startswith(f"suppressed: manual@sink.test (manual on {TODAY}) [relay at")
    assert rcpt(relay, "manual@sink.test") == (
        550,
        f"5.7.1 <manual@sink.test>: recipient suppressed (added by an operator on {TODAY})",
    )
    code, out, _ = cli(relay, "list")
    assert code == 0 and "relay at" in out.splitlines()[0]
    assert entries(out) == ["manual@sink.test"]
    assert "asked to be removed" in out
    code, out, _ = cli(relay, "add", "manual@sink.test")
    assert out.startswith("already suppressed: manual@sink.test")
    code, out, _ = cli(relay, "remove", "manual@sink.test")
    assert (code, out.split(" [")[0]) == (0, "removed: manual@sink.test")
    assert rcpt(relay, "manual@sink.test")[0] == 250

    relay.stop()
    code, out, err = cli(relay, "add", "offline@sink.test")
    assert code == 0, err
    assert "no relay active" in out
    code, out, _ = cli(relay, "list", "--json")
    assert '"address": "offline@sink.test"' in out
    relay.start()
    assert rcpt(relay, "offline@sink.test")[0] == 550
    code, out, _ = cli(relay, "list")
    assert entries(out) == ["offline@sink.test"]
    relay.stop()
    code, out, _ = cli(relay, "remove", "offline@sink.test")
    assert out.startswith("removed: offline@sink.test [spool")
    relay.start()
    assert rcpt(relay, "offline@sink.test")[0] == 250


def test_cli_refuses_bad_input(make_relay: RelayFactory, tmp_path: Path) -> None:
    relay = make_relay()
    code, _, err = cli(relay, "add", "not-an-address")
    assert code == 1 and "not an address" in err
    code, _, err = cli(relay, "remove")
    assert code == 2 and "needs an ADDRESS" in err
    relay.stop()
    code, _, err = cli(relay, "list", "--spool", str(tmp_path / "nowhere"))
    assert code == 1 and "no spool at" in err


def test_control_reply_shape(relay: RelayProcess) -> None:
    """The control socket's list reply, as the CLI and the agent would read it."""
    from hamta.control_client import send_command  # noqa: PLC0415

    reply: dict[str, Any] = send_command(relay.control, {"command": "suppression-list"})
    assert reply["ok"] is True
    for entry in reply["entries"]:
        assert set(entry) == {"address", "reason", "created", "detail", "expires", "date"}


def test_parser_names_what_is_missing() -> None:
    """The reasons a ComplaintUnparsed event gives, from the parser itself."""
    from hamta.complaints import ComplaintParseError, parse_feedback_report  # noqa: PLC0415

    two = arf_report(None, original_to="a@sink.test, b@sink.test")
    with pytest.raises(ComplaintParseError, match="original has 2 To: addresses"):
        parse_feedback_report(two)
    no_to = arf_report(None).replace(b"To: <Undisclosed Recipients>\r\n", b"")
    with pytest.raises(ComplaintParseError, match="no recipient"):
        parse_feedback_report(no_to)
    no_part = arf_report("x@sink.test").replace(b"message/feedback-report", b"text/plain")
    with pytest.raises(ComplaintParseError, match="no message/feedback-report part"):
        parse_feedback_report(no_part)
    report = parse_feedback_report(arf_report("X@Sink.Test"))
    assert report.recipients == ("x@sink.test",)
    assert report.reported_domains == ("example.net",)
