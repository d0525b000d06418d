"""Asynchronous bounces: DSNs (RFC 3464) for mail we relayed, sent to the bounces address.

A receiving MTA that accepted a message and failed later reports it to the envelope sender.
Senders who set their envelope sender to the relay's bounces address (``bounces@...``, or a
VERP form ``bounces+anything@...`` that tells them which message it was) have those reports
consumed here instead of relayed: each failed or delayed recipient is classed like a failed
attempt (``hamta.bounce_classes``), logged as an ``AsyncBounce`` and counted in
``hamta_async_bounces_total{class, kind}``; a permanent failure of class InvalidRecipient
suppresses the recipient, as a synchronous one does, durably before the 250.

Like complaints (``hamta.complaints``), a report that cannot be read is accepted and kept whole
in ``quarantine/`` on the spool volume: a bounce of a bounce reaches nobody, and a report kept
can be read by an operator.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hamta.bounce_classes import BounceClassifier, DsnRecipient, parse_dsn
from hamta.metrics import RelayMetrics
from hamta.report_quarantine import DEFAULT_QUOTA, QuarantineQuota, ReportQuarantine, kept_reply
from hamta.report_shape import DEFAULT_LIMITS, ReportLimits, ReportShapeError, parse_within
from hamta.return_paths import ReturnPaths
from hamta.smtp_replies import REPLY_SUPERSEDED
from hamta.suppression import SUPPRESSED_BOUNCE_CLASS, SuppressionError, Suppressions, normalize

REPLY_NOT_RECORDED = "451 4.3.0 Bounce report not recorded, try again later"


class BounceIntake:
    """Consumes the mail sent to the bounces address: classify, log, suppress, or quarantine."""

    def __init__(
        self,
        address: str,
        classifier: BounceClassifier,
        suppressions: Suppressions | None,
        spool_root: Path,
        metrics: RelayMetrics,
        log: Any,
        guard: Callable[[], str | None] | None = None,
        min_free: int = 0,
        limits: ReportLimits = DEFAULT_LIMITS,
        quota: QuarantineQuota = DEFAULT_QUOTA,
        return_paths: ReturnPaths | None = None,
    ) -> None:
        self.address = normalize(address)
        self.limits = limits
        # Checks the signed return path a DSN came to; None: nothing verifies, nothing suppresses.
        self.return_paths = return_paths
        self._local, _, self._domain = self.address.rpartition("@")
        self.classifier = classifier
        self.suppressions = suppressions
        self.quarantine = ReportQuarantine.on_spool(
            spool_root,
            min_free,
            log,
            guard,
            not_recorded_reply=REPLY_NOT_RECORDED,
            not_recorded_event="BounceNotRecorded",
            quota=quota,
        )
        self.metrics = metrics
        self.log = log
        self.guard = guard

    def accepts(self, address: str) -> bool:
        """The bounces address itself, or its VERP form ``local+tag@domain``."""
        local, _, domain = normalize(address).rpartition("@")
        if domain != self._domain:
            return False
        return local == self._local or local.startswith(self._local + "+")

    async def consume(self, data: bytes, qid: str, client: str, recipient: str) -> str:
        """Record a DSN sent to the bounces address; the SMTP reply to give."""
        if self.guard is not None and self.guard() is not None:
            return REPLY_SUPERSEDED
        verified = self.return_paths.verify(recipient) if self.return_paths else "no return paths"
        if isinstance(verified, str):
            # Not about mail this relay sent (or too long ago): read nothing, keep nothing, and
            # answer as for any report, so a forger learns nothing.
            self.metrics.async_bounces_unverified.labels(verified.partition(" ")[0]).inc()
            self.log.warning(
                "BounceUnverified",
                queue_id=qid,
                address=normalize(recipient),
                reason=verified,
                client=client,
                size=len(data),
            )
            return f"250 2.0.0 Ok: bounce report read as {qid}"
        try:
            recipients = await asyncio.to_thread(
                parse_within, self.limits, lambda raw: parse_dsn(raw, self.classifier), data
            )
        except ReportShapeError as exc:
            return await self._quarantine(data, qid, client, str(exc))
        if not recipients:
            return await self._quarantine(data, qid, client, "no failed or delayed recipient")
        if len(recipients) > self.limits.max_recipients:
            reason = (
                f"suspicious: {len(recipients)} recipients, at most {self.limits.max_recipients}"
            )
            return await self._quarantine(data, qid, client, reason)
        for found in recipients:
            named = normalize(found.recipient)
            suppressed = False
            # The signature vouches for its recipient only: a DSN naming others changes
            # nothing for them.
            if named == verified.recipient and self._suppresses(found):
                if self.suppressions is None:
                    self.log.error(
                        "BounceNotRecorded",
                        queue_id=qid,
                        recipient=named,
                        error="the suppression list is unavailable",
                    )
                    return REPLY_NOT_RECORDED
                try:
                    _, suppressed = await self.suppressions.add(
                        named,
                        "hard-bounce",
                        f"{found.verdict.bounce_class}: {found.diagnostic or found.status}",
                    )
                except SuppressionError as exc:
                    self.log.error(
                        "BounceNotRecorded", queue_id=qid, recipient=named, error=str(exc)
                    )
                    return REPLY_NOT_RECORDED
            verdict = found.verdict
            self.metrics.async_bounces.labels(verdict.bounce_class, verdict.kind).inc()
            self.log.info(
                "AsyncBounce",
                queue_id=qid,
                recipient=named,
                action=found.action,
                status=found.status,
                diagnostic=found.diagnostic,
                bounce_class=verdict.bounce_class,
                kind=verdict.kind,
                newly_suppressed=suppressed,
                return_path_recipient=verified.recipient,
                client=client,
            )
        return f"250 2.0.0 Ok: bounce report read as {qid}"

    @staticmethod
    def _suppresses(found: DsnRecipient) -> bool:
        verdict = found.verdict
        return (
            found.action == "failed"
            and verdict.kind == "hard"
            and verdict.bounce_class == SUPPRESSED_BOUNCE_CLASS
            and "@" in found.recipient
        )

    async def _quarantine(self, data: bytes, qid: str, client: str, reason: str) -> str:
        kept = await self.quarantine.keep(data, qid)
        if isinstance(kept, str):
            return kept
        self.metrics.async_bounces_unparsed.inc()
        self.log.warning(
            "BounceUnparsed",
            queue_id=qid,
            reason=reason,
            kept=str(kept),
            client=client,
            size=len(data),
        )
        return kept_reply(qid)
