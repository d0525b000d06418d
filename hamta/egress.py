"""Egress sources and pools: which local address (and EHLO name) a message leaves from.

A *source* is one local address with the name the relay gives in EHLO from it; a *pool* is a
set of sources. A message's pool is the one its ``[delivery.egress] header`` names (the header
is then stripped before sending), else the one of its envelope sender's domain
(``[delivery.egress.domains]``), else ``default_pool``. Within a pool the weights pick the
source, deterministically per message: a hash of the queue id falls in one source's share of
the total weight, so a retried message leaves from the same address, and over many messages
each source gets its share (KumoMTA's egress sources and pools are the model; the choice per
message rather than per connection is ours: a delivery session holds one source at a time).

With no sources configured, delivery binds no address and says the ``[delivery] helo_name``.
"""

from __future__ import annotations

import errno
import hashlib
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME = (
    r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EgressSourceConfig(_Section):
    """One sending address and the EHLO name that goes with it (its PTR should name it)."""

    address: IPv4Address | IPv6Address
    ehlo_name: Annotated[str, Field(pattern=_NAME)]
    weight: Annotated[int, Field(gt=0)] = 1


class EgressPoolConfig(_Section):
    """The names of the sources (in ``[delivery.egress.sources]``) a pool sends from."""

    sources: Annotated[list[str], Field(min_length=1)]


class EgressConfig(_Section):
    """``[delivery.egress]``: sources, pools, and how a message's pool is chosen."""

    sources: dict[str, EgressSourceConfig] = Field(default_factory=dict)
    pools: dict[str, EgressPoolConfig] = Field(default_factory=dict)
    default_pool: str | None = None
    # Envelope sender domain -> pool name.
    domains: dict[str, str] = Field(default_factory=dict)
    # A header naming the pool, taken out of the message before it is sent ("" = none).
    header: str = "X-Hamta-Pool"

    @field_validator("domains")
    @classmethod
    def _lower_domains(cls, value: dict[str, str]) -> dict[str, str]:
        normalised = {d.lower().rstrip("."): pool for d, pool in value.items()}
        if "" in normalised or len(normalised) != len(value):
            raise ValueError("domain names must be non-empty and differ other than in case")
        return normalised

    @field_validator("header")
    @classmethod
    def _check_header(cls, value: str) -> str:
        if value and not all(33 <= ord(c) <= 126 and c != ":" for c in value):
            raise ValueError(f"header {value!r} is not a header field name")
        return value

    @model_validator(mode="after")
    def _check_references(self) -> EgressConfig:
        if not self.sources:
            if self.pools or self.domains or self.default_pool:
                raise ValueError("pools, domains and default_pool need [delivery.egress.sources]")
            return self
        for name, pool in self.pools.items():
            unknown = [s for s in pool.sources if s not in self.sources]
            if unknown:
                raise ValueError(f"pool {name!r} names unknown sources: {', '.join(unknown)}")
        if self.default_pool is None:
            raise ValueError("default_pool must name the pool of mail no rule places")
        named = {f"default_pool {self.default_pool!r}": self.default_pool}
        named.update({f"domains.{d!r}": pool for d, pool in self.domains.items()})
        for where, pool_name in named.items():
            if pool_name not in self.pools:
                known = ", ".join(sorted(self.pools)) or "none"
                raise ValueError(
                    f"{where} names pool {pool_name!r}, not defined (defined: {known})"
                )
        addresses = [str(s.address) for s in self.sources.values()]
        if len(set(addresses)) != len(addresses):
            raise ValueError("two sources have the same address")
        return self


@dataclass(frozen=True, slots=True)
class Source:
    """A chosen source: its name (for events and metrics), address and EHLO name."""

    name: str
    address: str
    ehlo_name: str


class Egress:
    """Chooses the source of each message (pure, apart from :func:`address_missing`)."""

    def __init__(self, config: EgressConfig) -> None:
        self.config = config
        self._pools = {
            name: [
                (
                    Source(s, str(config.sources[s].address), config.sources[s].ehlo_name),
                    config.sources[s].weight,
                )
                for s in pool.sources
            ]
            for name, pool in config.pools.items()
        }
        self._header = config.header.lower().encode()

    @property
    def enabled(self) -> bool:
        return bool(self.config.sources)

    def header_pool(self, body: bytes) -> str | None:
        """The pool the message's header names (its first such field), if any."""
        if not self._header:
            return None
        for name, value, _ in _header_fields(body):
            if name == self._header:
                return value.decode("ascii", "replace").strip()
        return None

    def strip(self, body: bytes) -> bytes:
        """The message without the pool header (no other byte changes)."""
        if not self._header:
            return body
        kept = [raw for name, _, raw in _header_fields(body) if name != self._header]
        end = _header_end(body)
        return b"".join(kept) + body[end:] if end is not None else body

    def choose(self, queue_id: str, sender: str, header_pool: str | None) -> tuple[Source, str]:
        """The source of a message, and why its pool (for the event when the header is
        unknown: such a message falls to the sender's or the default pool)."""
        domain = sender.rpartition("@")[2].lower().rstrip(".")
        if header_pool in self._pools:
            pool, why = header_pool, "header"
        elif domain in self.config.domains:
            pool, why = self.config.domains[domain], "domain"
        else:
            pool, why = self.config.default_pool or "", "default"
        if header_pool is not None and header_pool not in self._pools:
            why += f" (header names unknown pool {header_pool!r})"
        members = self._pools[pool]
        total = sum(weight for _, weight in members)
        point = int.from_bytes(hashlib.sha256(queue_id.encode()).digest()[:8], "big") % total
        for source, weight in members:
            if point < weight:
                return source, f"pool {pool} by {why}"
            point -= weight
        raise AssertionError("weights exhausted")  # unreachable: point < total


def address_missing(address: str) -> str | None:
    """Why ``address`` cannot be sent from on this host now (not configured), else None."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"egress address {address} is not configured on this host"
            return f"egress address {address} cannot be bound: {exc.strerror}"
    return None


def _header_end(body: bytes) -> int | None:
    """Where the header block ends (after its blank line), or None with no blank line."""
    for separator in (b"\r\n\r\n", b"\n\n"):
        at = body.find(separator)
        if at >= 0:
            return at + len(separator) // 2
    return None


def _header_fields(body: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(lower-case name, unfolded value, raw bytes) of each header field."""
    end = _header_end(body)
    if end is None:
        return []
    fields: list[tuple[bytes, bytes, bytes]] = []
    for line in body[:end].splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            name, value, raw = fields[-1]
            fields[-1] = (name, value + line.strip(b"\r\n"), raw + line)
            continue
        name, colon, value = line.partition(b":")
        # A line that is no field is kept as it is (stripping changes no other byte).
        fields.append(
            (name.strip().lower(), value.strip(b"\r\n"), line) if colon else (b"", b"", line)
        )
    return fields
