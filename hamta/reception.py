"""The reception handler: where a message becomes hamta's responsibility, so it is strict.

Relaying is only for configured client networks (hamta is never an open relay). DATA holding a
bare CR or LF is refused whole: such bytes are how SMTP smuggling hides a second message inside
the first (``\\n.\\n`` read as end-of-data by one server and as text by another), and refusing
them at the door means no end-of-data other than CRLF.CRLF can ever split a message. The 250
reply after DATA is sent only when the spool reports the message durable (fsynced).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import Envelope, Session

from hamta.addresses import header_safe
from hamta.admission import REPLY_BUSY, ConnectionLimits, Pressure
from hamta.config import SmtpConfig
from hamta.metrics import RelayMetrics
from hamta.report_rate import REPLY_REPORT_RATE, ClientRate
from hamta.smtp import HamtaSMTP, HooksOnlyDir
from hamta.smtp_replies import (
    REPLY_BAD_ADDRESS,
    REPLY_BAD_SENDER,
    REPLY_INTAKE_ALONE,
    REPLY_NUL,
    REPLY_OK,
    REPLY_RELAY_DENIED,
    REPLY_SHUTTING_DOWN,
    REPLY_SMUGGLING,
    REPLY_SPOOL_ERROR,
    REPLY_SPOOL_FULL,
    REPLY_SUPERSEDED,
    REPLY_TOO_MANY_RCPTS,
    has_bare_line_end,
    has_control_character,
    message_id_of,
)
from hamta.spool import LiveMessage, Spool, SpoolError, SpoolFencedError, SpoolFullError
from hamta.submission import (
    REPLY_FROM_NOT_OWNED,
    REPLY_SENDER_NOT_OWNED,
    REPLY_USER_RATE,
    Submission,
)

if TYPE_CHECKING:  # only configured relays import dkimpy and cryptography
    from hamta.dkim_signing import DkimSigner
    from hamta.intake import Intake
    from hamta.suppression import Suppressions


class ReceptionHandler(HooksOnlyDir):
    """aiosmtpd handler: relay control, limits, smuggling defence, Received:, spool, queue."""

    def __init__(
        self,
        config: SmtpConfig,
        hostname: str,
        spool: Spool,
        on_queued: Callable[[LiveMessage], None],
        metrics: RelayMetrics,
        log: Any,
        *,
        signer: DkimSigner | None = None,
        suppressions: Suppressions | None = None,
        intakes: Sequence[Intake] = (),
        report_rate: ClientRate | None = None,
        submission: Submission | None = None,
    ) -> None:
        self.signer = signer
        # Logins and what authenticated users may send (None: no listener takes AUTH).
        self.submission = submission
        # How often one client may send to those addresses (None: unlimited).
        self.report_rate = report_rate
        self.suppressions = suppressions
        # Addresses whose mail the relay consumes itself (complaints, bounces), never relays.
        self.intakes = tuple(intakes)
        self.config = config
        self.hostname = hostname
        self.spool = spool
        self.on_queued = on_queued
        self.metrics = metrics
        self.log = log
        self.networks = list(config.relay_networks)
        self._relay_cache: dict[str, bool] = {}
        self._date: tuple[int, str] = (0, "")
        self.draining = False
        self.sessions: set[HamtaSMTP] = set()
        self.in_data = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.limits = ConnectionLimits(
            config.max_connections,
            config.max_connections_per_client,
            lambda host: self.relay_allowed((host,)),
        )
        self.pressure = Pressure(
            config.max_queued_messages, config.max_memory, lambda: len(spool.live)
        )

    def drain(self) -> None:
        """Take no more mail: new sessions and new MAIL get 421 4.3.2; DATA under way finishes."""
        self.draining = True

    def _reject(self, reply: str) -> str:
        self.metrics.rejected.labels(reply[:3]).inc()
        return reply

    def relay_allowed(self, peer: Any) -> bool:
        """Is the client's address within the relay networks?"""
        try:
            host = str(peer[0])
        except (TypeError, IndexError):
            return False
        allowed = self._relay_cache.get(host)
        if allowed is None:
            allowed = self._relay_check(host)
            if len(self._relay_cache) > 4096:
                self._relay_cache.clear()
            self._relay_cache[host] = allowed
        return allowed

    def _relay_check(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    async def handle_MAIL(
        self,
        server: HamtaSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Accept the sender (the null sender included); refuse while stopping."""
        if self.draining:
            return self._reject(REPLY_SHUTTING_DOWN)
        busy = self.pressure.check()
        if busy is not None:
            reason, value, limit = busy
            self.metrics.backpressure.labels(reason).inc()
            self.log.warning(
                "BackPressure", client=server.client, reason=reason, value=value, limit=limit
            )
            return self._reject(REPLY_BUSY)
        if has_control_character(address):
            return self._reject(REPLY_BAD_SENDER)
        user = server.user
        if user is not None and self.submission is not None:
            refused = self._user_refusal(user, address)
            if refused is not None:
                self.metrics.submission_refused.labels(refused[0]).inc()
                self.log.warning(
                    "SubmissionRefused",
                    client=server.client,
                    user=header_safe(user)[:100],
                    sender=address,
                    reason=refused[0],
                )
                return self._reject(refused[1])
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return REPLY_OK

    def _user_refusal(self, user: str, sender: str) -> tuple[str, str] | None:
        """Why ``user`` may not send from ``sender`` now: (reason, reply), or None."""
        assert self.submission is not None
        if not self.submission.sender_allowed(user, sender):
            return "sender", REPLY_SENDER_NOT_OWNED
        if not self.submission.allow_message(user):
            return "rate", REPLY_USER_RATE
        return None

    async def handle_RCPT(
        self,
        server: HamtaSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Relay control, recipient syntax, suppressions and the recipient limit."""
        # A report address is always alone in its transaction: the first recipient tells.
        if self._intake_for(address) is not None or any(
            self._intake_for(r) is not None for r in envelope.rcpt_tos[:1]
        ):
            # Feedback loops and remote MTAs report from outside the relay networks: this mail
            # is not relayed but consumed, alone in its transaction (452: the rest comes later).
            if envelope.rcpt_tos:
                return self._reject(REPLY_INTAKE_ALONE)
            client = str(session.peer[0]) if isinstance(session.peer, tuple) else str(session.peer)
            if self.report_rate is not None and not self.report_rate.allow(
                client, time.monotonic()
            ):
                self.log.warning("ReportRateLimited", client=client, recipient=address)
                return self._reject(REPLY_REPORT_RATE)
            envelope.rcpt_tos.append(address)
            return "250 2.1.5 Ok"
        # An authenticated user may relay anywhere; others only from the relay networks.
        if not session.authenticated and not self.relay_allowed(session.peer):
            return self._reject(REPLY_RELAY_DENIED)
        local, at, domain = address.rpartition("@")
        if (
            not at
            or not local
            or not domain
            or domain.startswith("[")
            or has_control_character(address)
        ):
            return self._reject(REPLY_BAD_ADDRESS)
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return self._reject(REPLY_TOO_MANY_RCPTS)
        suppressed = self.suppressions.lookup(address) if self.suppressions else None
        if suppressed is not None:
            self.log.info(
                "SuppressedRecipient",
                recipient=suppressed.address,
                reason=suppressed.reason,
                sender=envelope.mail_from,
            )
            return self._reject(suppressed.reply())
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: HamtaSMTP, session: Session, envelope: Envelope) -> str:
        """Check, stamp and spool the message; answer 250 only once it is durable."""
        data = envelope.original_content or b""
        peer = session.peer
        client = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        if has_bare_line_end(data):
            self.log.warning(
                "SmugglingRefused",
                client=client,
                sender=envelope.mail_from,
                size=len(data),
            )
            return self._reject(REPLY_SMUGGLING)
        if b"\x00" in data:
            # A next hop that drops NUL bytes would read "\r\n\x00.\r\n" as end-of-data.
            self.log.warning("NulRefused", client=client, sender=envelope.mail_from, size=len(data))
            return self._reject(REPLY_NUL)
        user = server.user
        if user is not None and self.submission is not None:
            bad_from = self.submission.bad_from(user, data)
            if bad_from is not None:
                self.metrics.submission_refused.labels("from").inc()
                self.log.warning(
                    "SubmissionRefused",
                    client=client,
                    user=header_safe(user)[:100],
                    sender=envelope.mail_from,
                    header_from=header_safe(bad_from)[:300],
                    reason="from",
                )
                return self._reject(REPLY_FROM_NOT_OWNED)
        started = time.perf_counter()
        qid = self.spool.new_qid()
        received = self._received_header(session, envelope, qid, client)
        self.in_data += 1
        self.idle.clear()
        server.in_handler = True
        try:
            intake = self._intake_for(envelope.rcpt_tos[0]) if envelope.rcpt_tos else None
            if intake is not None:
                reply = await intake.consume(data, qid, client, envelope.rcpt_tos[0])
                if reply.startswith("421"):
                    self.draining = True  # fenced, as the spool path would have found
                return reply if reply.startswith("2") else self._reject(reply)
            signatures = await self._dkim_signatures(data, envelope.mail_from or "", qid)
            body = signatures + received + data
            appending = asyncio.ensure_future(
                self.spool.append(
                    body,
                    # aiosmtpd keeps the null sender as "<>"; the spool and DSNs know it as "".
                    "" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                    list(envelope.rcpt_tos),
                    qid=qid,
                    message_id=message_id_of(data),
                    client=client,
                )
            )
            try:
                message = await asyncio.shield(appending)
            except asyncio.CancelledError:
                # The connection was lost while the message was being synced: it becomes
                # durable all the same, and must then be queued (once left to the next restart).
                appending.add_done_callback(
                    functools.partial(self._queue_unanswered, session, started, len(body))
                )
                raise
        except SpoolFullError as exc:
            self.log.error("SpoolFull", queue_id=qid, error=str(exc))
            return self._reject(REPLY_SPOOL_FULL)
        except SpoolFencedError as exc:
            self.draining = True
            self.log.error("NotAcknowledged", queue_id=qid, error=str(exc))
            return self._reject(REPLY_SUPERSEDED)
        except SpoolError as exc:
            self.log.error("SpoolError", queue_id=qid, error=str(exc))
            return self._reject(REPLY_SPOOL_ERROR)
        finally:
            server.in_handler = False
            self.in_data -= 1
            if self.in_data == 0:
                self.idle.set()
        self._queued(message, session, started, len(body))
        return f"250 2.0.0 Ok: queued as {qid}"

    def _queued(
        self, message: LiveMessage, session: Session, started: float, size: int, **extra: Any
    ) -> None:
        """A durable message: counted, logged (Reception) and handed to the queue."""
        self.metrics.received.inc()
        self.metrics.received_bytes.inc(size)
        rec = message.rec
        self.log.info(
            "Reception",
            queue_id=rec.qid,
            message_id=rec.message_id,
            sender=rec.sender,
            recipients=rec.recipients,
            client=rec.client,
            helo=session.host_name,
            tls=session.ssl is not None,
            size=size,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            **extra,
        )
        self.on_queued(message)

    def _queue_unanswered(
        self, session: Session, started: float, size: int, appending: asyncio.Future[LiveMessage]
    ) -> None:
        """Queue a message whose client left before its 250 (it may send it again: a duplicate)."""
        if appending.cancelled() or appending.exception() is not None:
            return  # not durable: nothing was promised, nothing is kept
        self._queued(appending.result(), session, started, size, unanswered=True)

    def _intake_for(self, address: str) -> Intake | None:
        return next((intake for intake in self.intakes if intake.accepts(address)), None)

    async def _dkim_signatures(self, data: bytes, sender: str, qid: str) -> bytes:
        """The DKIM-Signature headers for a message ("" when its domain has no key).

        Signed in a thread, off the event loop's own turn; the RSA operation (OpenSSL) releases
        the GIL, dkimpy's canonicalization in Python does not (a 50 KB body: about 10 ms).
        A message that cannot be signed passes unsigned, as mail of a domain without a key does.
        """
        signer = self.signer
        if signer is None:
            return b""
        keys = signer.keys_for(data, "" if sender == "<>" else sender)
        if not keys:
            return b""
        try:
            signatures = await asyncio.to_thread(signer.sign, data, keys)
        except Exception as exc:  # dkimpy raises its own errors and others on odd input
            self.metrics.dkim_failures.inc()
            self.log.warning(
                "DkimSignFailed",
                queue_id=qid,
                domain=keys[0].domain,
                error=f"{type(exc).__name__}: {exc}",
            )
            return b""
        for key in keys:
            self.metrics.dkim_signatures.labels(key.algorithm).inc()
        return signatures

    def _received_header(
        self, session: Session, envelope: Envelope, qid: str, client: str
    ) -> bytes:
        protocol = (
            "ESMTPS" if session.ssl is not None else ("ESMTP" if session.extended_smtp else "SMTP")
        )
        if session.authenticated:
            protocol += "A"  # RFC 3848: ESMTPSA, authenticated (who, the log says)
        recipient = (
            f"\r\n\tfor <{header_safe(envelope.rcpt_tos[0])}>"
            if len(envelope.rcpt_tos) == 1
            else ""
        )
        now = time.time()
        if int(now) != self._date[0]:  # one RFC 5322 date a second is plenty
            self._date = (int(now), format_datetime(datetime.fromtimestamp(int(now), UTC)))
        stamp = self._date[1]
        # Client text only as checked at HELO/RCPT, and escaped all the same: a CR or LF here
        # would let a client write header lines of its own into the message.
        helo = header_safe(session.host_name or "unknown")
        header = (
            f"Received: from {helo} ([{header_safe(client)}])\r\n"
            f"\tby {self.hostname} (hamta) with {protocol} id {qid}{recipient};\r\n"
            f"\t{stamp}\r\n"
        )
        return header.encode("utf-8", errors="surrogateescape")
