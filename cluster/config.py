"""The agent's configuration: a TOML file validated into immutable models.

Like the relay's, every key is checked before anything starts and an error names
``section.key: reason``. The relay keeps its own file (``agent.relay_config``): the agent reads
from it only the control socket and the SMTP port, to drive and probe the relay it starts.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cluster.decision_data import Policy, Step, Takeover
from cluster.zk_acl import split_chroot
from fencing import agents_from_config
from hamta.config import (
    ConfigError,
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

    @field_validator("zookeeper")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        servers, _chroot = split_chroot(value)  # "host:port,host:port[/chroot]"
        for host in servers.split(","):
            parse_hostport(host, 2181)
        return value


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


class ProbeSection(_Section):
    """The SMTP probe that proves the relay serves on the virtual IP after promotion."""

    host: str = ""  # default: the virtual IP's address, else the relay's first listen address
    port: int = Field(default=0, ge=0, lt=65536)  # 0: the relay's first listen port
    timeout: PositiveSeconds = 5.0


class AgentConfig(_Section):
    """The whole agent configuration."""

    agent: AgentSection
    storage: StorageSection = Field(default_factory=StorageSection)
    vip: VipSection = Field(default_factory=VipSection)
    fencing: FencingSection = Field(default_factory=FencingSection)
    probe: ProbeSection = Field(default_factory=ProbeSection)
    watchdog: WatchdogSection = Field(default_factory=WatchdogSection)

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
            takeover=self.fencing.takeover,
            lease_grace=self.fencing.lease_grace,
            # fencing.timeout is FENCE's time limit unless agent.step_timeouts names it.
            step_timeouts={Step.FENCE: self.fencing.timeout, **agent.step_timeouts},
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
