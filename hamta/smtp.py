"""Receiving mail: the aiosmtpd protocol, tightened, and the handler that spools what it accepts.

The handler is where a message becomes hamta's responsibility, so it is strict. Relaying is only
for configured client networks (hamta is never an open relay). DATA holding a bare CR or LF is
refused whole: such bytes are how SMTP smuggling hides a second message inside the first
(``\\n.\\n`` read as end-of-data by one server and as text by another), and refusing them at the
door means no end-of-data other than CRLF.CRLF can ever split a message. The 250 reply after DATA
is sent only when the spool reports the message durable (fsynced).

Replies carry RFC 3463 enhanced status codes, since ENHANCEDSTATUSCODES is advertised; aiosmtpd's
own replies get them added in :meth:`HamtaSMTP.push`.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import re
import ssl
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any, AnyStr, ClassVar, cast

from aiosmtpd.smtp import SMTP, Envelope, Session

from hamta.addresses import (
    InputError,
    NeedsSmtpUtf8Error,
    check_helo,
    check_mailbox,
    header_safe,
    split_path,
)
from hamta.admission import (
    REPLY_BUSY,
    REPLY_TOO_MANY,
    REPLY_TOO_MANY_FROM_CLIENT,
    ConnectionLimits,
    Pressure,
)
from hamta.config import SmtpConfig
from hamta.metrics import RelayMetrics
from hamta.report_rate import REPLY_REPORT_RATE, ClientRate
from hamta.spool import LiveMessage, Spool, SpoolError, SpoolFencedError, SpoolFullError
from hamta.submission import (
    MECHANISMS,
    REPLY_AUTH_NEEDS_TLS,
    REPLY_AUTH_REQUIRED,
    REPLY_AUTH_TWICE,
    REPLY_FROM_NOT_OWNED,
    REPLY_SENDER_NOT_OWNED,
    REPLY_USER_RATE,
    Listener,
    Submission,
)

if TYPE_CHECKING:  # only configured relays import dkimpy and cryptography
    from hamta.dkim_signing import DkimSigner
    from hamta.intake import Intake
    from hamta.suppression import Suppressions

_STATUS = re.compile(r"^([245])(\d\d)([ -])(.*)$", re.DOTALL)
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}( |$)")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)

# Enhanced codes for aiosmtpd's own replies, by basic code (RFC 3463, RFC 5248).
_DEFAULT_ENHANCED = {
    "211": "2.0.0", "214": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0",
    "251": "2.1.5", "252": "2.1.5", "421": "4.3.2", "450": "4.2.0", "451": "4.3.0",
    "452": "4.3.1", "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1",
    "504": "5.5.4", "530": "5.7.0", "550": "5.7.1", "552": "5.3.4", "553": "5.1.3",
    "554": "5.0.0", "555": "5.5.4",
}  # fmt: skip
# aiosmtpd texts that deserve a clearer word.
_REWORDED = {
    "500 Line too long (see RFC5321 4.5.3.1.6)": "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)",
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed limit",
}

REPLY_OK = "250 2.0.0 Ok"
REPLY_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
REPLY_RELAY_DENIED = "554 5.7.1 Relay access denied"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
REPLY_BAD_ADDRESS = "501 5.1.3 Bad recipient address syntax"
REPLY_SMUGGLING = (
    "550 5.5.2 Message refused: bare CR or LF in message data "
    "(only CRLF line ends are allowed; SMTP smuggling protection)"
)
REPLY_NUL = "550 5.6.0 Message refused: NUL character in message data"
REPLY_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
REPLY_BAD_HELO = "501 5.5.4 Bad HELO/EHLO host name"
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address without SMTPUTF8 on MAIL (RFC 6531 3.4)"
REPLY_TLS_ACTIVE = "503 5.5.1 TLS is already active"
REPLY_NO_AUTH = "502 5.5.1 Authentication is not available"
REPLY_SPOOL_FULL = "452 4.3.1 Insufficient system storage, try again later"
REPLY_SPOOL_ERROR = "451 4.3.0 Local error in processing, try again later"
REPLY_LOCAL_ERROR = REPLY_SPOOL_ERROR  # any unexpected error: the same words, no details
REPLY_SUPERSEDED = "421 4.3.2 This node is no longer the active one, try again later"
# Sessions the relay ends itself, by limit (hamta.admission); never between DATA and its reply.
REPLY_CUT = {
    "idle": "421 4.4.2 Idle timeout exceeded, closing connection",
    "session_time": "421 4.4.2 Session time limit exceeded, closing connection",
    "data_rate": "421 4.4.2 Data transfer too slow, closing connection",
}
REPLY_INTAKE_ALONE = "452 4.5.3 Reports (feedback, bounces) are taken one recipient per transaction"


def has_bare_line_end(data: bytes) -> bool:
    """True when ``data`` holds a CR not followed by LF, or an LF not preceded by CR."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def has_control_character(address: str) -> bool:
    """True when an address holds a control character (CR, LF, NUL and the like)."""
    return any(ord(c) < 32 or ord(c) == 127 for c in address)


def with_enhanced_code(reply: str) -> str:
    """Add the enhanced status code to a 2xx/4xx/5xx reply line that lacks one."""
    reworded = _REWORDED.get(reply)
    if reworded is not None:
        return reworded
    match = _STATUS.match(reply)
    if match is None or _ENHANCED.match(match.group(4)):
        return reply
    code = match.group(1) + match.group(2)
    enhanced = _DEFAULT_ENHANCED.get(code, f"{match.group(1)}.0.0")
    return f"{code}{match.group(3)}{enhanced} {match.group(4)}"


def message_id_of(body: bytes) -> str:
    """The Message-ID header of a message, or an empty string."""
    end = body.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(body, 0, end if end >= 0 else len(body))
    return match.group(1).decode("utf-8", errors="replace").strip() if match else ""


_HOOK_PREFIXES = ("auth_", "handle_", "smtp_")


class _HooksOnlyDir:
    """``dir()`` of hamta's aiosmtpd protocol and handler: their hook methods only, per class.

    aiosmtpd's SMTP.__init__ finds the ``auth_*``, ``handle_*`` and ``smtp_*`` methods of the
    protocol and of its handler with ``dir()`` and ``inspect.getmembers()`` (which fetches every
    name ``dir()`` gives) on every new connection: 220 microseconds, a sixth of the relay's CPU
    when clients open one connection per message. Those names are all it keeps and they are
    those of the class, so they are listed once per class: 36 microseconds. (Also why the
    handler has no ``handle_EHLO``: aiosmtpd would take its signature on every connection.)
    """

    __slots__ = ()
    _names: ClassVar[dict[type, list[str]]] = {}

    def __dir__(self) -> list[str]:
        cls = type(self)
        names = _HooksOnlyDir._names.get(cls)
        if names is None:
            names = [name for name in dir(cls) if name.startswith(_HOOK_PREFIXES)]
            _HooksOnlyDir._names[cls] = names
        return list(names)


_session_ids = itertools.count(1)


class _ClosedOnce:
    """A TLS transport that may be closed again, as aiosmtpd does.

    aiosmtpd reads on after it closed the connection (its goodbye to too many unknown commands),
    and may close it again. asyncio's TLS transport takes a second close() as leave to drop its
    protocol: every read after that raised AttributeError ('_resume_reading'), a SessionError
    each time (found by bench/fuzz.py). The first close() alone reaches the transport.
    """

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def close(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# A session of a listener that takes no AUTH (what tests and tools build without a listener).
PLAIN_SMTP = Listener("", "smtp", None)


class HamtaSMTP(_HooksOnlyDir, SMTP):
    """aiosmtpd's SMTP with enhanced status codes, a configurable line limit and draining."""

    def __init__(
        self,
        handler: ReceptionHandler,
        *,
        line_length_limit: int,
        listener: Listener = PLAIN_SMTP,
        **kwargs: Any,
    ):
        # Read by SMTP.__init__ to size its stream buffer: lines longer than this get 500.
        self.line_length_limit = line_length_limit
        # Its role (smtp, submission, submissions) and credential backend (hamta.submission).
        self.listener = listener
        # Names the session in the log, so that an error line can be tied to its client.
        self.session_id = f"{next(_session_ids):X}"
        self._plain_replies = False
        self._ehlo_lines: list[str] | None = None
        self.client = ""
        # None until connected; then "" when admitted, or the limit the connection is over.
        self._refused: str | None = None
        self._bytes_in = 0  # read from the client, for DATA's minimum rate
        self._data_mark: tuple[float, int] | None = None  # DATA's start: time, bytes read
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # True from the end of DATA to its reply: no limit cuts the session then, since the
        # message may already be durable and must be answered (or the client would resend).
        self.in_handler = False
        super().__init__(handler, **kwargs)
        self.hamta_handler = handler

    async def push(self, status: AnyStr) -> None:
        """Send a reply, adding enhanced codes (not to the greeting or EHLO/HELO lines)."""
        if self.transport is None or self.transport.is_closing():
            # Nobody to tell: aiosmtpd reads on after its own goodbye (too many unknown commands).
            return
        if isinstance(status, str) and not status.isascii():
            # aiosmtpd echoes client text (VRFY, unknown commands), in which bytes that were not
            # UTF-8 are lone surrogates no codec writes: escaped, they are only text.
            status = status.encode("utf-8", "backslashreplace").decode("utf-8")
        if self._ehlo_lines is not None and isinstance(status, str):
            self._ehlo_lines.append(status)  # sent in one write by smtp_EHLO
        elif isinstance(status, str) and not self._plain_replies and not status.startswith("220"):
            await super().push(with_enhanced_code(status))
        else:
            await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        """EHLO, its lines (which RFC 2034 leaves without enhanced codes) in a single write.

        PIPELINING and ENHANCEDSTATUSCODES are advertised besides aiosmtpd's own extensions.
        """
        if await self._refused_helo(hostname):
            return
        self._ehlo_lines = []
        try:
            await super().smtp_EHLO(hostname)
        finally:
            lines, self._ehlo_lines = self._ehlo_lines, None
        if lines[-1:] == ["250 HELP"]:  # the extensions (not aiosmtpd's 501 Syntax)
            # aiosmtpd's AUTH line follows its own idea of TLS, blind to 465's (aiosmtpd issue
            # 281): hamta offers AUTH itself, inside TLS on a listener with a backend only.
            offered = [line for line in lines[:-1] if not line.startswith("250-AUTH")]
            if self.listener.backend is not None and self.tls_active:
                offered.append("250-AUTH " + " ".join(MECHANISMS))
            lines = [*offered, "250-PIPELINING", "250-ENHANCEDSTATUSCODES", lines[-1]]
        if lines:
            await super().push("\r\n".join(lines))

    async def smtp_HELO(self, hostname: str) -> None:
        """HELO, whose reply RFC 2034 leaves without an enhanced code."""
        if await self._refused_helo(hostname):
            return
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    async def _refused_helo(self, hostname: str) -> bool:
        """Refuse (501) a HELO/EHLO name that is neither a host name nor an address literal.

        The name goes into the Received: header and the log: a CR in it would start header
        lines of the client's choosing. A refused greeting changes nothing in the session.
        """
        if not hostname:
            return False  # aiosmtpd's own 501 Syntax reply
        try:
            check_helo(hostname)
        except InputError as exc:
            await self._refuse(f"{REPLY_BAD_HELO}: {exc}", "HeloRefused", hostname)
            return True
        return False

    @property
    def tls_active(self) -> bool:
        """Whether this session is inside TLS: after STARTTLS, or from the first byte (465)."""
        return self._tls_protocol is not None or self.listener.implicit_tls

    @property
    def user(self) -> str | None:
        """The authenticated user of this session (STARTTLS starts a new session: None)."""
        session = self.session
        if session is None or not session.authenticated:
            return None
        return cast(str, session.login_data)

    async def smtp_MAIL(self, arg: str | None) -> None:
        """MAIL, its path checked first (RFC 5321 4.1.2, 4.5.3.1; RFC 6531 3.4).

        On a submission listener, nothing before TLS and AUTH (RFC 8314, RFC 6409 4.3).
        """
        session = self.session
        if (
            self.listener.needs_auth
            and session is not None
            and session.host_name
            and self.user is None
        ):
            reply = REPLY_AUTH_REQUIRED if self.tls_active else REPLY_AUTH_NEEDS_TLS
            await self._refuse(reply, "SubmissionRefused", arg or "")
            return
        if not await self._refused_path(arg, "FROM:"):
            await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        """RCPT, its path checked first (RFC 5321 4.1.2, 4.5.3.1; RFC 6531 3.4)."""
        if not await self._refused_path(arg, "TO:"):
            await super().smtp_RCPT(arg)

    async def _refused_path(self, arg: str | None, keyword: str) -> bool:
        """Refuse a MAIL or RCPT whose path is malformed, too long or needs SMTPUTF8.

        Commands out of sequence or without their keyword are left to aiosmtpd (503, 501).
        """
        session, envelope = self.session, self.envelope
        if arg is None or session is None or envelope is None or not session.host_name:
            return False
        sender = keyword == "FROM:"
        if (envelope.mail_from is not None) == sender:  # nested MAIL, or RCPT before MAIL
            return False
        argument = self._strip_command_keyword(keyword, arg)
        if argument is None:
            return False
        bad = REPLY_BAD_SENDER if sender else REPLY_BAD_ADDRESS
        try:
            address, parameters = split_path(argument)
            if address or not sender:  # <> is the null sender, for MAIL only
                utf8 = "SMTPUTF8" in parameters.upper().split() if sender else envelope.smtp_utf8
                check_mailbox(address, utf8=utf8)
        except NeedsSmtpUtf8Error:
            await self._refuse(REPLY_NEEDS_SMTPUTF8, "AddressRefused", argument)
            return True
        except InputError as exc:
            await self._refuse(f"{bad}: {exc}", "AddressRefused", argument)
            return True
        return False

    async def _refuse(self, reply: str, event: str, text: str) -> None:
        """Send a refusal of the client's ``text``: counted, and one JSON line naming it."""
        handler = self.hamta_handler
        handler.metrics.rejected.labels(reply[:3]).inc()
        peer = self.session.peer if self.session is not None else None
        # The client's text escaped: the log is JSON, and invalid UTF-8 has no JSON form.
        handler.log.info(
            event,
            client=str(peer[0]) if isinstance(peer, tuple) else str(peer),
            argument=header_safe(text)[:300],
            reply=reply,
        )
        await self.push(reply)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The path was checked by _refused_path; hamta.addresses also spares aiosmtpd's parse
        # with the email package's header parser, a tenth of a relay's CPU under load.
        try:
            address, parameters = split_path(arg)
        except InputError:
            return None, None
        return address or "<>", parameters  # aiosmtpd keeps the null sender as "<>"

    async def smtp_STARTTLS(self, arg: str) -> None:
        """STARTTLS, once: inside TLS it is out of sequence (RFC 3207: never TLS inside TLS)."""
        if self._tls_protocol is not None:
            await self.push(REPLY_TLS_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the session (or mark it refused) and track it for a graceful stop."""
        # aiosmtpd calls this again when STARTTLS upgrades the transport: count it once.
        handler = self.hamta_handler
        if self._refused is None:
            peer = transport.get_extra_info("peername")
            self.client = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            self._refused = handler.limits.admit(self.client) or ""
            if not self._refused:
                handler.sessions.add(self)
                handler.metrics.smtp_sessions.inc()
        if self._original_transport is not None:  # the STARTTLS upgrade
            transport = cast(asyncio.BaseTransport, _ClosedOnce(transport))
        super().connection_made(transport)
        if self.listener.implicit_tls and self.session is not None:
            # aiosmtpd sets it at STARTTLS only: Received: says ESMTPS(A) from it.
            self.session.ssl = {"ssl_object": transport.get_extra_info("ssl_object")}

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the session."""
        handler = self.hamta_handler
        if self in handler.sessions:
            handler.sessions.discard(self)
            handler.metrics.smtp_sessions.dec()
            handler.limits.release(self.client)
        for timer in self._timers.values():
            timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Count what the client sends, for DATA's minimum rate."""
        self._bytes_in += len(data)
        super().data_received(data)

    def _start_timer(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = self.loop.call_later(delay, callback)

    def _timeout_cb(self) -> None:
        # aiosmtpd's idle timeout: the same cut as the other limits, with a 421 and never
        # between the end of DATA and its reply.
        self._cut("idle")

    def _cut(self, reason: str) -> None:
        """End the session for a limit: 421 4.4.2, logged and counted."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.in_handler:
            self._start_timer("cut", 0.5, lambda: self._cut(reason))
            return
        handler = self.hamta_handler
        handler.metrics.smtp_cut.labels(reason).inc()
        handler.log.info("SessionCut", session=self.session_id, client=self.client, reason=reason)
        # Through the stream writer, which STARTTLS points at the TLS transport (uvloop's
        # plain transports are no asyncio.WriteTransport to test for).
        self._writer.write(REPLY_CUT[reason].encode() + b"\r\n")
        self.transport.close()

    async def smtp_DATA(self, arg: str) -> None:
        """DATA, cut when the client sends slower than ``min_data_rate`` after the grace."""
        config = self.hamta_handler.config
        if config.min_data_rate:
            self._data_mark = (self.loop.time(), self._bytes_in)
            self._start_timer("rate", config.data_rate_grace, self._check_rate)
        try:
            await super().smtp_DATA(arg)
        finally:
            self._data_mark = None
            rate = self._timers.pop("rate", None)
            if rate is not None:
                rate.cancel()

    def _check_rate(self) -> None:
        mark = self._data_mark
        if mark is None or self.in_handler:
            return
        elapsed = self.loop.time() - mark[0]
        if (self._bytes_in - mark[1]) / elapsed < self.hamta_handler.config.min_data_rate:
            self._cut("data_rate")
            return
        self._start_timer("rate", 1.0, self._check_rate)

    async def handle_exception(self, error: Exception) -> str:
        """Any unexpected error of a session: 451, its details in the log, never to the client.

        aiosmtpd would answer ``500 Error: (ExcType) text``: a permanent failure for what is
        ours to fix, and the exception's text (file paths among it) handed to whoever connects.
        """
        peer = self.session.peer if self.session is not None else None
        self.hamta_handler.log.error(
            "SessionError",
            session=self.session_id,
            client=str(peer[0]) if isinstance(peer, tuple) else str(peer),
            error=f"{type(error).__name__}: {error}",
            traceback="".join(traceback.format_exception(error)),
        )
        return self.hamta_handler._reject(REPLY_LOCAL_ERROR)

    async def smtp_AUTH(self, arg: str) -> None:
        """AUTH PLAIN or LOGIN, inside TLS on a listener with a credential backend only."""
        submission = self.hamta_handler.submission
        session = self.session
        if session is None or await self.check_helo_needed("EHLO"):
            return
        if submission is None or self.listener.backend is None or not session.extended_smtp:
            await self.push(REPLY_NO_AUTH)
            return
        if self.user is not None:
            await self.push(REPLY_AUTH_TWICE)
            return
        if self.envelope is not None and self.envelope.mail_from is not None:
            await self.push("503 5.5.1 AUTH is not allowed during a mail transaction")
            return
        user = await submission.authenticate(self, self.listener, arg or "", tls=self.tls_active)
        if user is not None and self.session is session:
            session.authenticated = True
            session.login_data = user

    async def _handle_client(self) -> None:
        if self.hamta_handler.draining:
            # A relay that is stopping tells new clients to come back, instead of a bare RST.
            await self.push(REPLY_SHUTTING_DOWN)
            if self.transport is not None:
                self.transport.close()
            return
        handler = self.hamta_handler
        if self._refused:
            handler.metrics.smtp_refused.labels(self._refused).inc()
            per_client = self._refused == "max_connections_per_client"
            handler.log.warning(
                "ConnectionRefused",
                client=self.client,
                reason=self._refused,
                limit=handler.limits.per_client if per_client else handler.limits.max_connections,
            )
            await self.push(REPLY_TOO_MANY_FROM_CLIENT if per_client else REPLY_TOO_MANY)
            if self.transport is not None:
                self.transport.close()
            return
        self._start_timer(
            "session", handler.config.max_session_time, lambda: self._cut("session_time")
        )
        await super()._handle_client()

    def close_session(self) -> None:
        """Drop the connection (used at the end of a graceful stop)."""
        if self.transport is not None:
            self.transport.close()


class ReceptionHandler(_HooksOnlyDir):
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


def tls_context(config: SmtpConfig) -> ssl.SSLContext | None:
    """The inbound TLS context (TLS 1.2 or newer), or None when no certificate is set."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context
