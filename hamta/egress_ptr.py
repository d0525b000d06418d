"""Forward-confirmed reverse DNS of the egress sources: a warning, never a refusal.

Receivers trust a sending address whose PTR names a host that resolves back to it, and many
compare that name with the one in EHLO. For each ``[delivery.egress]`` source, through the
configured resolver: the address's PTR must include its ``ehlo_name``, and that name's A (or
AAAA) records must include the address. A mismatch is only warned about (at the relay's start,
and by ``hamta config check``): DNS may be fixed later, and mail still goes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
import dns.reversename

from hamta.config import DnsConfig
from hamta.egress import EgressConfig
from hamta.routing import configured_resolver

_FAILURES = (dns.exception.DNSException,)


async def ptr_warnings(egress: EgressConfig, dns_config: DnsConfig) -> list[str]:
    """One line per source whose reverse DNS does not confirm its EHLO name."""
    resolver = configured_resolver(dns.asyncresolver.Resolver, dns_config)
    checks = [
        _check(resolver, name, str(s.address), s.ehlo_name) for name, s in egress.sources.items()
    ]
    return [warning for warning in await asyncio.gather(*checks) if warning]


async def _check(resolver: Any, name: str, address: str, ehlo: str) -> str:
    where = f"egress source {name} ({address}, EHLO {ehlo})"
    wanted = ehlo.lower().rstrip(".")
    try:
        answer = await resolver.resolve(dns.reversename.from_address(address), "PTR")
    except _FAILURES as exc:
        return f"{where}: no PTR for {address} ({_why(exc)})"
    names = sorted(str(r.target).lower().rstrip(".") for r in answer)
    if wanted not in names:
        return f"{where}: the PTR of {address} names {', '.join(names)}, not {ehlo}"
    kind = "AAAA" if ":" in address else "A"
    try:
        forward = await resolver.resolve(ehlo, kind)
    except _FAILURES as exc:
        return f"{where}: {ehlo} has no {kind} record ({_why(exc)}), so its PTR is not confirmed"
    addresses = sorted(str(r.address) for r in forward)
    if address not in addresses:
        return f"{where}: {ehlo} resolves to {', '.join(addresses)}, not back to {address}"
    return ""


def _why(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "NXDOMAIN"
    if isinstance(exc, dns.resolver.NoAnswer):
        return "no answer"
    return type(exc).__name__ if not str(exc) else str(exc)
