"""The monitor's own configuration file (monitor.toml): where it listens, its store, its checks.

Each check is a table of ``[[checks]]`` with a ``kind``; its interval and timeout default to the
issue's table for that kind. Errors name the check (by its ``name``, else its position) and the
key, one line each, so that a typo in the twentieth check is found at once.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cluster.coordination_layout import CoordinationError, Credentials
from cluster.zk_acl import check_digest_id, split_chroot
from hamta.config import (
    ConfigError,
    Count,
    PositiveSeconds,
    Seconds,
    load_config,
    parse_hostport,
    read_config_file,
)
from hamta.dkim_signing import DkimKeyError, SigningKey, load_signing_key
from monitor.alerting_config import (
    NOTIFIER_KINDS,
    AlertingConfig,
    EmailNotifier,
    EscalationStep,
    MaintenanceWindow,
    Notifier,
)

__all__ = ["Check", "ConfigError", "MonitorConfig", "load_monitor_config", "parse_monitor_config"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DOMAIN = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
MINUTE, DAY = 60.0, 86400.0


def _domain(value: str) -> str:
    value = value.strip().lower().rstrip(".")
    if not _DOMAIN.match(value):
        raise ValueError(f"not a domain name: {value!r}")
    return value


def _hostport(value: str) -> str:
    parse_hostport(value)  # a ValueError names what is wrong
    return value


def _nameserver(value: str) -> str:
    """``addr``, ``addr:port`` or ``[v6]:port``; the port defaults to 53."""
    if value.startswith("[") or value.count(":") == 1:
        parse_hostport(value)
        return value
    if ":" in value:  # a bare IPv6 address
        return f"[{value}]:53"
    return f"{value}:53"


Domain = Annotated[str, AfterValidator(_domain)]
HostPort = Annotated[str, AfterValidator(_hostport)]
Nameserver = Annotated[str, AfterValidator(_nameserver)]
Port = Annotated[int, Field(gt=0, lt=65536)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _CheckBase(_Model):
    """What every check has; subclasses set ``kind`` and their interval/timeout defaults."""

    name: str
    interval: PositiveSeconds = MINUTE
    timeout: PositiveSeconds = 30.0
    # N consecutive failures to go down, M consecutive successes to come back (Gatus' names).
    failure_threshold: Count = 3
    success_threshold: Count = 2
    # A success slower than this is "degraded", not "down".
    degraded_after: PositiveSeconds = 5.0

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"not a check name (letters, digits, _ . -; 64 at most): {value!r}")
        return value

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> _CheckBase:
        # A check still running when its next run is due would pile runs up behind it.
        if self.timeout > self.interval:
            raise ValueError(
                f"timeout ({self.timeout:g}s) is longer than interval ({self.interval:g}s)"
            )
        return self


class _TlsOptions(_Model):
    # The CA bundle the peer's chain must lead to; None: the system's store.
    ca_file: Path | None = None
    # The name the certificate must carry; None: the host.
    server_name: str | None = None

    @field_validator("ca_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value


class SmtpCheck(_CheckBase, _TlsOptions):
    """Port 25: banner, EHLO, response time; STARTTLS offered and negotiated when asked."""

    kind: Literal["smtp"]
    host: str
    port: Port = 25
    ehlo_name: str = "monitor.invalid"
    starttls: bool = False
    # The cluster's service address (the VIP): published as such, for the agent's rules to find.
    service: bool = False
    # The cluster node this address is (not the VIP): while [cluster] says it is passive, its
    # refusals are "standby" (a passive node does not listen on port 25).
    node: str | None = None


class Login(_Model):
    """A probe account: the password is read from a file, never written in monitor.toml."""

    username: str
    password_file: Path

    @field_validator("password_file")
    @classmethod
    def _readable(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    def password(self) -> str:
        return self.password_file.read_text().strip()


class SubmissionCheck(_CheckBase, _TlsOptions):
    """Port 587: STARTTLS, then AUTH advertised; optionally a real login."""

    kind: Literal["submission"]
    host: str
    port: Port = 587
    ehlo_name: str = "monitor.invalid"
    login: Login | None = None


class SmtpsCheck(_CheckBase, _TlsOptions):
    """Port 465: implicit TLS, AUTH advertised; optionally a real login."""

    kind: Literal["smtps"]
    host: str
    port: Port = 465
    ehlo_name: str = "monitor.invalid"
    login: Login | None = None


class TlsCheck(_CheckBase, _TlsOptions):
    """The certificate and protocol of ``starttls://host:port`` or ``tls://host:port``."""

    kind: Literal["tls"]
    endpoint: str
    interval: PositiveSeconds = DAY
    ehlo_name: str = "monitor.invalid"
    # Days before expiry at which the check warns (the nearest one is named).
    warn_days: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [30, 14, 7])

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("starttls", "tls"):
            raise ValueError(f"use starttls://host:port or tls://host:port, not {value!r}")
        if not parts.hostname or parts.port is None:
            raise ValueError(f"no host or port in {value!r}")
        return value

    @property
    def implicit(self) -> bool:
        return urlsplit(self.endpoint).scheme == "tls"

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.endpoint).port or 0


class Egress(_Model):
    """An address the relay sends from and the EHLO name its PTR must give (and resolve back)."""

    address: str
    ehlo_name: Domain

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        return str(ipaddress.ip_address(value))


class DnsCheck(_CheckBase):
    """MX of ``domain``, the addresses of its exchanges and ``names``, PTR of each egress."""

    kind: Literal["dns"]
    domain: Domain
    names: list[Domain] = Field(default_factory=list)
    egress: list[Egress] = Field(default_factory=list)
    interval: PositiveSeconds = 5 * MINUTE
    timeout: PositiveSeconds = 10.0


class AuthRecordsCheck(_CheckBase):
    """SPF, DMARC, the relay's DKIM keys of ``domain``, MTA-STS and TLS-RPT."""

    kind: Literal["auth_records"]
    domain: Domain
    interval: PositiveSeconds = 15 * MINUTE
    timeout: PositiveSeconds = 10.0
    # RFC 7208 4.6.4: more DNS-querying terms than this is a permerror.
    max_spf_lookups: Count = 10


class RelayCheck(_CheckBase):
    """The relay's admin endpoint: /health/ready and the figures of /api/queue."""

    kind: Literal["relay"]
    url: str
    timeout: PositiveSeconds = 10.0
    # Past either, the check warns: mail is piling up or failing somewhere.
    max_depth: Annotated[int, Field(ge=0)] = 10_000
    max_deferred: Annotated[int, Field(ge=0)] = 1_000
    # The cluster node whose relay this is: while [cluster] says it is passive, "standby".
    node: str | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {value!r}")
        return value.rstrip("/")


class RoundTripCheck(_CheckBase, _TlsOptions):
    """A probe message through ``host:port`` to ``recipient``, followed to its delivery.

    Followed in the relay's event log (``relay_log``: its Reception, Delivery and
    TransientFailure lines), in the probe mailbox (``mailbox``: a Maildir, or a directory of
    one file a message), or both: then it has arrived only when it is in the mailbox.
    """

    kind: Literal["round_trip"]
    host: str
    port: Port = 25
    ehlo_name: str = "monitor.invalid"
    starttls: bool = False
    login: Login | None = None
    sender: str
    recipient: str
    relay_log: Path | None = None
    mailbox: Path | None = None
    interval: PositiveSeconds = 5 * MINUTE
    timeout: PositiveSeconds = 2 * MINUTE
    # A round trip crosses a queue and a second MTA: slower than a session is normal.
    degraded_after: PositiveSeconds = MINUTE
    # How often the log and the mailbox are looked at while the probe is on its way.
    poll: PositiveSeconds = 1.0

    @field_validator("sender", "recipient")
    @classmethod
    def _address(cls, value: str) -> str:
        local, at, domain = value.rpartition("@")
        if not at or not local or not domain or any(c in value for c in "<> \t\r\n"):
            raise ValueError(f"not a mail address: {value!r}")
        return value

    @field_validator("mailbox")
    @classmethod
    def _directory(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"no such directory: {value}")
        return value

    @model_validator(mode="after")
    def _followed(self) -> RoundTripCheck:
        if self.relay_log is None and self.mailbox is None:
            raise ValueError("give relay_log, mailbox or both: how the probe is followed")
        if self.login is not None and not self.starttls:
            raise ValueError("login needs starttls = true: no password goes in the clear")
        return self


Check = Annotated[
    SmtpCheck
    | SubmissionCheck
    | SmtpsCheck
    | TlsCheck
    | DnsCheck
    | AuthRecordsCheck
    | RelayCheck
    | RoundTripCheck,
    Field(discriminator="kind"),
]
KINDS = ("smtp", "submission", "smtps", "tls", "dns", "auth_records", "relay", "round_trip")


class ServerConfig(_Model):
    """Where the JSON API and /metrics listen."""

    listen: HostPort = "127.0.0.1:8026"


class StoreConfig(_Model):
    """The SQLite file of observations, state changes and last known answers."""

    path: Path = Path("./var/monitor.sqlite")
    retention: PositiveSeconds = 30 * DAY


class DnsConfig(_Model):
    """The resolvers the dns and auth_records checks ask; empty: the system's."""

    nameservers: list[Nameserver] = Field(default_factory=list)


class LogConfig(_Model):
    file: Path | None = None
    level: Literal["debug", "info", "warning", "error"] = "info"


_ZNODE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def _host_location() -> str:
    """The default check location: this host's short name (as a znode may be named)."""
    name = socket.gethostname().split(".")[0]
    return name if re.match(_ZNODE_NAME, name) else "monitor"


class ClusterLinkConfig(_Model):
    """[cluster]: the ZooKeeper of the cluster, named as the agent's [agent] section names it."""

    zookeeper: str = Field(min_length=1)  # "host:port,host:port[/chroot]", as agent.zookeeper
    cluster: str = Field(default="hamta", min_length=1, pattern=_ZNODE_NAME)
    credentials: Path | None = None  # "user:password", mode 0600, as agent.credentials
    # As agent.fleet_reader: READ for the fleet's reader on the znodes the monitor creates.
    fleet_reader: str = ""
    session_timeout: PositiveSeconds = 4.0
    # How long one attempt to reach ZooKeeper may take; the link then tries again.
    connect_timeout: PositiveSeconds = 10.0
    # How often the cluster's znodes and the other locations' verdicts are read.
    poll_every: PositiveSeconds = 2.0
    # This location's verdicts are published on each state change and at least this often.
    publish_every: PositiveSeconds = 10.0
    # A service check down no longer than this around a failover saw a failover, not an outage.
    failover_grace: Seconds = 10.0

    @field_validator("fleet_reader")
    @classmethod
    def _check_fleet_reader(cls, value: str) -> str:
        return check_digest_id(value)

    @field_validator("zookeeper")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        servers, _chroot = split_chroot(value)
        for host in servers.split(","):
            parse_hostport(host, 2181)
        return value

    @field_validator("credentials")
    @classmethod
    def _credentials(cls, value: Path | None) -> Path | None:
        # Read as the agent reads it (owner-only mode, "user:password"): a wrong file is an
        # error at start, not a link that never comes up.
        if value is not None:
            try:
                Credentials.from_file(value)
            except CoordinationError as exc:
                raise ValueError(str(exc)) from None
        return value


class MonitorConfig(_Model):
    """The whole of monitor.toml."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    # The relay's own TOML: the auth_records checks compare its DKIM keys with DNS.
    relay_config: Path | None = None
    checks: list[Check] = Field(default_factory=list)
    # Alerting (monitor.alerting_config); after the checks, which they are checked against.
    notifiers: dict[str, Notifier] = Field(default_factory=dict)
    escalation: list[EscalationStep] = Field(default_factory=list)
    maintenance: list[MaintenanceWindow] = Field(default_factory=list)
    alerting: AlertingConfig = Field(default_factory=AlertingConfig)
    # This monitor's check location (published in ZooKeeper under it); default: the host name.
    location: str = Field(default_factory=_host_location, pattern=_ZNODE_NAME, max_length=64)
    # The cluster (monitor.cluster_link); absent: the monitor works without it.
    cluster: ClusterLinkConfig | None = None

    @field_validator("checks")
    @classmethod
    def _unique(cls, value: list[Check]) -> list[Check]:
        seen: set[str] = set()
        for check in value:
            if check.name in seen:
                raise ValueError(f"check name {check.name!r} is given twice")
            seen.add(check.name)
        return value

    @field_validator("notifiers")
    @classmethod
    def _not_the_relay(cls, value: dict[str, Notifier], info: ValidationInfo) -> dict[str, Any]:
        # An alert that the relay is down cannot go out through that relay.
        targets = {
            c.host.lower(): c.name
            for c in info.data.get("checks", [])
            if c.kind in ("smtp", "submission", "smtps", "tls", "round_trip")
        }
        for name, notifier in value.items():
            if isinstance(notifier, EmailNotifier):
                host = parse_hostport(notifier.smarthost, 25)[0].lower()
                if host in targets:
                    raise ValueError(
                        f"{name}: smarthost {notifier.smarthost!r} is monitored by check"
                        f" {targets[host]!r}: alerts must not go through the relay they are about"
                    )
        return value

    @field_validator("escalation")
    @classmethod
    def _known_notifiers(
        cls, value: list[EscalationStep], info: ValidationInfo
    ) -> list[EscalationStep]:
        known = info.data.get("notifiers")
        if known is None:  # the notifiers were refused already, and said why
            return value
        for number, step in enumerate(value, 1):
            for name in step.notifiers:
                if name not in known:
                    names = ", ".join(known) or "none"
                    raise ValueError(
                        f"step {number}: unknown notifier {name!r} (configured: {names})"
                    )
        return value

    @field_validator("maintenance")
    @classmethod
    def _known_checks(
        cls, value: list[MaintenanceWindow], info: ValidationInfo
    ) -> list[MaintenanceWindow]:
        known = {c.name for c in info.data.get("checks", [])}
        for window in value:
            for name in window.checks:
                if name not in known:
                    raise ValueError(f"window {window.name!r}: unknown check {name!r}")
        return value

    def check(self, name: str) -> Check | None:
        return next((c for c in self.checks if c.name == name), None)


def _where(loc: tuple[int | str, ...], data: Any) -> str:
    """``check "mx": port`` for ('checks', 0, 'smtp', 'port'), else the dotted path."""
    if len(loc) >= 2 and loc[0] == "checks" and isinstance(loc[1], int):
        raw = data.get("checks", [])[loc[1]] if isinstance(data, dict) else None
        name = raw.get("name") if isinstance(raw, dict) else None
        label = f"check {name!r}" if isinstance(name, str) else f"check #{loc[1] + 1}"
        # loc[2] is the discriminator's value (the kind), not a key of the file.
        rest = loc[3:] if len(loc) > 2 and loc[2] in KINDS else loc[2:]
        # A problem of the check as a whole (its kind, timeout against interval) names the
        # keys in its reason.
        return ": ".join([label, *([".".join(str(p) for p in rest)] if rest else [])])
    if len(loc) >= 2 and loc[0] in ("notifiers", "escalation", "maintenance"):
        # ('notifiers', 'pd', 'pagerduty', 'url'): the kind is the discriminator, not a key;
        # a step or window is numbered from 1, like a check without a name.
        head = f"{loc[0]} {loc[1]!r}" if loc[0] == "notifiers" else f"{loc[0]} #{int(loc[1]) + 1}"
        rest = loc[3:] if len(loc) > 2 and loc[2] in NOTIFIER_KINDS else loc[2:]
        return ": ".join([head, *([".".join(str(p) for p in rest)] if rest else [])])
    return ".".join(str(part) for part in loc) or "(top level)"


def _format(error: ValidationError, data: Any, source: str) -> str:
    lines = []
    for item in error.errors():
        reason = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            reason = "unknown key"
        elif item["type"] in ("union_tag_invalid", "union_tag_not_found"):
            kinds = ", ".join(NOTIFIER_KINDS if item["loc"][:1] == ("notifiers",) else KINDS)
            kind = item["input"].get("kind") if isinstance(item["input"], dict) else None
            reason = f"unknown kind {kind!r} (one of {kinds})" if kind else f"no kind ({kinds})"
        lines.append(f"{source}: {_where(item['loc'], data)}: {reason}")
    return "\n".join(lines)


def parse_monitor_config(text: str, source: str = "<monitor.toml>") -> MonitorConfig:
    """Parse and validate TOML text; :class:`ConfigError` has one line per problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return MonitorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format(exc, data, source)) from None


def load_monitor_config(path: Path) -> MonitorConfig:
    """Load monitor.toml; :class:`ConfigError` says why it cannot be used."""
    config = parse_monitor_config(read_config_file(path), str(path))
    if config.relay_config is not None:
        try:
            relay_dkim_keys(config.relay_config)
        except ConfigError as exc:
            # The relay's file is broken, but this file is what the operator asked to use.
            reason = " ".join(str(exc).split("\n"))
            raise ConfigError(f"{path}: relay_config: {' '.join(reason.split())}") from None
    return config


def relay_dkim_keys(path: Path) -> list[SigningKey]:
    """The relay's DKIM keys, loaded as the relay loads them (their public halves are used)."""
    relay = load_config(path)  # ConfigError names the relay's file and key
    keys = []
    for key in relay.dkim.keys:
        try:
            keys.append(load_signing_key(key.key, key.domain, key.selector, key.algorithm))
        except DkimKeyError as exc:
            raise ConfigError(f"{path}: dkim key {key.selector} of {key.domain}: {exc}") from None
    return keys
