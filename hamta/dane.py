"""DANE for SMTP (RFC 7672): an MX host's TLSA records, and a server's chain checked against them.

Trust comes from the resolver's AD bit (``[dns] dnssec = true``, a validating resolver on a
trusted path), as Postfix's ``smtp_dns_support_level = dnssec``: the MX RRset, the host's
address records and the TLSA RRset must all be validated; otherwise DANE does not apply
(insecure). Matching uses ``cryptography`` for the digests and, for DANE-TA, the chain check.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rdtypes.ANY.TLSA
import dns.resolver
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import DNSName
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from hamta.routing import Target
from hamta.tls_policy import DaneLookup, Tlsa


def tlsa_name(target: Target) -> str:
    """RFC 7672 2.2.3: ``_port._tcp.<MX host>``."""
    return f"_{target.port}._tcp.{target.mx_host.rstrip('.')}"


async def lookup(resolver: dns.asyncresolver.Resolver, target: Target) -> DaneLookup:
    """The TLSA records of ``target``'s MX host, as far as DNSSEC vouches for them."""
    if not (target.mx_secure and target.address_secure):
        return DaneLookup("insecure")
    name = tlsa_name(target)
    try:
        answer = await resolver.resolve(name, "TLSA", raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN as exc:
        # The NXDOMAIN answers, by name queried (dnspython keeps them in the exception).
        responses: dict[Any, dns.message.Message] = exc.kwargs.get("responses") or {}
        secure = bool(responses) and all(r.flags & dns.flags.AD for r in responses.values())
        return DaneLookup("none" if secure else "insecure")
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        # SERVFAIL from a validating resolver: bogus data, or no answer at all.
        return DaneLookup("failed", error=" ".join(str(exc).split())[:200])
    if not answer.response.flags & dns.flags.AD:
        return DaneLookup("insecure")
    records = tuple(
        Tlsa(r.usage, r.selector, r.mtype, bytes(r.cert))
        for r in answer.rrset or []
        if isinstance(r, dns.rdtypes.ANY.TLSA.TLSA)
    )
    return DaneLookup("records", records) if records else DaneLookup("none")


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _matches(record: Tlsa, cert: x509.Certificate, der: bytes) -> bool:
    data = _selected(cert, der, record.selector)
    if record.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif record.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == record.data


def check_chain(
    chain: Sequence[bytes], records: Sequence[Tlsa], names: Sequence[str], now: float
) -> str | None:
    """None when the server's ``chain`` (DER, leaf first) is authenticated by ``records``;
    otherwise why not.

    DANE-EE (3): the leaf matches; no name, no expiry check (RFC 7672 3.1.1). DANE-TA (2): a
    certificate of the chain matches and the leaf chains to it, valid for one of ``names`` (the
    MX host) at ``now`` (RFC 7672 3.1.2, 3.2.2).
    """
    if not chain:
        return "the server sent no certificate"
    certs = [x509.load_der_x509_certificate(der) for der in chain]
    for record in records:
        if record.usage == 3 and _matches(record, certs[0], chain[0]):
            return None
    anchors = [
        cert
        for record in records
        if record.usage == 2
        for cert, der in zip(certs[1:], chain[1:], strict=True)
        if _matches(record, cert, der)
    ]
    if not anchors:
        return f"no TLSA record matches the certificate chain ({len(chain)} certificates)"
    when = datetime.datetime.fromtimestamp(now, datetime.UTC)
    failures: list[str] = []
    for name in names:
        verifier = (
            PolicyBuilder()
            .store(Store(anchors))
            .time(when)
            .build_server_verifier(DNSName(name.rstrip(".")))
        )
        try:
            verifier.verify(certs[0], certs[1:])
            return None
        except VerificationError as exc:
            failures.append(f"{name}: {exc}")
    return "DANE-TA anchor matched, but the chain does not verify: " + "; ".join(failures)
