"""The auth_records check: SPF, DMARC, the relay's DKIM keys in DNS, MTA-STS and TLS-RPT.

SPF: exactly one ``v=spf1`` record, every term well-formed, and at most ``max_spf_lookups``
DNS-querying terms (include, a, mx, ptr, exists, redirect) counted through includes and
redirects (RFC 7208 4.6.4: past 10, receivers return permerror and the record is as good as
none). DMARC: ``_dmarc`` with its policy. DKIM: for each key of this domain in the relay's
configuration, the ``selector._domainkey`` record must carry the same public key, compared as
keys (base64 decoded), not as text, so spacing and string splits do not matter.
"""

from __future__ import annotations

import base64
import binascii
import re

import dns.asyncresolver

from hamta.dkim_signing import SigningKey
from monitor.checks.dns import lookup, make_resolver
from monitor.config import AuthRecordsCheck
from monitor.observation import CheckContext, CheckFailedError, Findings

_LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")
_MECHANISM = re.compile(
    r"^[+\-~?]?(?:all|include:\S+|a(?::\S+)?|mx(?::\S+)?|ptr(?::\S+)?|exists:\S+"
    r"|ip4:[0-9./]+|ip6:[0-9a-fA-F:./]+)$",
    re.IGNORECASE,
)
_MODIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*=\S*$")
_MAX_DEPTH = 10  # includes nested deeper than the lookup limit allows cannot be valid anyway


def txt_texts(records: list[str]) -> list[str]:
    """dnspython's TXT texts (``"a" "b"``) as the strings they carry, joined."""
    return ["".join(re.findall(r'"((?:[^"\\]|\\.)*)"', record)) for record in records]


def tags(text: str) -> dict[str, str]:
    """``k=v; k=v`` (DKIM, DMARC, MTA-STS, TLS-RPT) as a dict; keys lower-cased."""
    pairs = (part.split("=", 1) for part in text.split(";") if "=" in part)
    return {key.strip().lower(): value.strip() for key, value in pairs}


async def spf_lookups(
    resolver: dns.asyncresolver.Resolver, domain: str, seen: set[str], depth: int = 0
) -> int:
    """The DNS-querying terms of ``domain``'s SPF, counted through includes and redirects."""
    if domain in seen or depth > _MAX_DEPTH:
        raise CheckFailedError(f"SPF include loop or nesting at {domain}")
    seen.add(domain)
    records = [t for t in txt_texts(await lookup(resolver, domain, "TXT")) if _is_spf(t)]
    if len(records) != 1:
        raise CheckFailedError(f"SPF of {domain}: {len(records)} v=spf1 records, not 1")
    count = 0
    for term in records[0].split()[1:]:
        if not (_MECHANISM.match(term) or _MODIFIER.match(term)):
            raise CheckFailedError(f"SPF of {domain}: bad term {term!r}")
        name = re.split(r"[:=/]", term.lstrip("+-~?"), maxsplit=1)[0].lower()
        if name not in _LOOKUP_TERMS:
            continue
        count += 1
        if name in ("include", "redirect"):
            target = re.split(r"[:=]", term, maxsplit=1)[1].rstrip(".").lower()
            count += await spf_lookups(resolver, target, seen, depth + 1)
    return count


def _is_spf(text: str) -> bool:
    return text.lower() == "v=spf1" or text.lower().startswith("v=spf1 ")


def _key_bytes(text: str) -> bytes | None:
    try:
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        return None


async def dkim_problem(resolver: dns.asyncresolver.Resolver, key: SigningKey) -> str | None:
    """Why DNS does not publish ``key`` (None: it does)."""
    records = txt_texts(await lookup(resolver, key.dns_name, "TXT"))
    if not records:
        return f"DKIM {key.dns_name}: no record"
    kind = "rsa" if key.algorithm == "rsa-sha256" else "ed25519"
    for record in records:
        values = tags(record)
        published = _key_bytes(values.get("p", ""))
        if values.get("k", "rsa").lower() == kind and published == _key_bytes(key.public_key):
            return None
    return f"DKIM {key.dns_name}: published key is not the relay's {kind} key ({key.path.name})"


async def run_auth_records(check: AuthRecordsCheck, context: CheckContext, found: Findings) -> str:
    resolver = make_resolver(context.nameservers, check.timeout)
    facts, problems, parts = found.facts, [], []
    try:
        lookups = await spf_lookups(resolver, check.domain, set())
        facts["spf_lookups"] = lookups
        if lookups > check.max_spf_lookups:
            problems.append(f"SPF needs {lookups} DNS lookups (at most {check.max_spf_lookups})")
        parts.append(f"SPF {lookups} lookups")
    except CheckFailedError as exc:
        problems.append(str(exc))
    dmarc = [
        t
        for t in txt_texts(await lookup(resolver, f"_dmarc.{check.domain}", "TXT"))
        if t.lower().startswith("v=dmarc1")
    ]
    policy = tags(dmarc[0]).get("p") if len(dmarc) == 1 else None
    facts["dmarc_policy"] = policy
    if policy not in ("none", "quarantine", "reject"):
        problems.append(f"DMARC: {len(dmarc)} records" if len(dmarc) != 1 else "DMARC: no p=")
    else:
        parts.append(f"DMARC p={policy}")
    keys = [key for key in context.dkim_keys if key.domain == check.domain]
    for key in keys:
        problem = await dkim_problem(resolver, key)
        if problem is not None:
            problems.append(problem)
    facts["dkim_keys"] = len(keys)
    parts.append(f"DKIM {len(keys)} keys")
    for label, name, version in (
        ("MTA-STS", f"_mta-sts.{check.domain}", "v=stsv1"),
        ("TLS-RPT", f"_smtp._tls.{check.domain}", "v=tlsrptv1"),
    ):
        texts = [
            t
            for t in txt_texts(await lookup(resolver, name, "TXT"))
            if t.lower().replace(" ", "").startswith(version)
        ]
        facts[label.lower().replace("-", "_")] = texts[0] if texts else None
        if texts:
            parts.append(f"{label} published")
    if problems:
        raise CheckFailedError("; ".join(problems))
    return ", ".join(parts)
