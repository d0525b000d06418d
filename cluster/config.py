"""The agent's configuration: a TOML file validated into immutable models.

Like the relay's, every key is checked before anything starts and an error names
``section.key: reason``. The relay keeps its own file (``agent.relay_config``): the agent reads
from it only the control socket and the SMTP port, to drive and probe the relay it starts.
"""

from __future__ import annotations

import tomllib
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster.decision_data import Policy, Step, Takeover
from cluster.zk_acl import check_digest_id, split_chroot
from fencing import agents_from_config
from hamta.config import (
    ConfigError,
    IPNetwork,
    PositiveSeconds,
    Seconds,
    format_errors,
    parse_hostport,
    read_config_file,
)

__all__ = ["AgentConfig", "ConfigError", "load_agent_config", "parse_agent_config"]

Positive = Annotated[int, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentSection(_Section):
    """Who this node is, where ZooKeeper is, and the failover policy."""

    node: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    cluster: str = Field(default="hamta", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    zookeeper: str = Field(min_length=1)  # "host:port,host:port,..."
    session_timeout: PositiveSeconds = 2.0
    # How long the agent and the operator's commands try to reach ZooKeeper before they fail
    # naming the hosts (the agent exits 1 and its service manager starts it again).
    connect_timeout: PositiveSeconds = 10.0
    credentials: Path | None = None  # "user:password", mode 0600
    # The fleet's reader (docs/fleet.md): its digest identity "user:hash" (`hamta fleet
    # reader-id`, no secret in it) gets READ on every znode of this pair, so that `hamta fleet
    # status` sees the pair while changing nothing. "": no fleet reader.
    fleet_reader: str = ""
    relay_config: Path
    relay_command: list[str] = Field(default_factory=list)  # default: this Python's hamta serve
    state_dir: Path = Path("./var/agent")
    log_file: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    heartbeat: PositiveSeconds = 1.0
    health_interval: PositiveSeconds = 0.5
    # How long one readiness check waits for the relay's answer (default: the interval). A
    # slow machine (a TCG guest under load) answers in more than 0.5 s while serving fine.
    health_timeout: PositiveSeconds | None = None
    relay_failure_limit: Positive = 3
    relay_restart_limit: Annotated[int, Field(ge=0)] = 2
    relay_restart_window: Seconds = 300.0
    relay_start_limit: Positive = 3
    min_failover_interval: Seconds = 5.0
    cooldown: Seconds = 30.0
    switchover_timeout: PositiveSeconds = 30.0
    drain_timeout: Seconds = 10.0
    urgent_drain_timeout: Seconds = 0.5
    # A suspended active node demotes this long plus urgent_drain_timeout before its session
    # may expire on the server (decision lag, killing a relay that overruns its drain).
    session_margin: Seconds = 0.25
    step_timeouts: dict[Step, PositiveSeconds] = Field(default_factory=dict)
    # Gray failure (cluster.gray_failure): the active node hands over when at least this many
    # check locations (and a majority of them) see its SMTP service on the virtual IP down
    # while it thinks itself healthy; a location's verdicts older than the max age are stale.
    gray_failure: bool = True
    gray_failure_locations: int = 2
    gray_verdict_max_age: PositiveSeconds = 30.0

    @field_validator("gray_failure_locations")
    @classmethod
    def _check_gray_locations(cls, value: int) -> int:
        if value < 2:
            raise ValueError(
                f"must be at least 2, not {value}: one check location alone never moves the "
                "service (it may be the one cut off)"
            )
        return value

    # The direct channel between the agents (cluster.peer_channel): where this agent listens
    # ("host:port"), each other node's name and address, the shared secret's file (0600).
    peer_address: str = ""
    peers: dict[str, str] = Field(default_factory=dict)
    peer_secret_file: Path | None = None
    heartbeat_interval: PositiveSeconds = 0.1
    # How far a message's timestamp may be from this node's clock: bounds how old a captured
    # message may be when replayed to a receiver that restarted (the chaos suite skews 45 s).
    peer_max_skew: PositiveSeconds = 60.0
    # Serve through a ZooKeeper outage while every peer grants a lease (docs/fencing.md).
    failsafe: bool = True
    failsafe_lease: PositiveSeconds = 3.0
    # Fenced immediate takeover (docs/fencing.md): a passive node that has not heard the
    # leader's heartbeats for peer_timeout fences it and, the fence confirmed, takes over
    # without waiting for its session to expire. Needs the peer channel and a fence agent or
    # command; several heartbeats must be missed (a CPU-starved peer must not be shot).
    fast_takeover: bool = True
    # 10 heartbeats. 0.5 s (5) was tried and refused: bench/soak.py under CPU hogs on the shared
    # 2-core machine saw the whole agent stall 0.6-1.07 s and get fenced by its peer, twice
    # (README, "Fast takeover and the soak"). Shorter only where a soak on the real machines
    # shows 0 false failovers at it.
    peer_timeout: PositiveSeconds = 1.0
    # The agent's nice value, set at start and inherited by its threads and the processes it
    # starts (relay, watchdog, fence agents, hooks): a CPU hog beside it must not starve its
    # heartbeats into a false failover (cluster.priority). -20 (first) to 19 (last); 0 leaves
    # the priority as it was given.
    nice: int = Field(default=-10, ge=-20, le=19)

    @field_validator("fleet_reader")
    @classmethod
    def _check_fleet_reader(cls, value: str) -> str:
        return check_digest_id(value)

    @field_validator("zookeeper")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        servers, _chroot = split_chroot(value)  # "host:port,host:port[/chroot]"
        for host in servers.split(","):
            parse_hostport(host, 2181)
        return value

    @field_validator("peer_address")
    @classmethod
    def _check_peer_address(cls, value: str) -> str:
        if value:
            _peer_hostport(value)
        return value

    @field_validator("peers")
    @classmethod
    def _check_peers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, address in value.items():
            _peer_hostport(address, f"peers.{name}")
        return value

    @model_validator(mode="after")
    def _check_peer_timeout(self) -> AgentSection:
        least = _MISSED_HEARTBEATS * self.heartbeat_interval
        if self.peer_timeout < least:
            raise ValueError(
                f"agent.peer_timeout ({self.peer_timeout:g}s) must be at least "
                f"{_MISSED_HEARTBEATS} heartbeat_interval ({least:g}s): one lost or late "
                "heartbeat must never get a live node fenced"
            )
        return self

    @model_validator(mode="after")
    def _check_channel(self) -> AgentSection:
        if not self.peers:
            return self
        if self.node in self.peers:
            raise ValueError(f"agent.peers names this node ({self.node}); list the others only")
        if not self.peer_address or self.peer_secret_file is None:
            raise ValueError("agent.peers needs agent.peer_address and agent.peer_secret_file")
        lease, beat = self.failsafe_lease, self.heartbeat_interval
        serving = self.urgent_drain_timeout + self.session_margin + 2 * beat
        if self.failsafe and lease <= serving:
            raise ValueError(
                f"agent.failsafe_lease ({lease:g}s) must be longer than urgent_drain_timeout + "
                f"session_margin + two heartbeat_interval ({serving:g}s): a lease held must "
                "outlast the drain that ends it"
            )
        return self

    def peer_addresses(self) -> dict[str, tuple[str, int]]:
        """Each peer's (host, port)."""
        return {name: _peer_hostport(address) for name, address in self.peers.items()}


# Heartbeats a peer must miss in a row before it counts as silent (agent.peer_timeout).
_MISSED_HEARTBEATS: Final = 5


def _peer_hostport(value: str, what: str = "peer_address") -> tuple[str, int]:
    host, port = parse_hostport(value, 0)
    if not port:
        raise ValueError(f"{what}: {value!r} needs a port (host:port)")
    return host, port


class StorageSection(_Section):
    """Where the shared spool lives and how it is taken."""

    driver: Literal["directory", "blockdev", "drbd"] = "directory"
    path: Path | None = None  # directory
    device: Path | None = None  # blockdev, drbd
    mountpoint: Path | None = None  # blockdev, drbd
    fstype: str = "ext4"
    resource: str | None = None  # drbd
    spool: str = "spool"  # the relay's spool, inside the mount (or the directory)
    # blockdev, drbd: the time limit of each command (mount, umount, sync, drbdadm) and of
    # fsck. `drbdadm primary` waits for DRBD's fence-peer handler when the peer is unreachable:
    # on a slow machine (a TCG guest) that handler's start alone can take 10 s.
    timeout: PositiveSeconds = 20.0
    fsck_timeout: PositiveSeconds = 35.0
    # drbd: where the promoting agent leaves the term-stamped marker DRBD's fast fence-peer
    # handler (cluster.fence_marker) answers from; "" turns the fast path off (the handler
    # then always asks ZooKeeper). Local to the node, never on the replicated disk.
    fence_marker_dir: Path | None = Path("/var/lib/hamta/drbd-fence")

    @field_validator("fence_marker_dir", mode="before")
    @classmethod
    def _off_when_empty(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("fence_marker_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"storage.fence_marker_dir must be an absolute path, not {value}")
        return value

    def fence_marker_valid(self) -> float:
        """How long a marker may be answered from: the storage step's three drbdadm calls."""
        return 3 * self.timeout

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``cluster.storage.storage_from_config``."""
        if self.driver == "directory":
            if self.path is None:
                raise ValueError("storage.path is required by the directory driver")
            return {"path": self.path}
        if self.device is None or self.mountpoint is None:
            raise ValueError(f"storage.device and storage.mountpoint are required by {self.driver}")
        options: dict[str, Any] = {
            "device": self.device,
            "mountpoint": self.mountpoint,
            "fstype": self.fstype,
            "timeout": self.timeout,
            "fsck_timeout": self.fsck_timeout,
        }
        if self.driver == "drbd":
            if not self.resource:
                raise ValueError("storage.resource is required by the drbd driver")
            options["resource"] = self.resource
        return options


class VipSection(_Section):
    """The virtual IP that follows the active node ("" address: none)."""

    address: str = ""  # "198.18.0.100/24"
    interface: str = "eth0"


class FencingSection(_Section):
    """How the former active node is fenced before a takeover.

    ``agents``: STONITH agents of the ``fencing`` package (command, ipmi, ssh, libvirt, lab),
    tried in order until one fences the node. ``commands``: plain commands (``{peer}`` and
    ``{epoch}`` in an argument are replaced), tried in order until one exits 0. With neither,
    the takeover relies on the former node having demoted itself before its session expired.

    ``takeover``: ``fence-or-lease`` (the default) goes on without a successful fence only once
    the former node's ZooKeeper session has ended and ``lease_grace`` has passed since;
    ``fence-only`` never does (for sites whose every node has a working STONITH device).
    """

    agents: list[dict[str, Any]] = Field(default_factory=list)
    commands: list[list[str]] = Field(default_factory=list)
    timeout: PositiveSeconds = 20.0
    takeover: Takeover = Takeover.FENCE_OR_LEASE
    lease_grace: Seconds = 2.0

    @field_validator("agents")
    @classmethod
    def _check_agents(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        agents_from_config(value)  # FencingConfigError (a ValueError) names the entry
        return value

    @model_validator(mode="after")
    def _check_takeover(self) -> FencingSection:
        if self.takeover is Takeover.FENCE_ONLY and not (self.agents or self.commands):
            # It would never take over: better said now than at the first failover.
            raise ValueError("takeover = 'fence-only' needs fencing.agents or fencing.commands")
        return self


class WatchdogSection(_Section):
    """The self-fencing watchdog (``fencing.watchdog``) that guards the agent itself.

    While the node holds anything, the agent feeds it every quarter of ``timeout``; when the
    agent hangs, freezes or dies, it kills the relay, drops the virtual IP and kills the agent.
    ``timeout`` (default: half the session timeout) must be shorter than the session timeout,
    so that it fires before the peer may take over. ``device``: a kernel watchdog to arm too.
    """

    enabled: bool = True
    timeout: PositiveSeconds | None = None
    device: Path | None = None
    # How long its process may take to start and answer: Python's start-up, 0.1 s here, took
    # over 10 s on an emulated (TCG) guest sharing two cores with four others.
    start_timeout: PositiveSeconds = 30.0


class ProbeSection(_Section):
    """The SMTP probe that proves the relay serves on the virtual IP after promotion."""

    host: str = ""  # default: the virtual IP's address, else the relay's first listen address
    port: int = Field(default=0, ge=0, lt=65536)  # 0: the relay's first listen port
    timeout: PositiveSeconds = 5.0


def _loopback() -> list[IPv4Network | IPv6Network]:
    return [IPv4Network("127.0.0.0/8"), IPv6Network("::1/128")]


class ApiSection(_Section):
    """The agent's HTTP API (``cluster.api``): health for load balancers, status, steering.

    ``listen``: "address:port" on a management network ("": no API). Reads (``/active``,
    ``/cluster``, ...) are open to ``read_networks``; everything else, and every change, needs
    the bearer token in ``token_file`` (mode 0600, checked at start) or, with ``tls_cert``,
    ``tls_key`` and ``client_ca``, a client certificate that CA signed.
    """

    listen: str = ""
    read_networks: list[IPNetwork] = Field(default_factory=_loopback)
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None  # mTLS: a client certificate signed by it may change things

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value:
            host, _port = parse_hostport(value)  # "no port in ..." names the problem
            if host in ("", "0.0.0.0", "::"):
                raise ValueError(
                    f"{value!r}: bind a management address, not every address "
                    "(the API steers the cluster)"
                )
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> ApiSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("api.tls_cert and api.tls_key go together")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("api.client_ca needs api.tls_cert and api.tls_key (mTLS is TLS)")
        return self

    @property
    def url(self) -> str:
        """Where the API answers, as published in the member record ("" when off)."""
        if not self.listen:
            return ""
        host, port = parse_hostport(self.listen, 0)
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls_cert else 'http'}://{host}:{port}"


class HooksSection(_Section):
    """Commands run at role changes (``cluster.hooks``), each an argv list, killed with its
    process group at ``timeout``. ``pre_promote`` runs as a promotion step before the spool is
    taken: a non-zero exit or a timeout abandons the promotion. ``on_role_change`` (every change
    of role) and ``post_demote`` (after a demotion) run in the background: they never delay a
    failover. Each gets HAMTA_NODE, HAMTA_OLD_ROLE, HAMTA_NEW_ROLE, HAMTA_EPOCH, HAMTA_VIP and
    HAMTA_REASON in its environment."""

    pre_promote: list[str] = Field(default_factory=list)
    on_role_change: list[str] = Field(default_factory=list)
    post_demote: list[str] = Field(default_factory=list)
    timeout: PositiveSeconds = 30.0

    @field_validator("pre_promote", "on_role_change", "post_demote")
    @classmethod
    def _check_command(cls, value: list[str]) -> list[str]:
        if value and not value[0]:
            raise ValueError("the command's first word (the program) is empty")
        return value


class AgentConfig(_Section):
    """The whole agent configuration."""

    agent: AgentSection
    storage: StorageSection = Field(default_factory=StorageSection)
    vip: VipSection = Field(default_factory=VipSection)
    fencing: FencingSection = Field(default_factory=FencingSection)
    probe: ProbeSection = Field(default_factory=ProbeSection)
    watchdog: WatchdogSection = Field(default_factory=WatchdogSection)
    api: ApiSection = Field(default_factory=ApiSection)
    hooks: HooksSection = Field(default_factory=HooksSection)

    @model_validator(mode="after")
    def _check_watchdog(self) -> AgentConfig:
        timeout = self.watchdog.timeout
        if timeout is not None and timeout >= self.agent.session_timeout:
            raise ValueError(
                f"watchdog.timeout ({timeout:g}s) must be shorter than agent.session_timeout "
                f"({self.agent.session_timeout:g}s): it must fire before the peer may take over"
            )
        return self

    @property
    def watchdog_timeout(self) -> float:
        """The watchdog's timeout, the default filled in."""
        return self.watchdog.timeout or self.agent.session_timeout / 2

    def policy(self) -> Policy:
        """The decision core's tunables."""
        agent = self.agent
        return Policy(
            node=agent.node,
            relay_failure_limit=agent.relay_failure_limit,
            relay_restart_limit=agent.relay_restart_limit,
            relay_restart_window=agent.relay_restart_window,
            relay_start_limit=agent.relay_start_limit,
            min_failover_interval=agent.min_failover_interval,
            cooldown=agent.cooldown,
            switchover_timeout=agent.switchover_timeout,
            drain_timeout=agent.drain_timeout,
            urgent_drain_timeout=agent.urgent_drain_timeout,
            session_margin=agent.session_margin,
            # Without a fence agent or command the fast path could never be confirmed.
            fast_takeover=agent.fast_takeover
            and bool(agent.peers)
            and bool(self.fencing.agents or self.fencing.commands),
            peer_timeout=agent.peer_timeout,
            takeover=self.fencing.takeover,
            lease_grace=self.fencing.lease_grace,
            failsafe=agent.failsafe,
            failsafe_peers=frozenset(agent.peers),
            failsafe_lease=agent.failsafe_lease,
            zookeeper_patience=agent.session_timeout / 4,
            # fencing.timeout is FENCE's time limit unless agent.step_timeouts names it.
            # hooks.timeout kills the pre_promote hook; the step's limit leaves time to say so.
            step_timeouts={
                Step.FENCE: self.fencing.timeout,
                Step.PRE_PROMOTE: self.hooks.timeout + 1.0,
                **agent.step_timeouts,
            },
            pre_promote=bool(self.hooks.pre_promote),
            gray_failure=agent.gray_failure,
            gray_failure_locations=agent.gray_failure_locations,
            gray_verdict_max_age=agent.gray_verdict_max_age,
        )


def parse_agent_config(text: str, source: str = "<agent config>") -> AgentConfig:
    """Parse and validate TOML text; raise ConfigError naming every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        config = AgentConfig.model_validate(data)
        config.storage.options()
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None
    except ValueError as exc:
        raise ConfigError(f"{source}: invalid configuration\n  {exc}") from None
    return config


def load_agent_config(path: Path) -> AgentConfig:
    """Load and validate the agent's TOML file."""
    return parse_agent_config(read_config_file(path), str(path))
