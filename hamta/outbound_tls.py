"""The TLS a delivery session needs (hamta.tls_policy), from the lookups it takes, and its check.

Built once per activation (hamta.active_parts) and given to the DeliveryEngine: per destination
its configured mode, the domain's MTA-STS policy (hamta.mta_sts), per MX its TLSA records
(hamta.dane); after a handshake, whether the server's certificate satisfies the requirement.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncresolver

from hamta import dane
from hamta.config import DeliveryConfig, DnsConfig, TlsPolicyConfig
from hamta.mta_sts import Discovery, MtaSts
from hamta.routing import Target, configured_resolver
from hamta.tls_policy import DaneLookup, Requirement, decide
from hamta.tls_reports import TlsReports


class TlsPolicyError(Exception):
    """A session could not have the TLS its destination requires: defer, never send in clear.

    ``result_type``: the failure as RFC 8460 4.3 names it, for TLS reports.
    """

    def __init__(self, message: str, result_type: str) -> None:
        super().__init__(message)
        self.result_type = result_type


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """The client contexts of outbound sessions: one that verifies, one that does not.

    Loading the system's CA store costs 0.1-0.3 s of CPU, more on a loaded machine; a relay
    loads them once when it starts (warm, in standby), not in each activation, which is on a
    failover's critical path (bench/failover.py: the ``relay`` step). They hold no state of an
    activation: the same contexts serve every term of the process.
    """

    verifying: ssl.SSLContext
    unverified: ssl.SSLContext

    @classmethod
    def load(cls, policy: TlsPolicyConfig) -> TlsContexts:
        ca_file = policy.ca_file
        verifying = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        return cls(verifying, unverified)


class OutboundTls:
    """Requirements per MX, TLS contexts, and the post-handshake check."""

    def __init__(
        self,
        delivery: DeliveryConfig,
        dns_config: DnsConfig,
        policy: TlsPolicyConfig,
        spool_root: Path | None,
        wall_clock: Callable[[], float],
        log: Any,
        *,
        hostname: str = "localhost",
        shard: str = "0",
        contexts: TlsContexts | None = None,  # None: loaded here (see TlsContexts)
    ) -> None:
        self.delivery = delivery
        self.dnssec = dns_config.dnssec
        self._wall = wall_clock
        self._resolver = configured_resolver(dns.asyncresolver.Resolver, dns_config)
        contexts = contexts or TlsContexts.load(policy)
        self.verifying = contexts.verifying
        self.unverified = contexts.unverified
        self.mta_sts: MtaSts | None = None
        if policy.mta_sts and spool_root is not None:
            self.mta_sts = MtaSts(
                spool_root / "mta-sts",
                self._resolver,
                self.verifying,
                wall_clock,
                log,
                timeout=policy.mta_sts_fetch_timeout,
                max_size=policy.mta_sts_max_size,
            )
        self.reports: TlsReports | None = None
        if policy.tls_reports and spool_root is not None:
            self.reports = TlsReports(
                spool_root / "tlsrpt",
                shard,
                hostname,
                self._resolver,
                self.verifying,
                wall_clock,
                log,
                sender=policy.tls_report_from or f"postmaster@{hostname}",
                flush_interval=policy.tls_report_flush_interval,
            )

    def mode(self, domain: str, destination: str) -> str:
        """The configured mode of a destination: its own, else [delivery] starttls."""
        for key in (domain, destination):
            override = self.delivery.domains.get(key)
            if override is not None and override.tls is not None:
                return override.tls
        return self.delivery.starttls

    async def sts(self, domain: str, destination: str, mode: str) -> Discovery:
        """The domain's MTA-STS policy when it matters (opportunistic mode, delivery to the
        domain's MX hosts), else none: a static route's host is not one the policy names."""
        if mode != "opportunistic" or self.mta_sts is None or destination != domain:
            return Discovery(None)
        return await self.mta_sts.policy(domain)

    async def requirement(self, mode: str, target: Target, sts: Discovery) -> Requirement:
        """What a session to ``target`` needs (hamta.tls_policy.decide)."""
        if mode in ("opportunistic", "dane") and self.dnssec:
            found = await dane.lookup(self._resolver, target)
        else:
            found = DaneLookup("insecure")
        return decide(mode, target.mx_host, found, sts.policy)

    def record(
        self,
        domain: str,
        requirement: Requirement,
        sts: Discovery,
        target: Target,
        failure: str = "",
    ) -> None:
        """Count a session for TLS reports: those a DANE or MTA-STS policy applied to, and
        those to a domain whose MTA-STS policy could not be had (RFC 8460 4.3)."""
        if self.reports is None:
            return
        if requirement.policy_type == "tlsa":
            strings = [str(r) for r in requirement.tlsa]
            self.reports.record(
                domain, "tlsa", strings, target.mx_host, failure=failure, ip=target.ip
            )
        elif requirement.policy_type == "sts" and sts.policy is not None:
            self.reports.record(
                domain, "sts", sts.policy.report_strings(), "", failure=failure, ip=target.ip
            )
        elif sts.failure:
            self.reports.record(
                domain, "no-policy-found", [], "", failure=sts.failure, ip=target.ip
            )

    def context(self, requirement: Requirement) -> ssl.SSLContext:
        """PKIX verification for ``verify``; DANE checks the chain itself after the handshake."""
        return self.verifying if requirement.level == "verify" else self.unverified

    def check(self, requirement: Requirement, target: Target, ssl_object: Any) -> None:
        """After the handshake: raise TlsPolicyError if the certificate does not satisfy DANE."""
        if requirement.level != "dane":
            return
        failure = dane.check_chain(
            peer_chain(ssl_object), requirement.tlsa, [target.mx_host], self._wall()
        )
        if failure is not None:
            raise TlsPolicyError(f"DANE: {target.mx_host}[{target.ip}]: {failure}", "tlsa-invalid")


def peer_chain(ssl_object: Any) -> list[bytes]:
    """The certificates the server sent (DER, leaf first), unverified.

    Python 3.13 has SSLObject.get_unverified_chain(); before it, the same call is only on the
    private _sslobj (3.10+), whose certificates give their DER through public_bytes(2).
    """
    if ssl_object is None:
        return []
    public = getattr(ssl_object, "get_unverified_chain", None)
    if public is not None:
        return [bytes(der) for der in public()]
    chain = ssl_object._sslobj.get_unverified_chain() or []
    return [cert.public_bytes(_ENCODING_DER) for cert in chain]


_ENCODING_DER = 2  # _ssl.ENCODING_DER
