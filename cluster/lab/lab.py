"""A real hamta cluster on one Linux host, built from network namespaces.

``Lab.up`` builds, for one prefix P and one subnet (default ``hamta`` and 198.18.0.0/24):

- a switch namespace ``P-sw`` holding the bridge ``br0``, and one namespace per host: three
  ZooKeeper servers (``zk1..3``), the two nodes of the pair, a mail client and the "internet"
  (``inet``: DNS for the lab's mail domains and a sink that records every delivery); each host
  sits on the bridge through a veth pair, its end called ``eth0``;
- a shared disk: an ext4 filesystem on a loop device that both nodes can see and only the
  active node mounts (the agent's ``blockdev`` storage driver does that);
- each node's ``relay.toml`` and ``agent.toml``, and both agents (``hamta agent``), each started
  under ``ip netns exec``, which also gives it a private mount namespace as on a machine of its
  own; the agent starts its relay, and the pair elects its active node through ZooKeeper.

Everything the lab starts is recorded in ``lab.json`` (pid and start time of each process, the
loop device, the addresses), so that ``down`` from any other process ends it all by pid, and
cleans up after a crash too. Nothing outside the lab's own namespaces is ever signalled or
changed; the host's root namespace gets no interface, address or mount.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import cluster
from cluster.lab import client, configs, dns, loopdev, netns, probes, processes, record
from cluster.lab.fence import FenceError, fence_node
from cluster.lab.processes import ProcessRecord
from cluster.lab.record import LabRecord
from cluster.lab.results import SendResult
from cluster.lab.topology import (
    BRIDGE,
    CLIENT,
    DNS_PORT,
    HOSTS,
    INTERFACE,
    INTERNET,
    MAIL_DOMAINS,
    NODES,
    SMTP_PORT,
    ZOOKEEPER_HOSTS,
    ZOOKEEPER_PORT,
    Topology,
    TopologyError,
)
from cluster.zookeeper import ServerSpec, ZooKeeperEnsemble, ZooKeeperError

__all__ = ["Lab", "LabError"]

TICK_MS: Final = 500  # ZooKeeper's tick: 2 s sessions are within its 2..20 ticks
CREDENTIALS_USER: Final = "hamta"
AGENT_GRACE: Final = 15.0  # an agent stopping demotes first: drain, VIP down, unmount
SERVICE_GRACE: Final = 5.0
STRAY_GRACE: Final = 2.0
_AGENT_PREFIX: Final = "agent-"
# The files and directories one run of the lab writes into its directory; ``up`` removes those
# of the previous run (and nothing else), ``down`` keeps them for their logs.
_RUN_FILES: Final = ("zookeeper", "inet", *NODES, "spool.img", "zk-credentials")


class LabError(Exception):
    """The lab cannot be built, found or taken down; the message says why and where to look."""


def _project_root() -> Path:
    # The directory holding the ``cluster`` and ``hamta`` packages, for the lab's own processes
    # (python -m ...), whatever the current directory of whoever started the lab.
    return Path(cluster.__file__).resolve().parent.parent


def _tail(path: Path | str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Lab:
    """One lab: its directory, names and addresses, and what it runs.

    ``Lab(directory)`` describes a lab to build with :meth:`up`; :meth:`load` finds one that is
    up (from any process). Every method works from ``lab.json`` as it is on disk and from the
    kernel's state, not from this object's memory, so several ``Lab`` objects in several
    processes can look at and act on the same lab.
    """

    def __init__(
        self,
        directory: Path,
        *,
        prefix: str = "hamta",
        subnet: str = "198.18.0.0/24",
        python: str = sys.executable,
    ) -> None:
        try:
            self.topology = Topology.build(prefix, subnet)
        except TopologyError as exc:
            raise LabError(str(exc)) from None
        self.directory = Path(directory).absolute()
        self.python = python
        self._ensemble: ZooKeeperEnsemble | None = None
        # Processes this object started, so that it reaps them (they are our children).
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ identity

    @classmethod
    def load(cls, directory: Path) -> Lab:
        """The lab that is up in ``directory``; LabError if there is none."""
        directory = Path(directory).absolute()
        try:
            found = record.load(directory)
        except ValueError as exc:
            raise LabError(str(exc)) from None
        if found is None:
            raise LabError(f"no lab is up in {directory} (no {record.RECORD_NAME})")
        return cls(directory, prefix=found.prefix, subnet=found.subnet, python=found.python)

    @property
    def prefix(self) -> str:
        """The prefix of every namespace name."""
        return self.topology.prefix

    @property
    def vip(self) -> str:
        """The virtual IP's address (without prefix length)."""
        return str(self.topology.vip.ip)

    @property
    def zookeeper_hosts(self) -> str:
        """The ensemble's connection string."""
        return self.topology.zookeeper_hosts

    @property
    def credentials_path(self) -> Path:
        """The ZooKeeper digest credentials the agents and operators use (``user:password``)."""
        return self.directory / "zk-credentials"

    @property
    def image_path(self) -> Path:
        """The sparse file behind the shared disk."""
        return self.directory / "spool.img"

    @property
    def record_file(self) -> Path:
        """Where ``lab.json`` is."""
        return record.record_path(self.directory)

    @property
    def sink_record(self) -> Path:
        """The sink's JSON lines, one per delivered recipient."""
        return self.directory / INTERNET / "delivered.jsonl"

    @property
    def loop_device(self) -> str:
        """The shared disk's loop device ("" when none is attached)."""
        found = self._read_record()
        return found.loop_device if found is not None else ""

    def node_dir(self, node: str) -> Path:
        """The directory of ``node``: its configuration files, logs and mount point."""
        self._check_node(node)
        return self.directory / node

    def namespace(self, host: str) -> str:
        """The network namespace of ``host``."""
        try:
            return self.topology.namespace(host)
        except TopologyError as exc:
            raise LabError(str(exc)) from None

    def address(self, host: str) -> str:
        """The address of ``host``."""
        try:
            return str(self.topology.address(host))
        except TopologyError as exc:
            raise LabError(str(exc)) from None

    def _check_node(self, node: str) -> None:
        if node not in NODES:
            raise LabError(f"no node {node!r} in the lab (nodes: {', '.join(NODES)})")

    def _read_record(self) -> LabRecord | None:
        # Read afresh each time: another process may have started an agent since.
        try:
            return record.load(self.directory)
        except ValueError:
            return None  # unreadable: treated as no lab; down still cleans up by names

    def _current_record(self) -> LabRecord:
        found = self._read_record()
        if found is None:
            raise LabError(f"no lab is up in {self.directory} (no {record.RECORD_NAME})")
        return found

    def _remember(self, started: processes.Started) -> ProcessRecord:
        self._children[started.record.pid] = started.popen
        self._save(self._current_record().with_process(started.record))
        return started.record

    def _save(self, new: LabRecord) -> None:
        record.save(new, self.directory)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        root = str(_project_root())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # ------------------------------------------------------------------ up

    def up(self, *, wait: float = 60.0, agents: bool = True) -> None:
        """Build the lab and start its services; with ``agents``, also both agents.

        Returns once ZooKeeper serves with a leader, the DNS and the sink answer from the client
        namespace and (with ``agents``) one node holds the virtual IP and answers SMTP on it, all
        within ``wait`` seconds. On any failure everything built is taken down again (the logs
        stay) and LabError says what failed.
        """
        deadline = time.monotonic() + wait
        self._check_free()
        self._prepare_directory()
        topology = self.topology
        self._save(
            LabRecord(
                directory=str(self.directory),
                prefix=topology.prefix,
                subnet=str(topology.subnet),
                python=self.python,
                image=str(self.image_path),
                credentials=str(self.credentials_path),
                zookeeper=topology.zookeeper_hosts,
                vip=str(topology.vip),
                addresses={host: str(topology.interface(host)) for host in HOSTS},
            )
        )
        try:
            self._build_network()
            self._build_disk()
            self._write_credentials()
            self._start_zookeeper()
            self._start_internet()
            for node in NODES:
                self._write_node_configs(node)
            self._wait_services(deadline)
            if agents:
                for node in NODES:
                    self.start_agent(node)
                self.wait_active(max(0.0, deadline - time.monotonic()))
        except BaseException as exc:
            try:
                self.down()
            except LabError as cleanup:
                exc.add_note(f"cleaning up after the failure also failed: {cleanup}")
            if isinstance(exc, LabError) or not isinstance(exc, Exception):
                raise
            raise LabError(f"lab up failed: {exc}") from exc

    def _check_free(self) -> None:
        try:
            existing = record.load(self.directory)
        except ValueError:
            existing = None
        if existing is not None:
            raise LabError(
                f"a lab is already up in {self.directory} (prefix {existing.prefix}); "
                f"take it down first: hamta lab down --dir {self.directory}"
            )
        taken = [name for name in self.topology.namespaces if netns.exists(name)]
        if taken:
            raise LabError(
                f"network namespaces {', '.join(taken)} exist already (a lab with prefix "
                f"{self.prefix} elsewhere?); take it down, or use another --prefix and --subnet"
            )

    def _prepare_directory(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for name in _RUN_FILES:
            path = self.directory / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    def _build_network(self) -> None:
        topology = self.topology
        try:
            for name in topology.namespaces:
                netns.create(name)
            netns.add_bridge(topology.switch, BRIDGE)
            for host in HOSTS:
                netns.plug(
                    topology.switch,
                    BRIDGE,
                    host,
                    topology.namespace(host),
                    INTERFACE,
                    topology.interface(host),
                )
        except netns.NetnsError as exc:
            raise LabError(f"cannot build the lab's network: {exc}") from None

    def _build_disk(self) -> None:
        try:
            loopdev.create_image(self.image_path)
            device = loopdev.attach(self.image_path)
            self._save(replace(self._current_record(), loop_device=device))
            loopdev.make_ext4(device, ("spool",))
        except (loopdev.LoopError, OSError) as exc:
            raise LabError(f"cannot build the shared disk: {exc}") from None

    def _write_credentials(self) -> None:
        password = secrets.token_urlsafe(18)
        path = self.credentials_path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(f"{CREDENTIALS_USER}:{password}\n")
        os.chmod(path, 0o600)  # whatever the umask, or a file that was there before

    def _start_zookeeper(self) -> None:
        topology = self.topology
        specs = [
            ServerSpec(index + 1, str(topology.address(host)), ZOOKEEPER_PORT)
            for index, host in enumerate(ZOOKEEPER_HOSTS)
        ]
        namespaces = {
            index + 1: topology.namespace(host) for index, host in enumerate(ZOOKEEPER_HOSTS)
        }
        ensemble = ZooKeeperEnsemble(
            specs, self.directory / "zookeeper", tick_ms=TICK_MS, netns=namespaces
        )
        self._ensemble = ensemble
        # Each server is started on its own (not ensemble.start(), which waits): the JVMs warm
        # up while the rest of the lab is built.
        for host, server in zip(ZOOKEEPER_HOSTS, ensemble.servers, strict=True):
            try:
                server.start()
            except ZooKeeperError as exc:
                raise LabError(str(exc)) from None
            pid = server.pid
            started = processes.start_time(pid) if pid is not None else None
            if pid is None or started is None:
                raise LabError(f"ZooKeeper on {host} exited at once:\n{server.log_tail()}")
            self._save(
                self._current_record().with_process(
                    ProcessRecord(
                        host, host, pid, started, tuple(server.command()), str(server.log_path)
                    )
                )
            )

    def _start_internet(self) -> None:
        topology = self.topology
        host = INTERNET
        namespace = topology.namespace(host)
        address = str(topology.address(host))
        directory = self.directory / host
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "dnsmasq.conf"
        config.write_text(dns.dnsmasq_config(topology))
        dns_log = directory / "dnsmasq.log"
        argv = dns.dnsmasq_argv(config, address, DNS_PORT, dns_log)
        try:
            self._remember(
                processes.spawn(
                    "dns", host, namespace, argv, directory / "dnsmasq.out", cwd=directory
                )
            )
            sink = [
                self.python,
                "-m",
                "cluster.lab.sink",
                "--listen",
                f"{address}:{SMTP_PORT}",
                "--record",
                str(self.sink_record),
            ]
            self.sink_record.touch()
            self._remember(
                processes.spawn(
                    "sink",
                    host,
                    namespace,
                    sink,
                    directory / "sink.log",
                    env=self._env(),
                    cwd=directory,
                )
            )
        except OSError as exc:
            raise LabError(f"cannot start the internet host's services: {exc}") from None

    def fence_command(self) -> list[str]:
        """The command the agents run to fence their peer (``{peer}`` is filled in).

        It powers the peer off: every process of it killed, the VIP removed; ``start_agent``
        powers it on again. ``cluster.lab.fence`` imports only the standard library: the fence
        is on the failover's critical path.
        """
        return [
            self.python,
            "-m",
            "cluster.lab.fence",
            "--namespace",
            f"{self.prefix}-{{peer}}",
            "--vip",
            str(self.topology.vip),
            "--interface",
            INTERFACE,
            *(["--device", self.loop_device] if self.loop_device else []),
        ]

    def _agent_argv(self, node_dir: Path) -> list[str]:
        return [self.python, "-m", "hamtactl", "agent", "--config", str(node_dir / "agent.toml")]

    def _write_node_configs(self, node: str) -> None:
        node_dir = self.directory / node
        (node_dir / "mnt").mkdir(parents=True, exist_ok=True)
        relay = configs.relay_config(self.topology, node, node_dir, node_dir / "mnt" / "spool")
        (node_dir / "relay.toml").write_text(configs.render_toml(relay))
        self.configure_agent(node, {})

    def configure_agent(self, node: str, overrides: configs.Sections) -> Path:
        """Write ``node``'s agent configuration: the lab's, with ``overrides`` section by section.

        A section's keys replace the lab's (``{"fencing": {}}`` keeps the section as it is, a
        ``None`` value drops the key, e.g. ``{"fencing": {"commands": None}}`` for no STONITH).
        It takes effect when the agent starts next.
        """
        self._check_node(node)
        node_dir = self.directory / node
        agent = configs.agent_config(
            self.topology,
            node,
            node_dir,
            credentials=self.credentials_path,
            device=self._current_record().loop_device,
            fence_command=self.fence_command(),
        )
        merged = {section: dict(keys) for section, keys in agent.items()}
        for section, keys in overrides.items():
            target = merged.setdefault(section, {})
            for key, value in keys.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        path = node_dir / "agent.toml"
        path.write_text(configs.render_toml(merged))
        return path

    def _wait_services(self, deadline: float) -> None:
        client = self.topology.namespace(CLIENT)
        inet = str(self.topology.address(INTERNET))
        ensemble = self._ensemble
        assert ensemble is not None
        try:
            for server in ensemble.servers:
                server.wait_serving(max(0.0, deadline - time.monotonic()))
        except ZooKeeperError as exc:
            raise LabError(f"ZooKeeper did not come up: {exc}") from None
        leader = probes.wait_for(ensemble.leader, max(0.0, deadline - time.monotonic()))
        if leader is None:
            raise LabError("the ZooKeeper ensemble serves but elected no leader")

        def answers(what: str, check: Callable[[], Any], name: str) -> None:
            def alive_and(check: Callable[[], Any] = check) -> Any:
                self._require_alive(name)
                return check()

            if not probes.wait_for(alive_and, max(0.0, deadline - time.monotonic())):
                process = self._process(name)
                log = process.log if process else ""
                raise LabError(f"{what} does not answer from the client; log:\n{_tail(log)}")

        answers(
            f"the DNS server on {inet}:{DNS_PORT}",
            lambda: probes.dns_answer(client, inet, DNS_PORT, MAIL_DOMAINS[0], "MX"),
            "dns",
        )
        answers(
            f"the sink on {inet}:{SMTP_PORT}",
            lambda: probes.smtp_greeting(client, inet, SMTP_PORT),
            "sink",
        )

    def _process(self, name: str) -> ProcessRecord | None:
        for process in self._current_record().processes:
            if process.name == name:
                return process
        return None

    def _require_alive(self, name: str) -> None:
        process = self._process(name)
        if process is not None and not process.alive():
            raise LabError(f"{name} exited; log {process.log}:\n{_tail(process.log)}")

    # ------------------------------------------------------------------ agents

    @property
    def ensemble(self) -> ZooKeeperEnsemble:
        """The lab's ZooKeeper servers, in the process that brought the lab up."""
        if self._ensemble is None:
            raise LabError("the ZooKeeper servers belong to the process that ran 'lab up'")
        return self._ensemble

    def start_agent(self, node: str, env: Mapping[str, str] | None = None) -> None:
        """Start ``node``'s agent (which starts its relay); LabError if the node still runs.

        ``env`` adds to the agent's environment (e.g. libfaketime's, for a skewed clock).
        """
        self._check_node(node)
        self._current_record()
        running = self.node_pids(node)
        deadline = time.monotonic() + 2.0
        while running and time.monotonic() < deadline:
            # A look into the namespace from outside (pyroute2's NetNS helper, as the split-brain
            # sampler uses) is a process there for a few milliseconds: not a node still running.
            time.sleep(0.05)
            running = self.node_pids(node)
        if running:
            raise LabError(f"{node} still runs processes {running}; kill it first")
        node_dir = self.node_dir(node)
        argv = self._agent_argv(node_dir)
        try:
            self._remember(
                processes.spawn(
                    f"{_AGENT_PREFIX}{node}",
                    node,
                    self.namespace(node),
                    argv,
                    node_dir / "agent.out",
                    env={**self._env(), **(env or {})},
                    cwd=node_dir,
                )
            )
        except OSError as exc:
            raise LabError(f"cannot start the agent of {node}: {exc}") from None

    def active_node(self, timeout: float = 2.0) -> str | None:
        """The node that holds the virtual IP alone and answers SMTP on it from the client."""
        holders = self.vip_holders()
        if len(holders) != 1:
            return None
        greeting = probes.smtp_greeting(self.namespace(CLIENT), self.vip, SMTP_PORT, timeout)
        return holders[0] if greeting else None

    def wait_active(self, timeout: float = 30.0, *, other_than: str | None = None) -> str:
        """Wait until one node is active (and, with ``other_than``, not that one); return it."""

        def check() -> str | None:
            records = self._current_record().processes
            agents = [p for p in records if p.name.startswith(_AGENT_PREFIX)]
            if agents and not any(p.alive() for p in agents):
                logs = "\n".join(f"{p.log}:\n{_tail(p.log)}" for p in agents)
                raise LabError(f"every agent has exited:\n{logs}")
            node = self.active_node()
            return node if node is not None and node != other_than else None

        node = probes.wait_for(check, timeout, interval=0.2)
        if node is None:
            logs = "\n".join(
                f"{name}: {self.node_dir(name) / 'agent.log'}:\n"
                f"{_tail(self.node_dir(name) / 'agent.log', 8)}"
                for name in NODES
            )
            raise LabError(
                f"no node became active within {timeout:g}s (VIP on {self.vip_holders() or 'no'} "
                f"node); agent logs:\n{logs}"
            )
        return node

    # ------------------------------------------------------------------ down

    def down(self) -> None:
        """Take the lab down; idempotent, and also after a crash of whatever ran it.

        Ends the recorded processes (agents first, so that the active one can demote while
        ZooKeeper still serves), then any process still inside one of the lab's namespaces,
        detaches the loop device, deletes the namespaces and the record. Logs stay.
        """
        found = self._read_record()
        topology = self.topology
        if found is not None:
            with contextlib.suppress(TopologyError):
                topology = Topology.build(found.prefix, found.subnet)
        problems: list[str] = []
        recorded = processes.live(found.processes) if found is not None else []
        agents = [p.pid for p in recorded if p.name.startswith(_AGENT_PREFIX)]
        processes.end(agents, AGENT_GRACE)
        others = [p.pid for p in recorded if not p.name.startswith(_AGENT_PREFIX)]
        processes.end(others, SERVICE_GRACE)
        stray = [pid for pids in netns.pids_in(topology.namespaces).values() for pid in pids]
        processes.end(stray, STRAY_GRACE)
        left = {name: pids for name, pids in netns.pids_in(topology.namespaces).items() if pids}
        for name, pids in left.items():
            problems.append(f"processes {pids} in {name} would not exit")
        if self._ensemble is not None:
            with contextlib.suppress(ZooKeeperError):  # its servers are gone: this only reaps
                self._ensemble.stop()
            self._ensemble = None
        self._reap_children()

        image = Path(found.image) if found is not None else self.image_path
        devices = [found.loop_device] if found is not None and found.loop_device else []
        try:
            loopdev.detach([*devices, *loopdev.attached_to(image)], image)
        except loopdev.LoopError as exc:
            problems.append(str(exc))
        for name in topology.namespaces:
            if name in left:  # kept, so that its processes can still be found by it
                continue
            try:
                netns.remove(name)
            except netns.NetnsError as exc:
                problems.append(str(exc))
        if not problems:
            image.unlink(missing_ok=True)
            record.remove(self.directory)
        if problems:
            raise LabError("lab down left something behind: " + "; ".join(problems))

    def _reap_children(self) -> None:
        for popen in self._children.values():
            popen.poll()
        self._children = {pid: p for pid, p in self._children.items() if p.returncode is None}

    # ------------------------------------------------------------------ looking

    def exec(
        self, host: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``host``'s namespace and wait (output captured as text by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        check = bool(kwargs.pop("check", False))
        done: subprocess.CompletedProcess[str] = subprocess.run(
            netns.exec_argv(self.namespace(host), argv), check=check, **kwargs
        )
        return done

    def run_module(
        self, host: str, module: str, args: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """``python -m module args`` of this checkout in ``host``'s namespace, and wait."""
        argv = [self.python, "-m", module, *args]
        return self.exec(host, argv, timeout=timeout, env=self._env())

    def relay_ready(self, node: str) -> bool | None:
        """What ``node``'s relay says of its readiness; None when it does not answer."""
        answer = probes.http_json(self.namespace(node), "127.0.0.1", 8025, "/health/ready")
        ready = answer.get("ready") if answer else None
        return bool(ready) if ready is not None else None

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``host``'s namespace; the caller waits for it."""
        started: subprocess.Popen[bytes] = subprocess.Popen(
            netns.exec_argv(self.namespace(host), argv), **kwargs
        )
        return started

    def node_pids(self, node: str) -> list[int]:
        """Every process in ``node``'s namespace (any host of the lab may be named)."""
        namespace = self.namespace(node)
        return netns.pids_in([namespace]).get(namespace, [])

    def vip_holders(self) -> list[str]:
        """The nodes whose ``eth0`` carries the virtual IP now (more than one is split brain)."""
        vip = self.topology.vip.ip
        return [
            node
            for node in NODES
            if any(a.ip == vip for a in netns.addresses(self.namespace(node), INTERFACE))
        ]

    def spool_mounted_on(self) -> list[str]:
        """The nodes on which some process sees the shared disk mounted."""
        device = loopdev.device_number(self.loop_device) if self.loop_device else None
        if device is None:
            return []
        return [
            node
            for node in NODES
            if any(loopdev.mounted_in(pid, device) for pid in self.node_pids(node))
        ]

    def deliveries(self) -> list[dict[str, Any]]:
        """Every line the sink has recorded (one per delivered recipient), in order."""
        try:
            text = self.sink_record.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        lines = []
        for line in text.splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:  # a line being written right now
                continue
        return lines

    def delivered_ids(self) -> set[str]:
        """The ``X-Lab-Id`` values the sink has recorded."""
        return {str(d["x_lab_id"]) for d in self.deliveries() if d.get("x_lab_id")}

    def relay_state(self, node: str) -> str | None:
        """What ``node``'s relay says it is (standby, active, ...); None when it does not answer."""
        answer = probes.http_json(self.namespace(node), "127.0.0.1", 8025, "/health/live")
        state = answer.get("state") if answer else None
        return str(state) if state is not None else None

    def cluster_status(self, timeout: float = 15.0) -> dict[str, Any] | None:
        """``hamta cluster status --json`` run from the client namespace; None if it fails."""
        config = self.directory / NODES[0] / "agent.toml"
        if not config.exists():
            return None
        argv = [
            self.python,
            "-m",
            "hamtactl",
            "cluster",
            "status",
            "--json",
            "--config",
            str(config),
        ]
        try:
            done = self.exec(CLIENT, argv, timeout=timeout, env=self._env())
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0:
            return None
        try:
            parsed = json.loads(done.stdout)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None

    def status(self, *, cluster: bool = True) -> dict[str, Any]:
        """The lab as data: hosts with their processes, ZooKeeper, VIP, spool and roles."""
        found = self._read_record()
        topology = self.topology
        pids = netns.pids_in(topology.namespaces)
        hosts: dict[str, Any] = {}
        for host in HOSTS:
            namespace = topology.namespace(host)
            hosts[host] = {
                "namespace": namespace,
                "address": str(topology.address(host)),
                "exists": netns.exists(namespace),
                "processes": [
                    {
                        "pid": pid,
                        "what": describe(processes.cmdline(pid)),
                        "cmdline": processes.cmdline(pid),
                    }
                    for pid in pids.get(namespace, [])
                ],
            }
        zookeeper = {
            host: probes.zookeeper_mode(
                topology.namespace(host), str(topology.address(host)), ZOOKEEPER_PORT
            )
            if hosts[host]["exists"]
            else None
            for host in ZOOKEEPER_HOSTS
        }
        up = found is not None
        return {
            "directory": str(self.directory),
            "up": up,
            "prefix": topology.prefix,
            "subnet": str(topology.subnet),
            "vip": str(topology.vip),
            "zookeeper_hosts": topology.zookeeper_hosts,
            "credentials": str(self.credentials_path),
            "loop_device": found.loop_device if found else None,
            "hosts": hosts,
            "zookeeper": zookeeper,
            "vip_holders": self.vip_holders(),
            "spool_mounted_on": self.spool_mounted_on() if up else [],
            "relays": {node: self.relay_state(node) for node in NODES},
            "cluster": self.cluster_status() if up and cluster else None,
        }

    # ------------------------------------------------------------------ acting

    def send(
        self,
        count: int,
        *,
        size: int = 1024,
        domain: str = "a.lab.test",
        timeout: float = 30.0,
        connections: int = 1,
    ) -> SendResult:
        """Send ``count`` messages from the client namespace to the virtual IP, port 25."""
        argv = client.command(
            self.python,
            f"{self.vip}:{SMTP_PORT}",
            count,
            size=size,
            domain=domain,
            timeout=timeout,
            connections=connections,
        )
        try:
            # Each SMTP command has its own limit (10 s) after the last message is started.
            done = self.exec(CLIENT, argv, timeout=timeout + 30.0, env=self._env())
        except subprocess.TimeoutExpired:
            raise LabError(f"the lab's client did not finish within {timeout + 30:g}s") from None
        try:
            return client.outcome(done)
        except ValueError as exc:
            raise LabError(f"the lab's client failed: {exc}") from None

    def kill_node(self, node: str, sig: int = signal.SIGKILL) -> None:
        """Signal every process of ``node`` (agent and relay); with SIGKILL, wait until gone."""
        self._check_node(node)
        pids = self.node_pids(node)
        processes.send_signal(pids, sig)
        if sig == signal.SIGKILL:
            # A process forked while the others were being killed escapes the first round.
            for _ in range(5):
                left = processes.wait_gone(pids, 10.0)
                if left:
                    raise LabError(f"processes {sorted(left)} of {node} outlived SIGKILL")
                pids = self.node_pids(node)
                if not pids:
                    break
                processes.send_signal(pids, sig)
        self._reap_children()

    def fence(self, node: str) -> None:
        """The lab's STONITH, power-off only: SIGKILL every process of ``node``, drop its VIP.

        The agents' fencing hook runs the same (``python -m cluster.lab.fence``) against the
        former active node before taking over; on real machines this would be a power switch,
        IPMI or a hypervisor. ``start_agent`` powers the node on again.
        """
        self._check_node(node)
        try:
            fence_node(
                self.namespace(node), str(self.topology.vip), INTERFACE, self.loop_device or None
            )
        except FenceError as exc:
            raise LabError(f"cannot fence {node}: {exc}") from None
        # The power switch's own record: nothing on the node can log its power-off, and a
        # checker that believes a release only when a log says so (chaos.holds) must see it.
        record = {"ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                  "event": "PoweredOff", "node": node, "by": "lab"}  # fmt: skip
        with open(self.power_log, "a") as log:
            log.write(json.dumps(record) + "\n")

    @property
    def power_log(self) -> Path:
        """The lab's record of the nodes it powered off (``fence``), JSON lines."""
        return self.directory / "power.log"


def describe(argv: Iterable[str]) -> str:
    """A short name for a lab process: zookeeper, dnsmasq, sink, agent, relay, or its program."""
    args = list(argv)
    if not args:
        return "?"
    joined = " ".join(args)
    if "QuorumPeerMain" in joined:
        return "zookeeper"
    if "cluster.lab.sink" in args:
        return "sink"
    if "cluster.lab.client" in args:
        return "client"
    if "agent" in args and "hamtactl" in args:
        return "agent"
    if "serve" in args:
        return "relay"
    return Path(args[0]).name
