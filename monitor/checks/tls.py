"""The tls check: chain, host name, days to expiry, protocol and cipher of an SMTP endpoint.

``tls://host:port`` is implicit TLS (465); ``starttls://host:port`` speaks SMTP up to STARTTLS
first (25, 587), the way Gatus and blackbox_exporter probe it. The handshake is made with the
context clients should insist on (``client_context``): TLS 1.2 at least, forward-secret AEAD
ciphers only, chain and host name verified. A peer that cannot meet it fails the handshake,
which is the finding. When verification fails, a second handshake that verifies nothing fetches
the certificate, so that an expired one is reported as "expired" with its days, not as "down".
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from pathlib import Path

from cryptography import x509

from monitor.config import TlsCheck
from monitor.observation import (
    CertificateExpiredError,
    CheckContext,
    CheckFailedError,
    CheckWarningError,
    Fact,
    Findings,
)

# Forward secrecy and AEAD for TLS 1.2 (TLS 1.3's suites are all of that kind): no RSA key
# exchange, no CBC, no RC4/3DES/NULL/EXPORT.
STRONG_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
_EXPIRED = 10  # X509_V_ERR_CERT_HAS_EXPIRED
_NOT_YET_VALID = 9  # X509_V_ERR_CERT_NOT_YET_VALID
_SMTP_LINE = 1024


@functools.cache
def client_context(ca_file: Path | None, *, verify: bool = True) -> ssl.SSLContext:
    """The TLS a client should insist on; ``verify=False`` only to read a bad certificate.

    Made once per CA file: loading the system's store takes some 60 ms of the event loop, which
    every run of every check would otherwise pay (a changed CA file needs a restart).
    """
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(STRONG_CIPHERS)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def _smtp_reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One (multi-line) SMTP reply: its code and last line."""
    while True:
        line = (await reader.readline())[:_SMTP_LINE].decode("ascii", "replace").rstrip()
        if len(line) < 3 or not line[:3].isdigit():
            raise CheckFailedError(f"not an SMTP reply: {line[:80]!r}")
        if line[3:4] != "-":
            return int(line[:3]), line


async def _starttls_preamble(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ehlo_name: str
) -> None:
    code, line = await _smtp_reply(reader)
    if code != 220:
        raise CheckFailedError(f"banner {line[:80]!r}")
    writer.write(f"EHLO {ehlo_name}\r\n".encode("ascii"))
    code, line = await _smtp_reply(reader)
    if code != 250:
        raise CheckFailedError(f"EHLO refused: {line[:80]!r}")
    writer.write(b"STARTTLS\r\n")
    code, line = await _smtp_reply(reader)
    if code != 220:
        raise CheckFailedError(f"STARTTLS refused: {line[:80]!r}")


class HandshakeError(Exception):
    """The TLS handshake itself failed (not the certificate's verification)."""


async def handshake(check: TlsCheck, context: ssl.SSLContext) -> ssl.SSLObject:
    """Connect to the endpoint and complete the TLS handshake; the session's SSL object."""
    reader, writer = await asyncio.open_connection(check.host, check.port)
    try:
        if not check.implicit:
            await _starttls_preamble(reader, writer, check.ehlo_name)
        try:
            await writer.start_tls(context, server_hostname=check.server_name or check.host)
        except ssl.SSLCertVerificationError:
            raise
        except (ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError) as exc:
            # A peer that cannot meet the context often just drops the connection.
            reason = getattr(exc, "reason", None) or type(exc).__name__
            raise HandshakeError(reason) from None
        ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
        return ssl_object
    finally:
        writer.close()


@functools.cache
def legacy_context() -> ssl.SSLContext:
    """Anything the local OpenSSL can still speak: only to say what an old peer offers."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.set_ciphers("ALL:@SECLEVEL=0")
    return context


async def _what_the_peer_offers(check: TlsCheck) -> str:
    try:
        ssl_object = await handshake(check, legacy_context())
    except (HandshakeError, OSError, CheckFailedError):
        return "no TLS at all that this OpenSSL speaks"
    cipher = (ssl_object.cipher() or ("?",))[0]
    return f"it negotiates {ssl_object.version()} {cipher}"


def days_left(der: bytes, now: float) -> float:
    """Days from ``now`` (a timestamp) to the certificate's notAfter; negative: past it."""
    certificate = x509.load_der_x509_certificate(der)
    end = certificate.not_valid_after_utc.timestamp()
    return (end - now) / 86400.0


def _warning_level(days: float, warn_days: list[int]) -> int | None:
    """The smallest of ``warn_days`` the certificate is within, or None."""
    within = [limit for limit in warn_days if days <= limit]
    return min(within) if within else None


async def run_tls(check: TlsCheck, context: CheckContext, found: Findings) -> str:
    """The detail; CheckFailedError, CheckWarningError or CertificateExpiredError otherwise."""
    facts, now = found.facts, context.now
    try:
        ssl_object = await handshake(check, client_context(check.ca_file))
    except ssl.SSLCertVerificationError as exc:
        code, message = exc.verify_code, exc.verify_message
        await _bad_certificate_facts(check, now, facts)
        if code == _EXPIRED:
            raise CertificateExpiredError(
                f"certificate expired {-float(facts.get('days_to_expiry') or 0):.1f} days ago"
            ) from None
        if code == _NOT_YET_VALID:
            raise CheckFailedError("certificate not yet valid") from None
        raise CheckFailedError(f"certificate not trusted: {message}") from None
    except HandshakeError as exc:
        # TLS 1.0/1.1 only, or only weak ciphers: the handshake we insist on did not happen.
        offered = await _what_the_peer_offers(check)
        raise CheckFailedError(
            f"TLS handshake failed ({exc}): needs TLS ≥ 1.2 and strong ciphers; {offered}"
        ) from None
    der = ssl_object.getpeercert(binary_form=True)
    version, cipher = ssl_object.version(), (ssl_object.cipher() or ("?",))[0]
    facts.update(tls_version=version, cipher=cipher)
    if der is None:
        raise CheckFailedError("no certificate from the peer")
    days = days_left(der, now)
    facts["days_to_expiry"] = round(days, 3)
    level = _warning_level(days, check.warn_days)
    facts["expiry_warning_days"] = level
    detail = f"{version} {cipher}, certificate valid {days:.1f} more days"
    if level is not None:
        raise CheckWarningError(f"{detail} (within {level} days)")
    return detail


async def _bad_certificate_facts(check: TlsCheck, now: float, facts: dict[str, Fact]) -> None:
    """Days to expiry of a certificate that failed verification (best effort)."""
    try:
        ssl_object = await handshake(check, client_context(check.ca_file, verify=False))
    except (OSError, CheckFailedError, HandshakeError):
        return
    der = ssl_object.getpeercert(binary_form=True)
    if der is not None:
        facts["days_to_expiry"] = round(days_left(der, now), 3)
