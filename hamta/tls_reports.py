"""SMTP TLS reporting (RFC 8460): sessions counted per policy and day, reports sent the day after.

Each delivery session a DANE or MTA-STS policy applied to (and each policy that could not be
had: a fetch or lookup failure) is counted per policy domain, policy, day (UTC) and failure type,
in memory and, at most ``flush_interval`` apart and when the engine stops, in
``tlsrpt/<day>.<shard>.json`` on the spool volume (replaced whole, hamta.durable_files): the node
that takes over after a failover reports the day's counts too. A day's report goes out once it is
over: whichever process creates ``tlsrpt/<day>.sent`` first merges every shard's counts and, for
each policy domain publishing ``_smtp._tls`` (``v=TLSRPTv1; rua=...``), sends the gzipped JSON
report (``application/tlsrpt+gzip``) to each rua: ``mailto:`` through this relay (queued as a
message, RFC 8460 5.3), ``https:`` by POST (5.4).
"""

from __future__ import annotations

import datetime
import email.policy
import gzip
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import aiohttp
import dns.asyncresolver
import dns.exception

from hamta.durable_files import create_new, write_durably
from hamta.mta_sts import DnsResolver
from hamta.spool import SpoolError
from hamta.tls_policy import PolicyError, parse_tags

MEDIA_TYPE = "application/tlsrpt+gzip"
# Queues one message: (body, envelope sender, recipients).
Enqueue = Callable[[bytes, str, list[str]], Awaitable[None]]


@dataclass(slots=True)
class PolicyCounts:
    """One policy's sessions in one day: successes, and failures by (type, MX, IP)."""

    policy_type: str
    policy_string: list[str]
    mx_host: str
    success: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # "type|mx|ip" → sessions


def day_of(when: float) -> str:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d")


class TlsReports:
    """Counts of one process (``shard``), and the sending of the reports of days gone by."""

    def __init__(
        self,
        directory: Path,
        shard: str,
        hostname: str,
        resolver: dns.asyncresolver.Resolver,
        tls: ssl.SSLContext,
        wall_clock: Callable[[], float],
        log: Any,
        *,
        sender: str,
        flush_interval: float = 60.0,
    ) -> None:
        self.directory = directory
        self.shard = shard
        self.hostname = hostname
        self._resolver = resolver
        self._tls = tls
        self._wall = wall_clock
        self.log = log
        self.sender = sender
        self.flush_interval = flush_interval
        # day → policy domain → policy key → counts
        self._days: dict[str, dict[str, dict[str, PolicyCounts]]] = {}
        self._flushed = wall_clock()
        self._dirty = False

    # ------------------------------------------------------------------ counting

    def record(
        self,
        domain: str,
        policy_type: str,
        policy_string: list[str],
        mx_host: str,
        *,
        failure: str = "",
        ip: str = "",
    ) -> None:
        """Count one session (``failure``: its RFC 8460 result type; empty: a success)."""
        now = self._wall()
        day = self._load(day_of(now))
        key = f"{policy_type}|{mx_host}|{'|'.join(policy_string)}"
        counts = day.setdefault(domain, {}).setdefault(
            key, PolicyCounts(policy_type, policy_string, mx_host)
        )
        if failure:
            where = f"{failure}|{mx_host}|{ip}"
            counts.failures[where] = counts.failures.get(where, 0) + 1
        else:
            counts.success += 1
        self._dirty = True
        if now - self._flushed >= self.flush_interval:
            self.flush()

    def _load(self, day: str) -> dict[str, dict[str, PolicyCounts]]:
        """A day's counts of this shard, read back from the volume the first time."""
        if day not in self._days:
            self._days[day] = _read(self.directory / f"{day}.{self.shard}.json")
        return self._days[day]

    def flush(self) -> None:
        """Write every day's counts of this shard, whole and durable."""
        self._flushed = self._wall()
        if not self._dirty:
            return
        self._dirty = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for day, domains in self._days.items():
                data = {d: {k: _dump(c) for k, c in p.items()} for d, p in domains.items()}
                write_durably(self.directory, f"{day}.{self.shard}.json", json.dumps(data).encode())
        except OSError as exc:
            self._dirty = True
            self.log.error("TlsReportCountsNotWritten", error=str(exc))

    # ------------------------------------------------------------------- sending

    async def send_due(self, enqueue: Enqueue) -> int:
        """Send the reports of every day that is over and not sent yet; return how many."""
        self.flush()
        # A day is over for every worker once each has flushed after its end (twice the
        # interval: the other workers' last counts of the day are on the volume by then).
        today = day_of(self._wall() - 2 * self.flush_interval)
        days = sorted({p.name.split(".")[0] for p in self._glob("*.json")})
        sent = 0
        for day in days:
            if day >= today or (self.directory / f"{day}.sent").exists():
                continue
            try:
                create_new(self.directory, f"{day}.sent", b"")
            except FileExistsError:
                continue  # another worker has it
            merged: dict[str, dict[str, PolicyCounts]] = {}
            for path in self._glob(f"{day}.*.json"):
                for domain, policies in _read(path).items():
                    target = merged.setdefault(domain, {})
                    for key, counts in policies.items():
                        _merge(target.setdefault(key, counts), counts)
            for domain, policies in sorted(merged.items()):
                sent += await self._send(day, domain, list(policies.values()), enqueue)
            self._days.pop(day, None)
        return sent

    def _glob(self, pattern: str) -> list[Path]:
        return sorted(self.directory.glob(pattern)) if self.directory.exists() else []

    async def _rua(self, domain: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(f"_smtp._tls.{domain}", "TXT")
        except dns.exception.DNSException:
            return []
        found = []
        for record in answer:
            text = b"".join(record.strings).decode("utf-8", "replace")
            try:
                tags = parse_tags(text, "TLSRPTv1")
            except PolicyError:
                continue
            if tags is not None:
                found.append(tags.get("rua", ""))
        if len(found) != 1:  # RFC 8460 3: none, or several (ambiguous): no report
            return []
        return [uri.strip() for uri in found[0].split(",") if uri.strip()]

    async def _send(
        self, day: str, domain: str, policies: list[PolicyCounts], enqueue: Enqueue
    ) -> int:
        ruas = await self._rua(domain)
        if not ruas:
            return 0
        report_id = f"{day}.{domain}@{self.hostname}"
        report = build_report(day, domain, self.hostname, self.sender, report_id, policies)
        body = gzip.compress(json.dumps(report).encode())
        sent = 0
        for rua in ruas:
            try:
                if rua.startswith("mailto:"):
                    address = rua.removeprefix("mailto:").split("?")[0]
                    message = report_message(
                        body, day, domain, self.hostname, self.sender, address, report_id
                    )
                    await enqueue(message, self.sender, [address])
                elif rua.startswith("https:"):
                    await self._post(rua, body)
                else:
                    self.log.warning("TlsReportRuaUnsupported", domain=domain, rua=rua)
                    continue
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError, SpoolError) as exc:
                self.log.warning("TlsReportNotSent", domain=domain, rua=rua, error=str(exc))
                continue
            sent += 1
            self.log.info("TlsReportSent", domain=domain, rua=rua, day=day, report_id=report_id)
        return sent

    async def _post(self, url: str, body: bytes) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(ssl=self._tls, resolver=DnsResolver(self._resolver))
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
            session.post(url, data=body, headers={"Content-Type": MEDIA_TYPE}) as response,
        ):
            if not 200 <= response.status < 300:
                raise ValueError(f"{url} answered {response.status}")


def build_report(
    day: str,
    domain: str,
    hostname: str,
    contact: str,
    report_id: str,
    policies: list[PolicyCounts],
) -> dict[str, Any]:
    """The JSON report of RFC 8460 4.3 for one policy domain and day."""
    return {
        "organization-name": hostname,
        "date-range": {
            "start-datetime": f"{day}T00:00:00Z",
            "end-datetime": f"{day}T23:59:59Z",
        },
        "contact-info": contact,
        "report-id": report_id,
        "policies": [
            {
                "policy": {
                    "policy-type": counts.policy_type,
                    "policy-string": counts.policy_string,
                    "policy-domain": domain,
                    "mx-host": [counts.mx_host] if counts.mx_host else [],
                },
                "summary": {
                    "total-successful-session-count": counts.success,
                    "total-failure-session-count": sum(counts.failures.values()),
                },
                "failure-details": [
                    {
                        "result-type": kind,
                        "receiving-mx-hostname": mx,
                        **({"receiving-ip": ip} if ip else {}),
                        "failed-session-count": n,
                    }
                    for where, n in sorted(counts.failures.items())
                    for kind, mx, ip in [where.split("|", 2)]
                ],
            }
            for counts in policies
        ],
    }


def report_message(
    body: bytes, day: str, domain: str, hostname: str, sender: str, to: str, report_id: str
) -> bytes:
    """RFC 8460 5.3: a multipart/report (report-type tlsrpt) with the gzipped JSON attached."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = make_msgid(domain=hostname)
    message["Subject"] = f"Report Domain: {domain} Submitter: {hostname} Report-ID: <{report_id}>"
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = hostname
    message.set_content(f"The SMTP TLS report of {hostname} for {domain} on {day}.\n")
    start = f"{day.replace('-', '')}000000Z"
    name = f"{hostname}!{domain}!{start}!{day.replace('-', '')}235959Z!{report_id}.json.gz"
    message.add_attachment(body, maintype="application", subtype="tlsrpt+gzip", filename=name)
    boundary = message.get_boundary()
    message.replace_header(
        "Content-Type", f'multipart/report; report-type="tlsrpt"; boundary="{boundary}"'
    )
    return message.as_bytes(policy=email.policy.SMTP)


def _dump(counts: PolicyCounts) -> dict[str, Any]:
    return {
        "type": counts.policy_type,
        "policy": counts.policy_string,
        "mx": counts.mx_host,
        "success": counts.success,
        "failures": counts.failures,
    }


def _read(path: Path) -> dict[str, dict[str, PolicyCounts]]:
    """A shard's counts of a day; a file that does not parse is moved aside, not lost."""
    try:
        data = json.loads(path.read_text())
        return {
            domain: {
                key: PolicyCounts(
                    c["type"], list(c["policy"]), c["mx"], c["success"], c["failures"]
                )
                for key, c in policies.items()
            }
            for domain, policies in data.items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        path.rename(path.with_name(path.name + ".unreadable"))
        return {}


def _merge(into: PolicyCounts, other: PolicyCounts) -> None:
    if into is other:
        return
    into.success += other.success
    for where, n in other.failures.items():
        into.failures[where] = into.failures.get(where, 0) + n
