"""The dns check: MX, the exchanges' addresses, PTR of each egress address confirmed forward.

Every answer is kept (``Findings.answers``, stored by the engine), and any difference from the
last known answer is a change event: an MX record changed by mistake is the outage nobody sees
on the relay itself. A missing MX, an exchange without an address, or an egress address whose
PTR is not its EHLO name (or whose name does not resolve back to it) fails the check: receivers
score such mail as spam or refuse it.
"""

from __future__ import annotations

import ipaddress

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
import dns.reversename

from hamta.config import parse_hostport
from monitor.config import DnsCheck
from monitor.observation import CheckContext, CheckFailedError, Findings


def make_resolver(nameservers: tuple[str, ...], timeout: float) -> dns.asyncresolver.Resolver:
    """A resolver asking ``nameservers`` (``host:port``) only, or the system's when empty."""
    if not nameservers:
        resolver = dns.asyncresolver.Resolver()
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        servers: list[dns.nameserver.Nameserver | str] = []
        for text in nameservers:
            host, port = parse_hostport(text, 53)
            servers.append(dns.nameserver.Do53Nameserver(host, port))
        resolver.nameservers = servers
    resolver.lifetime = timeout
    resolver.timeout = timeout
    return resolver


async def lookup(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[str]:
    """The records' texts, sorted (an empty list: the name or the type does not exist)."""
    try:
        answer = await resolver.resolve(name, rdtype, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return []
    except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
        raise CheckFailedError(f"{rdtype} {name}: no answer from the resolver ({exc})") from None
    return sorted(rdata.to_text() for rdata in answer)


def changes(known: dict[str, list[str]], seen: dict[str, list[str]]) -> list[str]:
    """One line per answer that differs from the last known one (none known: no change)."""
    lines = []
    for key, now in seen.items():
        before = known.get(key)
        if before is not None and before != now:
            lines.append(f"{key}: {', '.join(before) or '(none)'} → {', '.join(now) or '(none)'}")
    return lines


async def run_dns(check: DnsCheck, context: CheckContext, found: Findings) -> str:
    resolver = make_resolver(context.nameservers, check.timeout)
    answers = found.answers
    problems: list[str] = []
    answers[f"MX {check.domain}"] = mx = await lookup(resolver, check.domain, "MX")
    if not mx:
        problems.append(f"no MX for {check.domain}")
    exchanges = [record.split()[1].rstrip(".") for record in mx if record.split()[1] != "."]
    for name in dict.fromkeys([*exchanges, *check.names]):
        answers[f"A {name}"] = v4 = await lookup(resolver, name, "A")
        answers[f"AAAA {name}"] = v6 = await lookup(resolver, name, "AAAA")
        if not v4 and not v6:
            problems.append(f"{name} has no address")
    for egress in check.egress:
        problem = await _forward_confirmed(resolver, egress.address, egress.ehlo_name, answers)
        if problem:
            problems.append(problem)
    found.changes.extend(changes(context.known_answers, answers))
    found.facts["records"] = sum(len(v) for v in answers.values())
    if problems:
        raise CheckFailedError("; ".join(problems))
    detail = f"MX {', '.join(mx)}; {len(check.egress)} egress confirmed"
    if found.changes:
        detail += f"; {len(found.changes)} changed"
    return detail


async def _forward_confirmed(
    resolver: dns.asyncresolver.Resolver, address: str, ehlo: str, answers: dict[str, list[str]]
) -> str | None:
    """Why ``address`` is not forward-confirmed as ``ehlo`` (None: it is)."""
    reverse = dns.reversename.from_address(address).to_text()
    answers[f"PTR {address}"] = names = await lookup(resolver, reverse, "PTR")
    names = [name.rstrip(".").lower() for name in names]
    if ehlo not in names:
        return f"PTR of {address} is {', '.join(names) or 'missing'}, not {ehlo}"
    rdtype = "A" if ipaddress.ip_address(address).version == 4 else "AAAA"
    forward = await lookup(resolver, ehlo, rdtype)
    answers[f"{rdtype} {ehlo}"] = forward
    if address not in forward:
        return f"{ehlo} does not resolve back to {address}"
    return None
