"""Where mail for a domain goes: static routes, then MX in preference order, then A/AAAA.

RFC 5321 section 5.1: try the MX hosts lowest preference first (random among equals); with no MX
record, the domain's own address records are an implicit MX of preference 0. RFC 7505: an MX of
preference 0 with the root as target ("null MX") says the domain takes no mail at all, so such mail
bounces at once instead of waiting out the queue lifetime.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import TypeVar

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.rdatatype
import dns.resolver

from hamta.config import DeliveryConfig, DnsConfig, parse_hostport

R = TypeVar("R", bound=dns.resolver.BaseResolver)


@dataclass(frozen=True, slots=True)
class Target:
    """One address to try: the MX name it came from, its IP and port.

    ``mx_secure``/``address_secure``: the MX RRset (or, with no MX, the domain's own address
    records) and this host's address records were DNSSEC-validated ([dns] dnssec, the AD bit);
    DANE (hamta.dane) applies only then.
    """

    mx_host: str
    ip: str
    port: int
    mx_secure: bool = False
    address_secure: bool = False


def configured_resolver(kind: type[R], dns_config: DnsConfig) -> R:
    """A resolver (``dns.resolver`` or ``dns.asyncresolver``) as [dns] says, with a cache."""
    resolver = kind(configure=not dns_config.nameservers)
    if dns_config.nameservers:
        hosts = [parse_hostport(item, default_port=53) for item in dns_config.nameservers]
        resolver.nameservers = [host for host, _ in hosts]
        resolver.port = hosts[0][1]
    resolver.lifetime = dns_config.timeout
    resolver.cache = dns.resolver.Cache()
    if dns_config.dnssec:
        # Ask for validation (AD in the query, RFC 6840 5.7; DO for the DNSSEC records).
        resolver.flags = dns.flags.RD | dns.flags.AD
        resolver.use_edns(0, dns.flags.DO, 1232)
    return resolver


class RoutingError(Exception):
    """No target could be found; ``permanent`` says whether to bounce or retry."""

    def __init__(self, message: str, *, permanent: bool, enhanced: str) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.enhanced = enhanced


class Router:
    """Resolves next hops with dnspython's async resolver and a shared cache."""

    def __init__(self, delivery: DeliveryConfig, dns_config: DnsConfig) -> None:
        self._routes = {
            domain: parse_hostport(target, default_port=25)
            for domain, target in delivery.routes.items()
        }
        self._port = delivery.port
        self._resolver = configured_resolver(dns.asyncresolver.Resolver, dns_config)
        self.dnssec = dns_config.dnssec
        self._rng = random.Random()

    def next_hop(self, domain: str) -> str:
        """The destination key for a domain: its static route, or the domain itself."""
        route = self._routes.get(domain)
        return f"[{route[0]}]:{route[1]}" if route else domain

    async def targets(self, domain: str) -> list[Target]:
        """Addresses to try for ``domain``, in order; raises :class:`RoutingError`."""
        route = self._routes.get(domain)
        if route is not None:
            host, port = route
            return [Target(host, ip, port) for ip, _ in await self._addresses(host)]
        try:
            answer = await self._resolver.resolve(domain, "MX", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise RoutingError(
                f"domain {domain} does not exist", permanent=True, enhanced="5.1.2"
            ) from None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            raise RoutingError(
                f"MX lookup for {domain} failed: {exc}", permanent=False, enhanced="4.4.3"
            ) from None
        rrset = list(answer.rrset or [])
        mx_secure = self.dnssec and bool(answer.response.flags & dns.flags.AD)
        if any(r.exchange == dns.name.root for r in rrset):
            raise RoutingError(
                f"domain {domain} accepts no mail (null MX)", permanent=True, enhanced="5.1.10"
            )
        records = sorted(
            (r.preference, self._rng.random(), r.exchange.to_text(omit_final_dot=True))
            for r in rrset
        )
        hosts = [host for _, _, host in records] or [domain]
        targets: list[Target] = []
        last_error: RoutingError | None = None
        for host in hosts:
            try:
                found = await self._addresses(host)
            except RoutingError as exc:
                last_error = exc
                continue
            # With no MX, the domain is its own MX: its address records stand for the MX RRset.
            secure = mx_secure if rrset else all(s for _, s in found)
            targets += [Target(host, ip, self._port, secure, s) for ip, s in found]
        if not targets:
            raise last_error or RoutingError(
                f"no address for {domain}", permanent=False, enhanced="4.4.4"
            )
        return targets

    async def _addresses(self, host: str) -> list[tuple[str, bool]]:
        """The host's addresses, each with whether its RRset was DNSSEC-validated."""
        try:
            return [(str(ipaddress.ip_address(host)), False)]
        except ValueError:
            pass
        found: list[tuple[str, bool]] = []
        transient = False
        nxdomain = False
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(host, rdtype, raise_on_no_answer=False)
                secure = self.dnssec and bool(answer.response.flags & dns.flags.AD)
                found += [(r.to_text(), secure) for r in answer.rrset or []]
            except dns.resolver.NXDOMAIN:
                nxdomain = True
            except (dns.exception.Timeout, dns.resolver.NoNameservers):
                transient = True
        if found:
            return found
        if nxdomain and not transient:
            raise RoutingError(f"host {host} does not exist", permanent=True, enhanced="5.4.4")
        raise RoutingError(f"no address for host {host}", permanent=False, enhanced="4.4.3")
