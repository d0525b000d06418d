"""The relay's configuration: a TOML file validated into immutable models.

Every key is checked before anything starts, so the relay never runs half-configured. An
unknown key, a value of the wrong type or out of range is reported as ``section.key: reason``.
With no file, :data:`DEFAULT_TOML` applies: SMTP on 127.0.0.1:2525 and a spool under
``./var/spool``, enough for the README's first command on a fresh machine.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import tomllib
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from hamta.bounce_classes import build_classifier
from hamta.egress import EgressConfig
from hamta.open_relay import open_networks

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_FACTOR = {"k": 1024, "m": 1024**2, "g": 1024**3}
_HOST_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$")


class ConfigError(Exception):
    """A configuration that cannot be used; the message names each bad key and why."""


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


def _parse_duration(value: Any) -> Any:
    _no_bool(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 5m, 2h, 5d)")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


def _parse_size(value: Any) -> Any:
    _no_bool(value)
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"not a size: {value!r} (use e.g. 512k, 10m, 1g)")
        unit = (match.group(2) or "")[:1].lower()
        return int(match.group(1)) * _SIZE_FACTOR.get(unit, 1)
    return value


def _parse_network(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ValueError(f"not an IP network: {exc}") from None
    return value


Seconds = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0, allow_inf_nan=False)]
PositiveSeconds = Annotated[
    float, BeforeValidator(_parse_duration), Field(gt=0, allow_inf_nan=False)
]
Count = Annotated[int, BeforeValidator(_no_bool), Field(gt=0)]
Ratio = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
IPNetwork = Annotated[IPv4Network | IPv6Network, BeforeValidator(_parse_network)]
Bytes = Annotated[int, BeforeValidator(_parse_size), Field(gt=0)]


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or ``[host]:port``; the port may default."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"unbalanced bracket in {text!r}")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after ] in {text!r}")
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not port_text:
        if default_port is None:
            raise ValueError(f"no port in {text!r}")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


#: The most relay processes one node runs (``node.workers``).
MAX_WORKERS = 64


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a cgroup's cpuset also narrows),
    at most :data:`MAX_WORKERS`: the default number of relay processes."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def _loopback_networks() -> list[IPNetwork]:
    return [IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeConfig(_Section):
    """Who this relay says it is, in EHLO, Received: headers and DSNs."""

    hostname: str = Field(default_factory=socket.getfqdn, min_length=1)
    # How long a graceful stop lets sessions and deliveries under way finish.
    stop_timeout: Seconds = 10.0
    # Relay processes sharing the SMTP port, one spool shard each (hamta/workers.py). Unset:
    # one per CPU this process may run on, as a relay process is CPU-bound on one core.
    workers: Annotated[int, BeforeValidator(_no_bool), Field(ge=1, le=MAX_WORKERS)] = Field(
        default_factory=usable_cpus
    )
    # Who the relay runs as once its SMTP sockets are bound (hamta/privileges.py). Unset: a
    # relay started as root becomes "hamta" (and refuses to start without that user); "root"
    # keeps root on purpose. group: the user's own group unless set. Looked up when the relay
    # starts, not here: a controller renders and checks configurations for hosts it is not.
    user: str | None = Field(default=None, min_length=1)
    group: str | None = Field(default=None, min_length=1)


ListenerRole = Literal["smtp", "submission", "submissions"]


class ListenerConfig(_Section):
    """One SMTP listening address and what it is for (``[[smtp.listeners]]``).

    ``smtp`` (port 25): relay for ``relay_networks`` (and for authenticated sessions when ``auth``
    names a backend), STARTTLS offered. ``submission`` (587): STARTTLS, then AUTH, before any
    MAIL. ``submissions`` (465): TLS from the first byte (RFC 8314), then AUTH before MAIL.
    """

    listen: str
    role: ListenerRole = "smtp"
    # The name of an ``[auth.backends.NAME]`` that checks this listener's logins; none: no AUTH.
    auth: str | None = Field(default=None, min_length=1)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        parse_hostport(value)
        return value


class SmtpConfig(_Section):
    """The receiving side."""

    # Every listening address (the listeners' own when ``listeners`` is given).
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:2525"], min_length=1)
    # The listeners with their roles; without it each ``listen`` address is an ``smtp`` one.
    listeners: list[ListenerConfig] = Field(default_factory=list)
    max_message_size: Bytes = 25 * 1024 * 1024
    max_recipients: Count = 100
    # RFC 5321 4.5.3.1.6: 998 characters plus CRLF.
    max_line_length: Annotated[int, BeforeValidator(_no_bool), Field(ge=78)] = 998
    relay_networks: list[IPNetwork] = Field(default_factory=_loopback_networks)
    # Only this lets relay_networks cover a large part of the internet (hamta/open_relay.py).
    allow_open_relay: bool = False
    session_timeout: PositiveSeconds = 300.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Sessions at once (more get 421 4.7.0): each holds a file descriptor and buffers.
    max_connections: Count = 1000
    # Sessions at once from one address outside relay_networks (relay clients are exempt).
    max_connections_per_client: Count = 50
    # A session's whole length however busy, so that NOOPs cannot hold one forever (421 4.4.2).
    max_session_time: PositiveSeconds = 1800.0
    # DATA slower than this many bytes a second after data_rate_grace is cut (421 4.4.2); 0: off.
    min_data_rate: Annotated[int, BeforeValidator(_parse_size), Field(ge=0)] = 500
    data_rate_grace: PositiveSeconds = 10.0
    # Back-pressure: MAIL gets 452 4.3.1 while the spool holds this many messages, or while the
    # process's resident memory is above max_memory (0: no limit).
    max_queued_messages: Count = 1_000_000
    max_memory: Annotated[int, BeforeValidator(_parse_size), Field(ge=0)] = 0

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_hostport(item)
        return value

    @model_validator(mode="before")
    @classmethod
    def _listeners_or_listen(cls, data: Any) -> Any:
        # The older single list of addresses stays valid: each becomes an smtp listener. Both
        # at once would leave it unclear which addresses are meant, so that is refused.
        if not isinstance(data, dict):
            return data
        if "listeners" in data:
            if "listen" in data:
                raise ValueError(
                    "give smtp.listeners or smtp.listen, not both (smtp.listen is the older "
                    "form: one smtp listener per address)"
                )
            listeners = data["listeners"]
            if isinstance(listeners, list):
                addresses = [item.get("listen") for item in listeners if isinstance(item, dict)]
                if all(isinstance(item, str) for item in addresses) and addresses:
                    return {**data, "listen": addresses}
            return data
        listen = data.get("listen", ["127.0.0.1:2525"])
        if isinstance(listen, list) and all(isinstance(item, str) for item in listen):
            return {**data, "listeners": [{"listen": item, "role": "smtp"} for item in listen]}
        return data

    @model_validator(mode="after")
    def _check_listeners(self) -> SmtpConfig:
        if len(set(self.listen)) != len(self.listen):
            raise ValueError("listeners: an address is given twice")
        for item in self.listeners:
            if item.role != "smtp" and item.auth is None:
                raise ValueError(
                    f"listeners: {item.listen} ({item.role}) needs auth = the name of an "
                    "[auth.backends] entry: a submission listener takes mail only after AUTH"
                )
            if (item.role != "smtp" or item.auth is not None) and self.tls_cert is None:
                raise ValueError(
                    f"listeners: {item.listen} ({item.role}, auth) needs smtp.tls_cert and "
                    "smtp.tls_key: AUTH is never offered without TLS"
                )
        return self

    @model_validator(mode="after")
    def _check_open_relay(self) -> SmtpConfig:
        wide = open_networks(self.relay_networks)
        if wide and not self.allow_open_relay:
            names = ", ".join(str(network) for network in wide)
            raise ValueError(
                f"relay_networks: {names} covers a large part of the internet and would make an "
                "open relay; narrow it, or set smtp.allow_open_relay = true if that is meant"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _check_tls_pair_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("tls_cert" in data) != ("tls_key" in data):
            raise ValueError("tls_cert and tls_key go together")
        return data

    @field_validator("tls_cert", "tls_key")
    @classmethod
    def _check_readable(cls, value: Path | None) -> Path | None:
        if value is not None and not os.access(value, os.R_OK):
            raise ValueError(f"cannot read {value}")
        return value

    @model_validator(mode="after")
    def _check_connection_limits(self) -> SmtpConfig:
        if self.max_connections_per_client > self.max_connections:
            raise ValueError(
                f"max_connections_per_client ({self.max_connections_per_client}) is above "
                f"max_connections ({self.max_connections})"
            )
        return self

    @model_validator(mode="after")
    def _check_tls_pair(self) -> SmtpConfig:
        if self.tls_cert is not None and self.tls_key is not None:
            # Load them now, so that a missing or mismatched file is a config error, not a
            # relay that dies while starting.
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    self.tls_cert, self.tls_key
                )
            except (OSError, ssl.SSLError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                raise ValueError(
                    f"cannot load tls_cert {self.tls_cert} with tls_key {self.tls_key}: {reason}"
                ) from None
        return self


class SpoolConfig(_Section):
    """Where accepted mail lives until it is delivered or bounced."""

    path: Path = Path("./var/spool")
    segment_size: Bytes = 64 * 1024 * 1024
    # Journal bytes written since the last checkpoint that trigger the next one.
    journal_size: Bytes = 64 * 1024 * 1024
    # New mail is refused (452 4.3.1) when less than this is free, so that delivered mail can
    # still be recorded and deleted on a nearly full spool.
    min_free: Annotated[int, BeforeValidator(_parse_size), Field(ge=0)] = 32 * 1024 * 1024


# off: plain text; opportunistic: STARTTLS when offered, and a domain's published DANE or
# MTA-STS policy applies; required: TLS or defer, unverified; verify: TLS with a certificate
# valid for the MX name (tls_policy.ca_file) or defer; dane: DANE-authenticated TLS or defer.
TlsMode = Literal["opportunistic", "required", "verify", "dane", "off"]


class DestinationLimits(_Section):
    """Traffic shaping of a destination (``[delivery.limits]`` or ``[delivery.domains."d"]``).

    Every key is optional: a domain's override falls back to ``[delivery.limits]``, which falls
    back to the older keys (``max_connections_per_destination``, ``max_messages_per_connection``,
    ``[retry]``). The figures are for the whole node; with several workers each takes its share.
    """

    max_connections: Count | None = None
    # 0: no limit. A token bucket of ``burst`` messages, refilled at this rate.
    messages_per_second: Annotated[Ratio, Field(ge=0.0)] | None = None
    burst: Count | None = None
    max_messages_per_connection: Count | None = None
    retry_first_delay: PositiveSeconds | None = None
    retry_factor: Annotated[Ratio, Field(ge=1.0)] | None = None
    retry_max_delay: PositiveSeconds | None = None
    # While throttled (a 421/450/451 that says so): the rate is never halved below this ...
    min_messages_per_second: Annotated[Ratio, Field(gt=0.0)] | None = None
    # ... and each period without a throttle reply steps rate and connections back up.
    throttle_quiet_period: PositiveSeconds | None = None
    # Outbound TLS for this destination (hamta/tls_policy.py); unset: [delivery] starttls.
    tls: TlsMode | None = None

    @model_validator(mode="after")
    def _check_retry(self) -> DestinationLimits:
        first, most = self.retry_first_delay, self.retry_max_delay
        if first is not None and most is not None and first > most:
            raise ValueError(f"retry_first_delay ({first:g}s) exceeds retry_max_delay ({most:g}s)")
        return self


class DeliveryConfig(_Section):
    """The sending side."""

    port: Annotated[int, BeforeValidator(_no_bool), Field(gt=0, lt=65536)] = 25
    helo_name: str | None = None
    connect_timeout: PositiveSeconds = 30.0
    command_timeout: PositiveSeconds = 120.0
    max_connections_per_destination: Count = 20
    max_messages_per_connection: Count = 100
    idle_connection_timeout: Seconds = 2.0
    # The default TLS policy of every destination (hamta/tls_policy.py, docs/tls-policy.md).
    starttls: TlsMode = "opportunistic"
    routes: dict[str, str] = Field(default_factory=dict)
    # A TOML file of bounce classification rules tried before hamta's own
    # (hamta/bounce_classes.py); loaded now, so that a broken file is a configuration error.
    bounce_rules: Path | None = None
    # A message's failed recipients are collected this long for one DSN (hamta.dsn_batch), and
    # a sender domain gets at most this many DSNs a minute (beyond: not sent, counted).
    dsn_window: Seconds = 2.0
    dsn_rate_per_domain: Count = 60
    limits: DestinationLimits = Field(default_factory=DestinationLimits)
    # Keyed by recipient domain, or by a static route's "[host]:port" (its destination).
    domains: dict[str, DestinationLimits] = Field(default_factory=dict)
    # Source addresses and EHLO names, in pools (hamta/egress.py); none: the host's own.
    egress: EgressConfig = Field(default_factory=EgressConfig)

    @field_validator("domains")
    @classmethod
    def _check_domains(cls, value: dict[str, DestinationLimits]) -> dict[str, DestinationLimits]:
        normalised = {domain.lower().rstrip("."): limits for domain, limits in value.items()}
        if "" in normalised or len(normalised) != len(value):
            raise ValueError("domain names must be non-empty and differ other than in case")
        return normalised

    @field_validator("bounce_rules")
    @classmethod
    def _check_bounce_rules(cls, value: Path | None) -> Path | None:
        if value is not None:
            build_classifier(value)  # BounceRulesError is a ValueError: file, rule, reason
        return value

    @field_validator("routes")
    @classmethod
    def _check_routes(cls, value: dict[str, str]) -> dict[str, str]:
        for domain, target in value.items():
            if not target.startswith("["):
                raise ValueError(f"route for {domain!r} must be '[host]:port', got {target!r}")
            parse_hostport(target, default_port=25)
        return {domain.lower().rstrip("."): target for domain, target in value.items()}


class RetryConfig(_Section):
    """Backoff for temporary failures and the lifetime of a queued message."""

    first_delay: PositiveSeconds = 60.0
    factor: Annotated[Ratio, Field(ge=1.0)] = 2.0
    max_delay: PositiveSeconds = 3600.0
    jitter: Annotated[Ratio, Field(ge=0.0, lt=1.0)] = 0.2
    max_queue_lifetime: PositiveSeconds = 5 * 86400.0


class DnsConfig(_Section):
    """Resolvers for MX and address lookups; empty means the system's."""

    nameservers: list[str] = Field(default_factory=list)
    timeout: PositiveSeconds = 5.0
    # Trust the resolvers' AD bit (DNSSEC validated), as Postfix's smtp_dns_support_level =
    # dnssec: DANE (RFC 7672) needs it. Only for a validating resolver on a trusted path
    # (loopback or the same host): an AD bit from anywhere else proves nothing.
    dnssec: bool = False

    @model_validator(mode="after")
    def _check_dnssec(self) -> DnsConfig:
        if self.dnssec and not self.nameservers:
            raise ValueError(
                "dnssec = true needs nameservers: the validating resolver whose AD bit is "
                "trusted, named explicitly (not whatever resolv.conf says)"
            )
        return self

    @field_validator("nameservers")
    @classmethod
    def _check_nameservers(cls, value: list[str]) -> list[str]:
        for item in value:
            host, _ = parse_hostport(item, default_port=53)
            ipaddress.ip_address(host)
        return value


class TlsPolicyConfig(_Section):
    """Outbound TLS policies: MTA-STS (RFC 8461) and TLS reporting (RFC 8460)."""

    # CA certificates (PEM) for MTA-STS policy fetches and for verifying MX certificates
    # (starttls = "verify", MTA-STS); unset: the system's store.
    ca_file: Path | None = None
    # Look up and honour the MTA-STS policies domains publish.
    mta_sts: bool = True
    # Fetching a policy over HTTPS: at most this long, and this many bytes (RFC 8461 3.3).
    mta_sts_fetch_timeout: PositiveSeconds = 10.0
    mta_sts_max_size: Bytes = 64 * 1024
    # TLS reports (RFC 8460) to the domains that publish _smtp._tls, from this address
    # (unset: postmaster@[node] hostname); the counts are written at most this far apart.
    tls_reports: bool = True
    tls_report_from: str | None = None
    tls_report_flush_interval: PositiveSeconds = 60.0

    @field_validator("ca_file")
    @classmethod
    def _check_ca_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                ssl.create_default_context(cafile=str(value))
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load CA certificates from {value}: {exc}") from None
        return value


class AdminConfig(_Section):
    """The HTTP endpoint for health, queue and metrics; empty listen disables it."""

    listen: str = "127.0.0.1:8025"
    # /metrics: per-destination series for the N deepest queues, the rest as "other".
    top_destinations: Count = 20
    # /api/domains: rates over this window; at most this many domains remembered.
    domain_stats_window: PositiveSeconds = 3600.0
    domain_stats_max: Count = 2000
    # The dashboard at /: a sample every interval, this many kept (720 x 5 s = the last hour).
    dashboard_interval: PositiveSeconds = 5.0
    dashboard_samples: Count = 720
    # Names (no port) answered besides the listen address and localhost (hamta/admin_guard.py).
    allowed_hosts: list[str] = Field(default_factory=list)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: list[str]) -> list[str]:
        for name in value:
            bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
            if ":" in bare:
                try:
                    ipaddress.IPv6Address(bare)
                except ValueError:
                    bare = ""
            if not (":" in bare or _HOST_NAME.match(bare)):
                raise ValueError(f"not a host name or IP address without a port: {name!r}")
        return value

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value:
            parse_hostport(value)
        return value


class ControlConfig(_Section):
    """The local unix socket through which a warm standby relay is activated."""

    socket: Path = Path("./var/run/hamta-relay.sock")


class LogConfig(_Section):
    """Event log: one JSON object a line."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    file: Path | None = None


# Signed when present (RFC 6376 5.4.1's list, trimmed to what MUAs show or thread on).
DKIM_DEFAULT_HEADERS = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "content-transfer-encoding", "list-id",
    "list-unsubscribe", "list-unsubscribe-post",
)  # fmt: skip
# Changed on the way by design (RFC 6376 5.4.1): signing them breaks every signature.
DKIM_UNSIGNABLE_HEADERS = frozenset(
    {"return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature"}
)
_DKIM_SELECTOR = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_-]+)*$")
_DOMAIN = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>\[\]]+$")


class DkimKeyConfig(_Section):
    """One DKIM signing key: the domain it signs for, its selector and the private key file."""

    domain: str
    selector: str
    key: Path
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"

    @field_validator("domain")
    @classmethod
    def _check_domain(cls, value: str) -> str:
        value = value.strip().lower().rstrip(".")
        if not _DOMAIN.match(value):
            raise ValueError(f"not a domain name: {value!r}")
        return value

    @field_validator("selector")
    @classmethod
    def _check_selector(cls, value: str) -> str:
        if not _DKIM_SELECTOR.match(value):
            raise ValueError(f"not a DKIM selector (RFC 6376 3.1): {value!r}")
        return value

    @model_validator(mode="after")
    def _check_key(self) -> DkimKeyConfig:
        # Loaded now, so that a missing or malformed key is a config error, not a relay that
        # starts and then sends mail unsigned. Imported here: only configs with keys pay for it.
        from hamta.dkim_signing import DkimKeyError, load_signing_key  # noqa: PLC0415

        try:
            load_signing_key(self.key, self.domain, self.selector, self.algorithm)
        except DkimKeyError as exc:
            raise ValueError(str(exc)) from None
        return self


class DkimConfig(_Section):
    """DKIM signing at reception; a domain with two keys (a rotation) gets two signatures."""

    keys: list[DkimKeyConfig] = Field(default_factory=list)
    headers: list[str] = Field(default_factory=lambda: list(DKIM_DEFAULT_HEADERS))

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: list[str]) -> list[str]:
        names = [name.strip().lower() for name in value]
        if "from" not in names:
            raise ValueError("must include from (RFC 6376 5.4)")
        unsignable = sorted(set(names) & DKIM_UNSIGNABLE_HEADERS)
        if unsignable:
            raise ValueError(f"must not include {', '.join(unsignable)} (changed in transit)")
        return list(dict.fromkeys(names))

    @field_validator("keys")
    @classmethod
    def _check_unique(cls, value: list[DkimKeyConfig]) -> list[DkimKeyConfig]:
        seen = set()
        for key in value:
            if (key.domain, key.selector) in seen:
                raise ValueError(f"selector {key.selector!r} of {key.domain} is given twice")
            seen.add((key.domain, key.selector))
        return value


class SuppressionConfig(_Section):
    """Recipients not mailed again (hard bounces, complaints); where reports arrive."""

    # ARF feedback reports (RFC 5965) sent here are consumed by the relay, never relayed.
    complaints_address: str | None = None
    # DSNs (RFC 3464) of mail relayed earlier, sent here or to local+tag@ (VERP): consumed too.
    bounces_address: str | None = None
    # How many days a signed return path (hamta.return_paths) stays good for a DSN to it.
    bounce_address_days: Annotated[int, BeforeValidator(_no_bool), Field(ge=1, le=365)] = 7
    # Complaints are acted on only from these client networks, or when DKIM-signed by one of
    # these domains (hamta.report_trust); others are logged and counted, and suppress nobody.
    complaint_networks: list[IPNetwork] = Field(default_factory=list)
    complaint_dkim_domains: list[str] = Field(default_factory=list)
    # quarantine/ (unreadable reports, hamta.report_quarantine): at most this much (past it,
    # 452), each kept this long, then swept away.
    quarantine_max_size: Bytes = 64 * 1024 * 1024
    quarantine_max_files: Count = 1000
    quarantine_retention: PositiveSeconds = 14 * 86400.0
    # Reports one client address may send a minute (hamta.report_rate; 450 4.7.1 beyond);
    # complaint_networks are not limited.
    report_rate_per_client: Count = 30
    # A recipient whose domain keeps failing (NXDOMAIN, null MX, no route) is suppressed only
    # after this long, for this long (hamta.suppression.DomainFailurePolicy).
    domain_failure_period: PositiveSeconds = 3 * 86400.0
    domain_failure_expiry: PositiveSeconds = 30 * 86400.0
    # What one report to those addresses may name and nest (hamta.report_shape): past these it
    # is not read but quarantined as suspicious.
    report_max_recipients: Annotated[int, BeforeValidator(_no_bool), Field(ge=1, le=1000)] = 10
    report_max_parts: Annotated[int, BeforeValidator(_no_bool), Field(ge=3, le=500)] = 50

    @field_validator("complaints_address", "bounces_address")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is not None:
            value = value.strip().lower()
            if not _ADDRESS.match(value):
                raise ValueError(f"not an address: {value!r}")
        return value

    @field_validator("complaint_dkim_domains")
    @classmethod
    def _check_domains(cls, value: list[str]) -> list[str]:
        domains = [item.strip().lower().rstrip(".") for item in value]
        for domain in domains:
            if not _DOMAIN.match(domain):
                raise ValueError(f"not a domain: {domain!r}")
        return domains


class AuthBackendConfig(_Section):
    """Where a listener's logins are checked (``[auth.backends.NAME]``).

    ``password_file``: ``user:hash`` lines, argon2id or bcrypt hashes (``hamta auth add``).
    ``dovecot``: Dovecot's auth service, over its ``auth-client`` unix socket.
    """

    type: Literal["password_file", "dovecot"]
    path: Path | None = None  # password_file
    socket: Path | None = None  # dovecot
    # A Dovecot that does not answer within this long is a temporary failure (454 4.7.0).
    timeout: PositiveSeconds = 5.0

    @model_validator(mode="after")
    def _check_kind(self) -> AuthBackendConfig:
        if self.type == "password_file" and (self.path is None or self.socket is not None):
            raise ValueError("a password_file backend takes path (and no socket)")
        if self.type == "dovecot" and (self.socket is None or self.path is not None):
            raise ValueError("a dovecot backend takes socket (and no path)")
        return self


class AuthUserConfig(_Section):
    """What one authenticated user may send (``[auth.users."name"]``).

    ``senders``: envelope senders, an address or ``@domain`` for a whole domain; unset, a login
    that is an address may use that address only. ``from_domains``: the domains its ``From:``
    may name; unset, those of ``senders``.
    """

    senders: list[str] | None = None
    from_domains: list[str] | None = None
    # Messages a minute (beyond: 450 4.7.1); unset: no limit.
    messages_per_minute: Count | None = None

    @field_validator("senders")
    @classmethod
    def _check_senders(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        senders = [item.strip().lower() for item in value]
        for item in senders:
            if item.startswith("@"):
                if not _DOMAIN.match(item[1:]):
                    raise ValueError(f"not a domain after @: {item!r}")
            elif not _ADDRESS.match(item):
                raise ValueError(f"not an address or @domain: {item!r}")
        return senders

    @field_validator("from_domains")
    @classmethod
    def _check_from_domains(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        domains = [item.strip().lower().rstrip(".") for item in value]
        for domain in domains:
            if not _DOMAIN.match(domain):
                raise ValueError(f"not a domain: {domain!r}")
        return domains


class AuthConfig(_Section):
    """SMTP AUTH: the credential backends, failed-login limits and per-user policies."""

    backends: dict[str, AuthBackendConfig] = Field(default_factory=dict)
    users: dict[str, AuthUserConfig] = Field(default_factory=dict)
    # Failed logins counted over failure_window, per client address and per user: each failure
    # delays the next reply (backoff doubling from failure_delay up to max_failure_delay); at
    # max_failures_per_client (or _per_user) AUTH gets 454 4.7.0 for lockout.
    failure_window: PositiveSeconds = 600.0
    failure_delay: Seconds = 1.0
    max_failure_delay: Seconds = 8.0
    max_failures_per_client: Count = 10
    max_failures_per_user: Count = 20
    lockout: PositiveSeconds = 900.0

    @model_validator(mode="after")
    def _check_delays(self) -> AuthConfig:
        if self.failure_delay > self.max_failure_delay:
            raise ValueError(
                f"failure_delay ({self.failure_delay:g}s) exceeds max_failure_delay "
                f"({self.max_failure_delay:g}s)"
            )
        return self


class Config(_Section):
    """The whole relay configuration."""

    node: NodeConfig = Field(default_factory=NodeConfig)
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    tls_policy: TlsPolicyConfig = Field(default_factory=TlsPolicyConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    dkim: DkimConfig = Field(default_factory=DkimConfig)
    suppression: SuppressionConfig = Field(default_factory=SuppressionConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)

    @model_validator(mode="after")
    def _check_listener_backends(self) -> Config:
        for item in self.smtp.listeners:
            if item.auth is not None and item.auth not in self.auth.backends:
                known = ", ".join(sorted(self.auth.backends)) or "none"
                raise ValueError(
                    f"smtp.listeners: {item.listen} names auth backend {item.auth!r}, which "
                    f"[auth.backends] does not define (defined: {known})"
                )
        return self

    @model_validator(mode="after")
    def _check_dane(self) -> Config:
        delivery = self.delivery
        wanting = ["delivery.starttls"] if delivery.starttls == "dane" else []
        wanting += [
            f'delivery.domains."{d}"' for d, lim in delivery.domains.items() if lim.tls == "dane"
        ]
        if wanting and not self.dns.dnssec:
            raise ValueError(
                f'tls = "dane" ({", ".join(wanting)}) needs [dns] dnssec = true and a '
                "validating resolver in [dns] nameservers"
            )
        return self


DEFAULT_TOML = """\
# hamta's built-in configuration, used when no --config is given.
[smtp]
listen = ["127.0.0.1:2525"]

[spool]
path = "./var/spool"

[admin]
listen = "127.0.0.1:8025"
"""


def format_errors(error: ValidationError, source: str) -> str:
    """A ConfigError message from a pydantic error: one `section.key: reason` line each."""
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        reason = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            reason = "unknown key"
        lines.append(f"  {where}: {reason}")
    return "\n".join(lines)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate TOML text; raise :class:`ConfigError` with every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None


def load_config(path: Path | None) -> Config:
    """Load the file at ``path``, or the embedded default when ``path`` is None."""
    if path is None:
        return parse_config(DEFAULT_TOML, "<built-in default>")
    return parse_config(read_config_file(path), str(path))


def read_config_file(path: Path) -> str:
    """The text of a configuration file, or ConfigError saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
