"""The smtp, submission and smtps checks: what a client of each port goes through.

smtp (25): connect, a 220 banner, EHLO, and with ``starttls`` STARTTLS offered and negotiated.
submission (587): STARTTLS, then AUTH advertised on the protected session. smtps (465):
implicit TLS, AUTH advertised. Both with ``login``: a real AUTH with the probe account. The
socket is connected here and handed to aiosmtplib, so that TLS verifies ``server_name`` (the
name on the certificate) whatever address ``host`` is.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import aiosmtplib

from monitor.checks.tls import client_context
from monitor.config import Login, RoundTripCheck, SmtpCheck, SmtpsCheck, SubmissionCheck
from monitor.observation import CheckContext, CheckFailedError, Findings

SmtpLike = SmtpCheck | SubmissionCheck | SmtpsCheck


async def _connect(host: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise CheckFailedError(f"{host}: no address")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def run_smtp(check: SmtpLike, context: CheckContext, found: Findings) -> str:
    """Walk the session; the one-line detail, or CheckFailedError naming the step that failed."""
    starttls = check.kind == "submission" or (isinstance(check, SmtpCheck) and check.starttls)
    login = isinstance(check, SubmissionCheck | SmtpsCheck)
    client, steps = await open_session(check, found, starttls=starttls, auth=login)
    try:
        await client.quit()
    finally:
        client.close()
    return ", ".join(steps)


async def open_session(
    check: SmtpLike | RoundTripCheck, found: Findings, *, starttls: bool, auth: bool
) -> tuple[aiosmtplib.SMTP, list[str]]:
    """Connect, banner, EHLO, TLS (implicit for smtps, else STARTTLS if asked), AUTH if asked.

    The open client (the caller quits and closes it) and the steps passed, one word or so each;
    CheckFailedError names the step that failed. The round-trip check sends through it.
    """
    name = check.server_name or check.host
    implicit = check.kind == "smtps"
    tls = client_context(check.ca_file)
    sock = await _connect(check.host, check.port)
    client = aiosmtplib.SMTP(
        hostname=name,
        sock=sock,
        use_tls=implicit,
        start_tls=False,
        tls_context=tls,
        local_hostname=check.ehlo_name,
        timeout=check.timeout,
    )
    steps = []
    try:
        try:
            banner = await client.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise CheckFailedError(f"banner {exc.code} {exc.message[:80]}") from None
        if banner.code != 220:
            raise CheckFailedError(f"banner {banner.code} {banner.message[:80]}")
        steps.append(f"220 {banner.message.split()[0] if banner.message else ''}".strip())
        await _ehlo(client)
        if implicit:
            steps.append(_tls_step(client, found))
        elif starttls:
            if not client.supports_extension("starttls"):
                raise CheckFailedError("STARTTLS not offered")
            try:
                await client.starttls(server_hostname=name, tls_context=tls)
            except ssl.SSLCertVerificationError as exc:
                raise CheckFailedError(
                    f"STARTTLS: certificate not trusted: {exc.verify_message}"
                ) from None
            except (ssl.SSLError, aiosmtplib.SMTPException) as exc:
                raise CheckFailedError(f"STARTTLS failed: {exc}") from None
            steps.append(f"STARTTLS {_tls_step(client, found)}")
            await _ehlo(client)
        if auth:
            login_as = None if isinstance(check, SmtpCheck) else check.login
            steps.append(await _auth(client, login_as, found))
    except BaseException:
        client.close()
        raise
    return client, steps


async def _ehlo(client: aiosmtplib.SMTP) -> None:
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        raise CheckFailedError(f"EHLO refused: {exc.code} {exc.message[:80]}") from None


def _tls_step(client: aiosmtplib.SMTP, found: Findings) -> str:
    transport = client.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    version = ssl_object.version() if ssl_object is not None else None
    found.facts["tls_version"] = version
    return str(version)


async def _auth(client: aiosmtplib.SMTP, login_as: Login | None, found: Findings) -> str:
    methods = sorted(method.upper() for method in client.server_auth_methods)
    # A bare "AUTH" keyword with no mechanism lets nobody log in either.
    if not client.supports_extension("auth") or not methods:
        raise CheckFailedError("AUTH not advertised after TLS")
    found.facts["auth_methods"] = " ".join(methods)
    if login_as is None:
        return f"AUTH {' '.join(methods)}"
    # One mechanism, PLAIN when offered (it is over TLS): a wrong password costs the probe
    # account one failed attempt a run, not one per mechanism the server offers.
    login = client.auth_plain if "PLAIN" in methods else client.auth_login
    try:
        await login(login_as.username, login_as.password())
    except aiosmtplib.SMTPAuthenticationError as exc:
        raise CheckFailedError(f"login as {login_as.username} refused: {exc.code}") from None
    return f"login as {login_as.username} ok"
