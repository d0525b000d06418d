"""Receiving mail: the aiosmtpd protocol, tightened (enhanced status codes, a line limit, 421
while draining, connection limits, AUTH on the listeners that take it); the handler behind it,
which spools what it accepts, is ``hamta.reception``.

Replies carry RFC 3463 enhanced status codes, since ENHANCEDSTATUSCODES is advertised; aiosmtpd's
own replies get them added in :meth:`HamtaSMTP.push` (``hamta.smtp_replies``).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, AnyStr, ClassVar, cast

from aiosmtpd.smtp import SMTP

from hamta.addresses import (
    InputError,
    NeedsSmtpUtf8Error,
    check_helo,
    check_mailbox,
    header_safe,
    split_path,
)
from hamta.admission import REPLY_TOO_MANY, REPLY_TOO_MANY_FROM_CLIENT
from hamta.config import SmtpConfig
from hamta.smtp_replies import (
    REPLY_BAD_ADDRESS,
    REPLY_BAD_HELO,
    REPLY_BAD_SENDER,
    REPLY_CUT,
    REPLY_LOCAL_ERROR,
    REPLY_NEEDS_SMTPUTF8,
    REPLY_NO_AUTH,
    REPLY_SHUTTING_DOWN,
    REPLY_TLS_ACTIVE,
    with_enhanced_code,
)
from hamta.submission import (
    MECHANISMS,
    REPLY_AUTH_NEEDS_TLS,
    REPLY_AUTH_REQUIRED,
    REPLY_AUTH_TWICE,
    Listener,
)

if TYPE_CHECKING:  # hamta.reception builds on this module
    from hamta.reception import ReceptionHandler

_HOOK_PREFIXES = ("auth_", "handle_", "smtp_")


class HooksOnlyDir:
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
        names = HooksOnlyDir._names.get(cls)
        if names is None:
            names = [name for name in dir(cls) if name.startswith(_HOOK_PREFIXES)]
            HooksOnlyDir._names[cls] = names
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


class HamtaSMTP(HooksOnlyDir, SMTP):
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


def tls_context(config: SmtpConfig) -> ssl.SSLContext | None:
    """The inbound TLS context (TLS 1.2 or newer), or None when no certificate is set."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context
