"""MTA-STS (RFC 8461): a domain's policy, discovered in DNS, fetched over HTTPS, cached durably.

The cache is one JSON file per policy domain in ``mta-sts/`` on the spool volume, replaced whole
(hamta.durable_files), so the node that takes over after a failover has every policy the old
one had: a policy keeps applying until its ``max_age`` runs out even if DNS or the policy host
is down then (RFC 8461 5.1), which is the point of caching it.

At each use (at most once a ``recheck`` per domain): the ``_mta-sts`` TXT record's id is looked
up; a new id, or a cached policy within ``refresh_margin`` of its expiry, means a fetch (RFC 8461
3.3, 5.1). A failed lookup or fetch keeps the cached policy; no cached policy and no fetch: none.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.abc
import dns.asyncresolver
import dns.exception
import dns.resolver

from hamta.durable_files import write_durably
from hamta.tls_policy import PolicyError, StsPolicy, parse_sts_policy, sts_record_id

# Looked at again after this long (the TXT lookup is cheap, a fetch is not).
RECHECK_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class Cached:
    """A policy as cached: when it was fetched and when it stops applying."""

    policy: StsPolicy
    fetched: float
    expires: float


@dataclass(frozen=True, slots=True)
class Discovery:
    """What the last look found: the policy (or None) and, if something failed, what."""

    policy: StsPolicy | None
    error: str = ""
    # RFC 8460 4.3 result type of the failure: sts-policy-fetch-error or sts-policy-invalid.
    failure: str = ""


class MtaSts:
    """The policies of the domains mail goes to, from cache, DNS and HTTPS."""

    def __init__(
        self,
        cache_dir: Path,
        resolver: dns.asyncresolver.Resolver,
        tls: ssl.SSLContext,
        wall_clock: Callable[[], float],
        log: Any,
        *,
        timeout: float = 10.0,
        max_size: int = 64 * 1024,
        port: int = 443,
    ) -> None:
        self.cache_dir = cache_dir
        self._resolver = resolver
        self._tls = tls
        self._wall = wall_clock
        self.log = log
        self.timeout = timeout
        self.max_size = max_size
        self.port = port
        self._memory: dict[str, Cached] = {}
        self._checked: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def _path(self, domain: str) -> Path:
        return self.cache_dir / f"{domain}.json"

    def cached(self, domain: str) -> Cached | None:
        """The cached policy of ``domain`` still in force, from memory or the spool volume."""
        entry = self._memory.get(domain)
        if entry is None:
            try:
                data = json.loads(self._path(domain).read_text())
                policy = parse_sts_policy(data["policy"], data["id"])
                entry = Cached(policy, float(data["fetched"]), float(data["expires"]))
            except FileNotFoundError:
                return None
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.log.warning("MtaStsCacheUnreadable", domain=domain, error=str(exc))
                return None
            self._memory[domain] = entry
        return entry if entry.expires > self._wall() else None

    async def policy(self, domain: str) -> Discovery:
        """The policy that applies to mail for ``domain`` now (RFC 8461 5.1)."""
        domain = domain.lower().rstrip(".")
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:  # one lookup and fetch per domain at a time
            cached = self.cached(domain)
            now = self._wall()
            if cached is not None and now - self._checked.get(domain, -1e18) < RECHECK_SECONDS:
                return Discovery(cached.policy)
            self._checked[domain] = now
            try:
                policy_id = await self._record_id(domain)
            except PolicyError as exc:
                return Discovery(cached.policy if cached else None, str(exc), "sts-policy-invalid")
            except (dns.exception.DNSException, OSError) as exc:
                error = f"_mta-sts.{domain} lookup failed: {exc}"
                return Discovery(cached.policy if cached else None, error)
            if policy_id is None:
                # No record (any more): a cached policy applies until it expires (RFC 8461 5.1).
                return Discovery(cached.policy if cached else None)
            margin = min(86400.0, cached.policy.max_age / 2) if cached else 0.0
            if cached and cached.policy.policy_id == policy_id and cached.expires - now > margin:
                return Discovery(cached.policy)
            try:
                text = await self._fetch(domain)
                fetched = parse_sts_policy(text, policy_id)
            except PolicyError as exc:
                self.log.warning("MtaStsPolicyInvalid", domain=domain, error=str(exc))
                return Discovery(cached.policy if cached else None, str(exc), "sts-policy-invalid")
            except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
                error = f"fetching the MTA-STS policy of {domain}: {type(exc).__name__}: {exc}"
                self.log.warning("MtaStsFetchFailed", domain=domain, error=error)
                return Discovery(cached.policy if cached else None, error, "sts-policy-fetch-error")
            self._store(domain, fetched, text, now)
            return Discovery(fetched)

    async def _record_id(self, domain: str) -> str | None:
        try:
            answer = await self._resolver.resolve(f"_mta-sts.{domain}", "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
        return sts_record_id(texts)

    async def _fetch(self, domain: str) -> str:
        host = f"mta-sts.{domain}"
        port = "" if self.port == 443 else f":{self.port}"
        url = f"https://{host}{port}/.well-known/mta-sts.txt"
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        connector = aiohttp.TCPConnector(ssl=self._tls, resolver=DnsResolver(self._resolver))
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
            # RFC 8461 3.3: redirects are not followed; only a 200 is a policy.
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message="not 200"
                )
            if response.content_type != "text/plain":
                raise PolicyError(f"{url}: media type {response.content_type}, not text/plain")
            body = await response.content.read(self.max_size + 1)
            if len(body) > self.max_size:
                raise PolicyError(f"{url}: policy larger than {self.max_size} bytes")
            return body.decode("utf-8", "replace")

    def _store(self, domain: str, policy: StsPolicy, text: str, now: float) -> None:
        entry = Cached(policy, now, now + policy.max_age)
        self._memory[domain] = entry
        record = {"id": policy.policy_id, "policy": text, "fetched": now, "expires": entry.expires}
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            write_durably(self.cache_dir, f"{domain}.json", json.dumps(record).encode())
        except OSError as exc:
            # Still used from memory; the next node will fetch it again.
            self.log.error("MtaStsCacheNotWritten", domain=domain, error=str(exc))
        self.log.info(
            "MtaStsPolicy",
            domain=domain,
            id=policy.policy_id,
            mode=policy.mode,
            mx=list(policy.mx),
            max_age=policy.max_age,
        )


class DnsResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's name lookups through the relay's [dns] resolvers (not the system's)."""

    def __init__(self, resolver: dns.asyncresolver.Resolver) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        hosts: list[aiohttp.abc.ResolveResult] = []
        for rdtype, fam in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            try:
                answer = await self._resolver.resolve(host, rdtype)
            except dns.exception.DNSException:
                continue
            hosts += [
                {
                    "hostname": host,
                    "host": r.to_text(),
                    "port": port,
                    "family": fam,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST,
                }
                for r in answer
            ]
        if not hosts:
            raise OSError(f"no address for {host}")
        return hosts

    async def close(self) -> None:
        return None
