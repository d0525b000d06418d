"""Whose complaints are acted on: configured reporter networks, or a reporter domain's DKIM.

Anyone can mail the complaints address, and a forged ARF report would otherwise suppress whoever
it names. A report suppresses only when it comes from a client in ``[suppression]
complaint_networks`` (the feedback loops' sending networks) or carries a DKIM signature that
verifies for a domain in ``complaint_dkim_domains`` (what the big feedback loops sign with).
Verification is dkimpy's, its key lookups through the relay's own ``[dns]`` resolvers; it runs in
a thread (pure-Python RSA, blocking DNS).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

import dkim
import dns.exception
import dns.resolver

from hamta.config import DnsConfig
from hamta.routing import configured_resolver

_SIGNATURE = re.compile(rb"^dkim-signature[ \t]*:", re.IGNORECASE | re.MULTILINE)
# A report with more signatures than this is not worth the DNS lookups and RSA of each.
MAX_SIGNATURES = 4

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ReporterTrust:
    """The reporters whose complaints count; ``vouch`` says why one does (None: it does not)."""

    networks: tuple[Network, ...]
    dkim_domains: frozenset[str]
    dns_config: DnsConfig

    @classmethod
    def of(
        cls, networks: Iterable[Network], dkim_domains: Iterable[str], dns_config: DnsConfig
    ) -> ReporterTrust:
        """Trust built from the configuration's lists."""
        return cls(tuple(networks), frozenset(d.lower() for d in dkim_domains), dns_config)

    def network_of(self, client: str) -> Network | None:
        """The configured network the client is in, if any."""
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return next((n for n in self.networks if address in n), None)

    def vouch(self, data: bytes, client: str) -> str | None:
        """Why this report is trusted (blocking: call in a thread), or None."""
        network = self.network_of(client)
        if network is not None:
            return f"network {network}"
        if not self.dkim_domains:
            return None
        header_block = data.split(b"\r\n\r\n", 1)[0]
        count = min(len(_SIGNATURE.findall(header_block)), MAX_SIGNATURES)
        resolver = configured_resolver(dns.resolver.Resolver, self.dns_config)

        def txt(name: bytes, timeout: int = 5) -> bytes | None:
            try:
                answer = resolver.resolve(name.decode("ascii").rstrip("."), "TXT")
            except (dns.exception.DNSException, UnicodeDecodeError):
                return None
            return b"".join(answer[0].strings) if answer.rrset else None

        for index in range(count):
            checker = dkim.DKIM(data)
            try:
                verified = checker.verify(idx=index, dnsfunc=txt)
            except dkim.DKIMException:
                continue
            domain = (checker.domain or b"").decode("ascii", "replace").lower()
            if verified and domain in self.dkim_domains:
                return f"dkim d={domain}"
        return None
