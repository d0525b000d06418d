"""Authenticated submission: listeners' roles, the AUTH exchange, and what a user may send.

A listener is ``smtp`` (25: relay by network), ``submission`` (587: STARTTLS, then AUTH, before
any MAIL) or ``submissions`` (465: TLS from the first byte). AUTH PLAIN and LOGIN (RFC 4954,
4616) are offered and accepted only inside TLS, on listeners that name a credential backend.
On 465 the session is TLS without STARTTLS: aiosmtpd, which looks only for a STARTTLS upgrade,
would not advertise AUTH there (aiosmtpd issue 281), so hamta decides what TLS means itself.

Every login is one JSON line (``AuthSucceeded``, ``AuthFailed``, ``AuthLockedOut``,
``AuthUnavailable``) with the client, the listener and the user name: never the password nor
the exchange, and a user name too odd to be one is logged escaped and cut short.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import Any, Protocol

from hamta.addresses import header_safe
from hamta.auth_backends import AuthUnavailableError, Backend
from hamta.auth_guard import LoginGuard, SendRate
from hamta.config import AuthConfig, AuthUserConfig, ListenerConfig
from hamta.metrics import RelayMetrics

MECHANISMS = ("LOGIN", "PLAIN")
REPLY_AUTH_OK = "235 2.7.0 Authentication successful"
REPLY_AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
REPLY_AUTH_LOCKED = "454 4.7.0 Too many failed logins, try again later"
REPLY_AUTH_UNAVAILABLE = "454 4.7.0 Temporary authentication failure, try again later"
REPLY_AUTH_NEEDS_TLS = "530 5.7.0 Must issue a STARTTLS command first"
REPLY_AUTH_NOT_OFFERED = "502 5.5.1 Authentication is not available"
REPLY_AUTH_TWICE = "503 5.5.1 Already authenticated"
REPLY_AUTH_MECHANISM = "504 5.5.4 Unrecognized authentication type (PLAIN or LOGIN)"
REPLY_AUTH_SYNTAX = "501 5.5.2 Cannot decode the AUTH response"
REPLY_AUTH_ABORTED = "501 5.7.0 Authentication aborted"
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication required"
REPLY_SENDER_NOT_OWNED = "553 5.7.1 Sender address not allowed for this login"
REPLY_FROM_NOT_OWNED = "553 5.7.1 From: domain not allowed for this login"
REPLY_USER_RATE = "450 4.7.1 Sending rate limit reached for this login, try again later"


@dataclass(frozen=True, slots=True)
class Listener:
    """One listener as a session sees it: its name (address), role and credential backend."""

    name: str
    role: str
    backend: Backend | None

    @property
    def implicit_tls(self) -> bool:
        """TLS from the first byte (465)."""
        return self.role == "submissions"

    @property
    def needs_auth(self) -> bool:
        """Whether MAIL waits for AUTH (587 and 465)."""
        return self.role != "smtp"


class Session(Protocol):
    """What the AUTH exchange needs of an SMTP session (hamta.smtp.HamtaSMTP)."""

    client: str

    async def push(self, status: str) -> None: ...

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> Any: ...


def listeners(configs: list[ListenerConfig], backends: dict[str, Backend]) -> list[Listener]:
    """The runtime listeners, in ``smtp.listen``'s order."""
    return [
        Listener(item.listen, item.role, backends[item.auth] if item.auth else None)
        for item in configs
    ]


def _decode(blob: str) -> bytes | None:
    try:
        return base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        return None


class Submission:
    """Logins and per-user policy for one relay process (shared by its sessions)."""

    def __init__(
        self,
        config: AuthConfig,
        metrics: RelayMetrics,
        log: Any,
        clock: Callable[[], float],
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        self.guard = LoginGuard(config, clock)
        self.rate = SendRate(clock)
        self._sleep = sleep

    # ------------------------------------------------------------------ AUTH

    async def authenticate(
        self, session: Session, listener: Listener, arg: str, *, tls: bool
    ) -> str | None:
        """Run one AUTH command; the user name on success (the reply is sent either way)."""
        if listener.backend is None:
            await session.push(REPLY_AUTH_NOT_OFFERED)
            return None
        if not tls:
            self._count(listener, "no_tls")
            await session.push(REPLY_AUTH_NEEDS_TLS)
            return None
        words = arg.split()
        if not words or len(words) > 2 or words[0].upper() not in MECHANISMS:
            await session.push(REPLY_AUTH_MECHANISM)
            return None
        credentials = await self._credentials(session, words[0].upper(), words[1:])
        if credentials is None:
            return None
        user, password = credentials
        return await self._check(session, listener, user, password)

    async def _credentials(
        self, session: Session, mechanism: str, initial: list[str]
    ) -> tuple[str, str] | None:
        """The user and password of a PLAIN or LOGIN exchange, or None (the reply sent)."""
        if mechanism == "PLAIN":
            if initial and initial[0] != "=":
                blob = _decode(initial[0])
            elif initial:
                blob = b""
            else:
                answer = await session.challenge_auth("", encode_to_b64=False)
                blob = answer if isinstance(answer, bytes) else None
                if blob is None:
                    return None  # aiosmtpd sent 501 (aborted, or not base64)
            parts = blob.split(b"\0") if blob is not None else []
            if len(parts) != 3:
                await session.push(REPLY_AUTH_SYNTAX)
                return None
            authzid, user_bytes, password_bytes = parts
            if authzid and authzid != user_bytes:  # acting as another user is not offered
                await session.push(REPLY_AUTH_FAILED)
                return None
        else:
            if initial:
                user_bytes_or_none = _decode(initial[0])
                if user_bytes_or_none is None:
                    await session.push(REPLY_AUTH_SYNTAX)
                    return None
                user_bytes = user_bytes_or_none
            else:
                answer = await session.challenge_auth("Username:")
                if not isinstance(answer, bytes):
                    return None
                user_bytes = answer
            answer = await session.challenge_auth("Password:")
            if not isinstance(answer, bytes):
                return None
            password_bytes = answer
        try:
            return user_bytes.decode("utf-8"), password_bytes.decode("utf-8")
        except UnicodeDecodeError:
            await session.push(REPLY_AUTH_SYNTAX)
            return None

    async def _check(
        self, session: Session, listener: Listener, user: str, password: str
    ) -> str | None:
        assert listener.backend is not None
        client = session.client
        logged = header_safe(user)[:100]  # a name, never the password
        gate = self.guard.gate(client, user)
        if gate.locked is not None:
            self._count(listener, "locked")
            self.log.warning(
                "AuthLockedOut", client=client, listener=listener.name, user=logged, by=gate.locked
            )
            await session.push(REPLY_AUTH_LOCKED)
            return None
        if gate.delay:
            await self._sleep(gate.delay)  # the backoff: a guesser's next try waits
        try:
            verdict = await listener.backend.verify(user, password, client, secured=True)
        except AuthUnavailableError as exc:
            self._count(listener, "unavailable")
            self.log.error(
                "AuthUnavailable",
                client=client,
                listener=listener.name,
                backend=listener.backend.name,
                error=str(exc),
            )
            await session.push(REPLY_AUTH_UNAVAILABLE)
            return None
        if verdict.user is None:
            locked = self.guard.failed(client, user)
            self._count(listener, "failure")
            self.log.warning(
                "AuthFailed",
                client=client,
                listener=listener.name,
                user=logged,
                backend=listener.backend.name,
                lockout=locked,
            )
            await session.push(REPLY_AUTH_FAILED)
            return None
        self.guard.succeeded(client, user)
        self._count(listener, "success")
        self.log.info(
            "AuthSucceeded",
            client=client,
            listener=listener.name,
            user=header_safe(verdict.user)[:100],
            backend=listener.backend.name,
        )
        await session.push(REPLY_AUTH_OK)
        return verdict.user

    def _count(self, listener: Listener, outcome: str) -> None:
        self.metrics.smtp_auth.labels(listener.name, outcome).inc()

    # ---------------------------------------------------------------- policy

    def policy(self, user: str) -> AuthUserConfig:
        """The user's policy: its own entry, or the defaults (its login as only sender)."""
        return self.config.users.get(user) or AuthUserConfig()

    def senders(self, user: str) -> list[str]:
        """The envelope senders ``user`` may use: addresses and ``@domain``s."""
        own = self.policy(user).senders
        if own is not None:
            return own
        return [user.lower()] if "@" in user else []

    def sender_allowed(self, user: str, sender: str) -> bool:
        """May ``user`` use envelope sender ``sender`` (the null sender: never)?"""
        address = sender.lower()
        if address in ("", "<>"):
            return False
        domain = "@" + address.rpartition("@")[2]
        return any(item in (address, domain) for item in self.senders(user))

    def from_domains(self, user: str) -> set[str]:
        """The domains the ``From:`` of ``user``'s messages may name."""
        own = self.policy(user).from_domains
        if own is not None:
            return set(own)
        return {item.rpartition("@")[2] for item in self.senders(user)}

    def bad_from(self, user: str, data: bytes) -> str | None:
        """The first ``From:`` address of ``data`` outside ``user``'s domains, else None.

        A message without a From: is let through: the header is the author's (RFC 5322
        requires it, but refusing here would not make a broken client send one).
        """
        headers = BytesHeaderParser().parsebytes(data)
        allowed = self.from_domains(user)
        for _, address in getaddresses([str(v) for v in headers.get_all("From", [])]):
            domain = address.rpartition("@")[2].lower().rstrip(".")
            if domain not in allowed:
                return address or "(empty)"
        return None

    def allow_message(self, user: str) -> bool:
        """Count one message of ``user`` against its rate (False: over it)."""
        return self.rate.allow(user, self.policy(user).messages_per_minute)
