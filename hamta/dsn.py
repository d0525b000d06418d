"""Delivery status notifications (RFC 3464) for mail that failed for good.

A DSN is a multipart/report with a human-readable part, a message/delivery-status part (one
block per failed recipient) and the original headers as text/rfc822-headers. It goes from the null
sender to the original envelope sender; mail from the null sender never gets one (RFC 5321 6.1),
which is what keeps two relays from bouncing a bounce between them forever.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient that failed, and why."""

    address: str
    status: str  # enhanced status code, e.g. 5.1.1
    diagnostic: str  # the remote reply or our own reason
    remote_mta: str = ""


def original_headers(body: bytes) -> bytes:
    """The header block of a message (up to the first empty line)."""
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[: end + 2]


def build_dsn(
    *,
    reporting_mta: str,
    queue_id: str,
    original_sender: str,
    arrival: float,
    failed: list[FailedRecipient],
    headers: bytes,
    expired: bool = False,
    now: float,
) -> bytes:
    """Render the DSN for ``failed`` recipients of one message, as CRLF bytes ready to queue."""
    report = EmailMessage(policy=SMTP)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = original_sender
    report["Subject"] = (
        "Undelivered Mail Returned to Sender (delivery time expired)"
        if expired
        else "Undelivered Mail Returned to Sender"
    )
    report["Date"] = format_datetime(datetime.fromtimestamp(now, UTC))
    report["Message-ID"] = email.utils.make_msgid(idstring=queue_id, domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients."
        if not expired
        else "Your message could not be delivered before its time in the queue ran out.",
        "",
    ]
    for item in failed:
        lines.append(f"<{item.address}>: {item.diagnostic}")
    report.set_content("\n".join(lines) + "\n")
    report.make_mixed()
    report.replace_header("Content-Type", 'multipart/report; report-type="delivery-status"')
    status = Message()
    status.set_type("message/delivery-status")
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["X-Hamta-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = format_datetime(datetime.fromtimestamp(arrival, UTC))
    status.attach(per_message)
    for item in failed:
        block = Message()
        block["Final-Recipient"] = _address_field(item.address)
        block["Action"] = "failed"
        block["Status"] = item.status
        if item.remote_mta:
            block["Remote-MTA"] = f"dns; {item.remote_mta}"
        block["Diagnostic-Code"] = f"smtp; {_ascii(_one_line(item.diagnostic))}"
        status.attach(block)
    report.attach(status)  # type: ignore[arg-type]  # any Message is a valid part
    rfc822 = Message()
    rfc822.set_type("text/rfc822-headers")
    text = headers.decode("utf-8", errors="replace")
    # RFC 6532 headers (mail sent with SMTPUTF8) are UTF-8: carried encoded, not as raw 8-bit.
    rfc822.set_payload(text, charset=None if text.isascii() else "utf-8")
    report.attach(rfc822)  # type: ignore[arg-type]
    # To a UTF-8 sender (whose mail came with SMTPUTF8) the headers are RFC 6532 UTF-8: an
    # RFC 2047 encoded word is no address at all.
    return report.as_bytes(policy=SMTP if original_sender.isascii() else SMTPUTF8)


def _address_field(address: str) -> str:
    """An RFC 3464 address field; a UTF-8 address as RFC 6533's utf-8-addr-xtext (ASCII)."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_ascii(address)}"


def _ascii(text: str) -> str:
    """Non-ASCII characters as RFC 6533 \\x{HEXPOINT} escapes (a delivery-status is ASCII)."""
    if text.isascii():
        return text
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)


def _one_line(text: str) -> str:
    return " ".join(text.split())
