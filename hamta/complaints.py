"""Complaints: ARF feedback reports (RFC 5965) sent to the configured address, consumed here.

A mailbox provider's feedback loop reports a complaint ("this is spam") as a multipart/report
with report-type=feedback-report: a human-readable part, a message/feedback-report part of
fields, and the original message (message/rfc822) or its headers (text/rfc822-headers). Mail to
the complaints address is never relayed: the relay reads the report, suppresses the complaining
recipient (the report's Original-Rcpt-To, else the original message's single To: address),
counts the complaint for its domain and answers 250 only once that is durable.

A report that cannot be read (not ARF, no recipient, an ambiguous one) is still accepted, and
kept whole in ``quarantine/`` on the spool volume (fsynced before the 250), with a
``ComplaintUnparsed`` event. Refusing it would send a bounce to a feedback loop's robot, which
nobody reads, and the complaint would be lost; kept, an operator can read it and suppress by
hand, and a parser fix can be tried on real reports.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.parser
import email.policy
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import Any

from hamta.metrics import RelayMetrics
from hamta.report_quarantine import DEFAULT_QUOTA, QuarantineQuota, ReportQuarantine, kept_reply
from hamta.report_shape import DEFAULT_LIMITS, ReportLimits, ReportShapeError, parse_within
from hamta.report_trust import ReporterTrust
from hamta.smtp_replies import REPLY_SUPERSEDED
from hamta.suppression import SuppressionError, Suppressions, normalize, valid_address

# RFC 6430: a report that some mail is *not* spam; read, logged, and suppresses nobody.
NOT_SPAM = "not-spam"
REPLY_NOT_RECORDED = "451 4.3.0 Complaint not recorded, try again later"


class ComplaintParseError(ValueError):
    """A report that is not ARF, or names no recipient one can be sure of."""


@dataclass(frozen=True, slots=True)
class FeedbackReport:
    """What a feedback report says, as far as hamta uses it."""

    feedback_type: str
    recipients: tuple[str, ...]
    user_agent: str = ""
    reporting_mta: str = ""
    source_ip: str = ""
    arrival_date: str = ""
    original_sender: str = ""
    original_from: str = ""
    original_message_id: str = ""
    reported_domains: tuple[str, ...] = field(default_factory=tuple)


def _header_fields(part: email.message.Message) -> email.message.Message:
    """The fields of a message/feedback-report or the headers of the original, as a Message."""
    payload = part.get_payload()
    if isinstance(payload, list) and payload and isinstance(payload[0], email.message.Message):
        first: email.message.Message = payload[0]
        return first
    text = part.get_payload(decode=True)
    raw = text if isinstance(text, bytes) else str(payload).encode("utf-8", "replace")
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)


def _addresses(values: list[str]) -> list[str]:
    found = []
    for _, raw in getaddresses(values):
        address = normalize(raw)
        if address:
            found.append(address)
    return found


def parse_feedback_report(data: bytes) -> FeedbackReport:
    """Read an ARF report; :class:`ComplaintParseError` says why it cannot be used."""
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    if message.get_content_type() != "multipart/report" or (
        str(message.get_param("report-type", "")).lower() != "feedback-report"
    ):
        raise ComplaintParseError(
            f"not an ARF report: {message.get_content_type()} "
            f"report-type={message.get_param('report-type', '')!s}"
        )
    parts = message.get_payload()
    if not isinstance(parts, list):
        raise ComplaintParseError("multipart/report without parts")
    report = original = None
    for part in parts:
        if not isinstance(part, email.message.Message):
            continue
        kind = part.get_content_type()
        if kind == "message/feedback-report" and report is None:
            report = _header_fields(part)
        elif kind in ("message/rfc822", "text/rfc822-headers") and original is None:
            original = _header_fields(part)
    if report is None:
        raise ComplaintParseError("no message/feedback-report part")
    feedback_type = str(report.get("Feedback-Type", "")).strip().lower()
    if not feedback_type:
        raise ComplaintParseError("the report has no Feedback-Type")
    recipients = _addresses([str(v) for v in report.get_all("Original-Rcpt-To", [])])
    if not recipients and original is not None:
        to = _addresses([str(v) for v in original.get_all("To", [])])
        if len(to) > 1:
            raise ComplaintParseError(
                f"no Original-Rcpt-To, and the original has {len(to)} To: addresses"
            )
        recipients = to
    if not recipients:
        raise ComplaintParseError("no recipient: no Original-Rcpt-To and no original To:")
    bad = [r for r in recipients if not valid_address(r)]
    if bad:
        # Providers that redact the recipient leave e.g. "redacted" or "[redacted]@x".
        raise ComplaintParseError(f"unusable recipient {bad[0]!r} (redacted?)")
    sender = _addresses([str(report.get("Original-Mail-From", ""))])
    original_from = _addresses([str(original.get("From", ""))]) if original is not None else []
    message_id = str(original.get("Message-ID", "")).strip() if original is not None else ""
    return FeedbackReport(
        feedback_type=feedback_type,
        recipients=tuple(dict.fromkeys(recipients)),
        user_agent=str(report.get("User-Agent", "")).strip(),
        reporting_mta=str(report.get("Reporting-MTA", "")).strip(),
        source_ip=str(report.get("Source-IP", "")).strip(),
        arrival_date=str(report.get("Arrival-Date", "")).strip(),
        original_sender=sender[0] if sender else "",
        original_from=original_from[0] if original_from else "",
        original_message_id=message_id,
        reported_domains=tuple(
            str(v).strip().lower() for v in report.get_all("Reported-Domain", [])
        ),
    )


class ComplaintIntake:
    """Consumes the mail sent to the complaints address: suppress, count, log, or quarantine."""

    def __init__(
        self,
        address: str,
        suppressions: Suppressions | None,
        spool_root: Path,
        metrics: RelayMetrics,
        log: Any,
        guard: Callable[[], str | None] | None = None,
        on_complaint: Callable[[str], None] | None = None,
        min_free: int = 0,
        limits: ReportLimits = DEFAULT_LIMITS,
        quota: QuarantineQuota = DEFAULT_QUOTA,
        trust: ReporterTrust | None = None,
    ) -> None:
        self.address = normalize(address)
        self.suppressions = suppressions
        self.limits = limits
        # None trusts no reporter: every complaint is logged and suppresses nobody.
        self.trust = trust
        self.quarantine = ReportQuarantine.on_spool(
            spool_root,
            min_free,
            log,
            guard,
            not_recorded_reply=REPLY_NOT_RECORDED,
            not_recorded_event="ComplaintNotRecorded",
            quota=quota,
        )
        self.metrics = metrics
        self.log = log
        self.guard = guard
        # E.g. DomainStats.record_complaint: told the recipient domain of each complaint.
        self.on_complaint = on_complaint

    def accepts(self, address: str) -> bool:
        """Is this recipient the complaints address?"""
        return normalize(address) == self.address

    async def consume(self, data: bytes, qid: str, client: str, to: str) -> str:
        """Record a report sent to the complaints address (``to``); the SMTP reply to give."""
        if self.guard is not None and self.guard() is not None:
            return REPLY_SUPERSEDED
        vouched = await asyncio.to_thread(self.trust.vouch, data, client) if self.trust else None
        if vouched is None:
            # Not quarantined either: a stranger's mail takes no disk. 250, so a forger cannot
            # tell a trusted report from his.
            self.metrics.complaints_untrusted.inc()
            self.log.warning(
                "ComplaintUntrusted",
                queue_id=qid,
                client=client,
                size=len(data),
                reason="neither a complaint network nor a reporter's DKIM",
            )
            return f"250 2.0.0 Ok: report read as {qid}"
        try:
            report = await asyncio.to_thread(parse_within, self.limits, parse_feedback_report, data)
        except (ComplaintParseError, ReportShapeError) as exc:
            return await self._quarantine(data, qid, client, str(exc))
        if len(report.recipients) > self.limits.max_recipients:
            reason = (
                f"suspicious: {len(report.recipients)} recipients, "
                f"at most {self.limits.max_recipients}"
            )
            return await self._quarantine(data, qid, client, reason)
        if report.feedback_type == NOT_SPAM:
            self.log.info(
                "FeedbackNotSpam",
                queue_id=qid,
                recipients=list(report.recipients),
                reporting_mta=report.reporting_mta,
            )
            return f"250 2.0.0 Ok: not-spam report read as {qid}"
        if self.suppressions is None:
            self.log.error(
                "ComplaintNotRecorded", queue_id=qid, error="the suppression list is unavailable"
            )
            return REPLY_NOT_RECORDED
        for recipient in report.recipients:
            domain = recipient.rpartition("@")[2]
            detail = f"{report.feedback_type} report from {report.reporting_mta or client}"
            try:
                entry, added = await self.suppressions.add(recipient, "complaint", detail)
                ranked = await self.suppressions.count_complaint(domain)
            except SuppressionError as exc:
                self.log.error(
                    "ComplaintNotRecorded", queue_id=qid, recipient=recipient, error=str(exc)
                )
                return REPLY_NOT_RECORDED
            self.metrics.complaints.labels(domain if ranked else "other").inc()
            if self.on_complaint is not None:
                self.on_complaint(domain)
            self.log.info(
                "Complaint",
                queue_id=qid,
                recipient=recipient,
                domain=domain,
                feedback_type=report.feedback_type,
                newly_suppressed=added,
                suppressed_since=entry.date,
                original_sender=report.original_sender,
                original_from=report.original_from,
                original_message_id=report.original_message_id,
                reported_domains=list(report.reported_domains),
                reporting_mta=report.reporting_mta,
                user_agent=report.user_agent,
                source_ip=report.source_ip,
                arrival_date=report.arrival_date,
                client=client,
                vouched_by=vouched,
            )
        return f"250 2.0.0 Ok: complaint recorded as {qid}"

    async def _quarantine(self, data: bytes, qid: str, client: str, reason: str) -> str:
        kept = await self.quarantine.keep(data, qid)
        if isinstance(kept, str):
            return kept
        self.metrics.complaints_unparsed.inc()
        self.log.warning(
            "ComplaintUnparsed",
            queue_id=qid,
            reason=reason,
            kept=str(kept),
            client=client,
            size=len(data),
        )
        return kept_reply(qid)
