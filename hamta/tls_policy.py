"""PURE: which TLS a delivery to one MX must have, from the configured mode and the policies found.

The configured mode (``[delivery] starttls``, ``[delivery.domains."d"] tls``):

- ``off``: plain text, even where STARTTLS is offered.
- ``opportunistic``: the domain's published policies decide. DANE first (RFC 7672; it takes
  precedence over MTA-STS, RFC 8461 section 2): usable TLSA records make TLS mandatory and
  authenticated by them; a secure TLSA RRset with none usable makes TLS mandatory but
  unauthenticated (RFC 7672 2.2); a TLSA lookup that failed (bogus, SERVFAIL) skips the MX.
  Then MTA-STS: ``enforce`` accepts only the MX names its ``mx`` patterns match and a
  certificate valid for that name; ``testing`` tries the same and reports what fails, sending
  anyway (RFC 8461 5). With neither: STARTTLS when offered, unverified, plain text otherwise.
- ``required``: TLS or defer, the certificate unverified.
- ``verify``: TLS with a certificate valid for the MX name (PKIX) or defer.
- ``dane``: DANE-authenticated TLS or defer (no usable TLSA: defer).

Every refusal is temporary: the message is deferred, never sent in clear (4.7.5).
Standard library only; the lookups (hamta.dane, hamta.mta_sts) are I/O and feed this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

# What a session does: plain text, STARTTLS if offered, TLS unverified, TLS verified (PKIX for
# the MX name), TLS authenticated by TLSA records.
Level = Literal["off", "may", "encrypt", "verify", "dane"]
# RFC 8460 4.4 policy-type of the policy that applied.
PolicyType = Literal["tlsa", "sts", "no-policy-found"]


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record (RFC 6698): certificate usage, selector, matching type, data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """RFC 7672 3.1: only DANE-TA(2) and DANE-EE(3), with known selector and matching."""
        return self.usage in (2, 3) and self.selector in (0, 1) and self.mtype in (0, 1, 2)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


# The outcome of an MX host's TLSA lookup (hamta.dane.lookup).
DaneStatus = Literal["insecure", "none", "records", "failed"]


@dataclass(frozen=True, slots=True)
class DaneLookup:
    """``insecure``: DNSSEC off, or MX/address/TLSA not validated; ``none``: securely no TLSA;
    ``records``: a validated TLSA RRset; ``failed``: the lookup failed (bogus or no answer)."""

    status: DaneStatus
    records: tuple[Tlsa, ...] = ()
    error: str = ""

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(r for r in self.records if r.usable)


STS_MODES = ("enforce", "testing", "none")
# RFC 8461 3.2: at most a year.
MAX_AGE_LIMIT = 31557600


class PolicyError(ValueError):
    """An MTA-STS policy or DNS record that does not parse (the reason says where)."""


@dataclass(frozen=True, slots=True)
class StsPolicy:
    """An MTA-STS policy (RFC 8461 3.2) and the id of the TXT record it was fetched for."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    policy_id: str = ""

    def matches(self, mx_host: str) -> bool:
        """RFC 8461 4.1: exact, or ``*.example.com`` for exactly one leftmost label."""
        host = mx_host.lower().rstrip(".")
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, _, rest = host.partition(".")
                if label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    def report_strings(self) -> list[str]:
        """The policy as RFC 8460 4.4 policy-string lines."""
        return [
            "version: STSv1",
            f"mode: {self.mode}",
            *(f"mx: {m}" for m in self.mx),
            f"max_age: {self.max_age}",
        ]


def parse_sts_policy(text: str, policy_id: str = "") -> StsPolicy:
    """Parse the body of ``/.well-known/mta-sts.txt`` (RFC 8461 3.2); raise PolicyError."""
    fields: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"not a key: value line: {line[:80]!r}")
        fields.setdefault(key.strip(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError(f"version must be STSv1, got {fields.get('version')}")
    modes = fields.get("mode", [])
    if len(modes) != 1 or modes[0] not in STS_MODES:
        raise PolicyError(f"mode must be one of {', '.join(STS_MODES)}, got {modes}")
    ages = fields.get("max_age", [])
    if len(ages) != 1 or not ages[0].isdigit() or len(ages[0]) > 10:
        raise PolicyError(f"max_age must be one number of seconds, got {ages}")
    mx = tuple(m.lower().rstrip(".") for m in fields.get("mx", []))
    if modes[0] != "none" and not mx:
        raise PolicyError(f"mode {modes[0]} needs at least one mx line")
    return StsPolicy(modes[0], mx, min(int(ages[0]), MAX_AGE_LIMIT), policy_id)


_TAG = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=\s*(.*?)\s*$")


def parse_tags(record: str, version: str) -> dict[str, str] | None:
    """``v=VERSION; k=v; ...`` TXT text as a dict; None when not a ``version`` record."""
    parts = record.split(";")
    first = _TAG.match(parts[0])
    if first is None or first.group(1) != "v" or first.group(2) != version:
        return None
    tags: dict[str, str] = {}
    for part in parts:
        if not part.strip():
            continue
        match = _TAG.match(part)
        if match is None:
            raise PolicyError(f"bad field {part.strip()[:60]!r} in {version} record")
        tags[match.group(1)] = match.group(2)
    return tags


def sts_record_id(records: list[str]) -> str | None:
    """The id of the one ``v=STSv1`` TXT record (RFC 8461 3.1); None: none, or more than one."""
    found = [tags for r in records if (tags := parse_tags(r, "STSv1")) is not None]
    if len(found) != 1:
        return None
    policy_id = found[0].get("id", "")
    if not re.fullmatch(r"[A-Za-z0-9]{1,32}", policy_id):
        raise PolicyError(f"id must be 1 to 32 letters and digits, got {policy_id!r}")
    return policy_id


@dataclass(frozen=True, slots=True)
class Requirement:
    """What one MX session must have, and why (the reason goes into logs and deferrals).

    ``refuse``: do not connect to this MX at all (the reason). ``enforce`` False: a policy in
    testing mode, whose failures are reported and then ignored.
    """

    level: Level
    reason: str
    policy_type: PolicyType = "no-policy-found"
    tlsa: tuple[Tlsa, ...] = ()
    refuse: str = ""
    enforce: bool = True
    # The RFC 8460 result type of a refusal, or of a policy in testing mode already failed.
    reported_failure: str = ""


def decide(mode: str, mx_host: str, dane: DaneLookup, sts: StsPolicy | None) -> Requirement:
    """The TLS a session to ``mx_host`` needs under ``mode`` (see the module's table)."""
    if mode == "off":
        return Requirement("off", "tls off for this destination")
    if dane.status == "failed" and mode in ("opportunistic", "dane"):
        # RFC 7672 2.2.2: a TLSA lookup that fails leaves the MX unusable, not insecure.
        return Requirement(
            "dane",
            "DANE",
            "tlsa",
            refuse=f"TLSA lookup for {mx_host} failed: {dane.error}",
            reported_failure="dnssec-invalid",
        )
    if mode == "dane" or (mode == "opportunistic" and dane.status == "records"):
        if dane.usable:
            return Requirement("dane", "DANE", "tlsa", dane.usable)
        if dane.status == "records":
            return Requirement("encrypt", "DANE (no usable TLSA record)", "tlsa")
        return Requirement(
            "dane", "DANE", refuse=f"no DNSSEC-validated TLSA record for {mx_host} ({dane.status})"
        )
    if mode == "required":
        return Requirement("encrypt", "tls required for this destination")
    if mode == "verify":
        return Requirement("verify", "tls verify for this destination")
    if sts is None or sts.mode == "none":
        return Requirement("may", "opportunistic")
    enforce = sts.mode == "enforce"
    if not sts.matches(mx_host):
        refusal = f"MX {mx_host} is not in the MTA-STS policy ({', '.join(sts.mx)})"
        if enforce:
            return Requirement("verify", "MTA-STS", "sts", refuse=refusal)
        return Requirement(
            "may",
            f"MTA-STS testing: {refusal}",
            "sts",
            enforce=False,
            reported_failure="validation-failure",
        )
    return Requirement("verify", f"MTA-STS {sts.mode}", "sts", enforce=enforce)
