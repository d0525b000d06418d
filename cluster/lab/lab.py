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

``Lab`` is the face the command line, the tests, the benchmarks and the chaos suite use; it
builds its parts in one place and hands each call to the part that holds the concept:
:class:`~cluster.lab.site.LabSite` (directory, names, record), :class:`~cluster.lab.site.Launcher`
(the processes it starts), :class:`~cluster.lab.host_setup.HostSetup` (namespaces, disk,
credentials), :class:`~cluster.lab.services.Services` (ZooKeeper, DNS, sink),
:class:`~cluster.lab.monitors.Monitors` (the monitors of the inet and client hosts),
:class:`~cluster.lab.agents.Agents`, :class:`~cluster.lab.inspection.Inspection` and
:class:`~cluster.lab.actions.Actions` (mail, kill, fence).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster.lab import configs, pairs, record
from cluster.lab.actions import Actions
from cluster.lab.agents import Agents
from cluster.lab.host_setup import HostSetup
from cluster.lab.inspection import Inspection
from cluster.lab.monitors import Monitors, read_alerts
from cluster.lab.results import SendResult
from cluster.lab.services import Services
from cluster.lab.site import LabError, LabSite, Launcher
from cluster.lab.topology import PAIR_CLUSTER, Topology
from cluster.zookeeper import ZooKeeperEnsemble

__all__ = ["Lab", "LabError"]


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
        pairs: int = 1,
        pair: str = PAIR_CLUSTER,
    ) -> None:
        site = LabSite.build(directory, prefix, subnet, python, pairs)
        site.check_pair(pair)
        launcher = Launcher(site)
        inspection = Inspection(site)
        self._site = site
        self._launcher = launcher
        self._host = HostSetup(site)
        self._services = Services(site, launcher)
        self._inspection = inspection
        self._agents = Agents(site, launcher, inspection)
        self._actions = Actions(site, launcher, inspection)
        self._monitors = Monitors(site, launcher)
        # The pair this object acts on where a method names none (its VIP, its nodes' roles):
        # pair 1 unless told; the chaos suite's faulted pair (--pair).
        self._pair = pair

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
        return cls(
            directory,
            prefix=found.prefix,
            subnet=found.subnet,
            python=found.python,
            pairs=found.pairs,
        )

    @property
    def directory(self) -> Path:
        """The lab's directory: its record, configuration files and logs."""
        return self._site.directory

    @property
    def topology(self) -> Topology:
        """The lab's names and addresses."""
        return self._site.topology

    @property
    def python(self) -> str:
        """The interpreter of the lab's own processes."""
        return self._site.python

    @property
    def prefix(self) -> str:
        """The prefix of every namespace name."""
        return self._site.topology.prefix

    @property
    def vip(self) -> str:
        """The virtual IP's address (of :attr:`pair`; without prefix length)."""
        return str(self._site.topology.pair_vip(self._pair).ip)

    @property
    def zookeeper_hosts(self) -> str:
        """The ensemble's connection string."""
        return self._site.topology.zookeeper_hosts

    @property
    def credentials_path(self) -> Path:
        """The ZooKeeper digest credentials the agents and operators use (``user:password``)."""
        return self._site.credentials_path

    @property
    def peer_secret_path(self) -> Path:
        """The agents' peer channel secret (mode 0600)."""
        return self._site.peer_secret_path

    @property
    def image_path(self) -> Path:
        """The sparse file behind the shared disk."""
        return self._site.image_path

    @property
    def record_file(self) -> Path:
        """Where ``lab.json`` is."""
        return self._site.record_file

    @property
    def sink_record(self) -> Path:
        """The sink's JSON lines, one per delivered recipient."""
        return self._site.sink_record

    @property
    def power_log(self) -> Path:
        """The lab's record of the nodes it powered off (``fence``), JSON lines."""
        return self._site.power_log

    @property
    def loop_device(self) -> str:
        """The shared disk's loop device ("" when none is attached)."""
        return self._site.loop_device

    @property
    def pair(self) -> str:
        """The pair this object acts on where a method names none."""
        return self._pair

    @property
    def nodes(self) -> tuple[str, str]:
        """The two nodes of :attr:`pair`."""
        return self._site.topology.pair_nodes(self._pair)

    def for_pair(self, pair: str) -> Lab:
        """The same lab, acting on ``pair`` where a method names none."""
        site = self._site
        topology = site.topology
        return Lab(
            site.directory,
            prefix=topology.prefix,
            subnet=str(topology.subnet),
            python=site.python,
            pairs=topology.pairs,
            pair=pair or self._pair,
        )

    @property
    def pair_names(self) -> tuple[str, ...]:
        """Each pair's cluster name: ``lab`` (pair 1), ``lab2``, ``lab3``."""
        return self._site.topology.pair_names

    def pair_nodes(self, pair: str) -> tuple[str, str]:
        """The two nodes of ``pair``."""
        self._site.check_pair(pair)
        return self._site.topology.pair_nodes(pair)

    def pair_vip(self, pair: str) -> str:
        """``pair``'s virtual IP (without prefix length)."""
        self._site.check_pair(pair)
        return str(self._site.topology.pair_vip(pair).ip)

    @property
    def reader_credentials_path(self) -> Path:
        """The fleet reader's credentials (a lab of several pairs): READ on every pair."""
        return self._site.reader_credentials_path

    def node_dir(self, node: str) -> Path:
        """The directory of ``node``: its configuration files, logs and mount point."""
        return self._site.node_dir(node)

    def namespace(self, host: str) -> str:
        """The network namespace of ``host``."""
        return self._site.namespace(host)

    def address(self, host: str) -> str:
        """The address of ``host``."""
        return self._site.address(host)

    # ------------------------------------------------------------------ up and down

    def up(
        self,
        *,
        wait: float = 60.0,
        agents: bool = True,
        monitors: bool = True,
        haproxy: bool = False,
    ) -> None:
        """Build the lab and start its services; with ``agents``, also both agents; with
        ``monitors``, the check locations' monitors (in the background: not waited for); with
        ``haproxy``, HAProxy on the client host in front of both nodes (``cluster.lab.haproxy``).

        Returns once ZooKeeper serves with a leader, the DNS and the sink answer from the client
        namespace and (with ``agents``) one node holds the virtual IP and answers SMTP on it, all
        within ``wait`` seconds. On any failure everything built is taken down again (the logs
        stay) and LabError says what failed.
        """
        deadline = time.monotonic() + wait
        host = self._host
        host.check_free()
        host.prepare_directory()
        host.record_new_lab()
        try:
            host.build_network()
            host.build_disk()
            host.write_credentials()
            self._services.start_zookeeper()
            self._services.start_internet()
            topology = self._site.topology
            for node in topology.nodes:
                self._agents.write_node_configs(node)
            self._services.wait(deadline)
            if topology.pairs > 1:
                # The administrator creates each pair's root before its agents first start.
                pairs.create_pairs(self._site, self._inspection)
            if agents:
                for node in topology.nodes:
                    self._agents.start(node)
                for pair in topology.pair_names:
                    self._agents.wait_active(max(0.0, deadline - time.monotonic()), pair=pair)
            if haproxy:
                self._services.start_haproxy(deadline)
            if monitors:
                # The check locations (inet, client), in the background: not waited for.
                self._monitors.start()
        except BaseException as exc:
            try:
                self.down()
            except LabError as cleanup:
                exc.add_note(f"cleaning up after the failure also failed: {cleanup}")
            if isinstance(exc, LabError) or not isinstance(exc, Exception):
                raise
            raise LabError(f"lab up failed: {exc}") from exc

    def down(self) -> None:
        """Take the lab down; idempotent, and also after a crash of whatever ran it.

        Ends the recorded processes (agents first, so that the active one can demote while
        ZooKeeper still serves), then any process still inside one of the lab's namespaces,
        detaches the loop device, deletes the namespaces and the record. Logs stay.
        """
        found = self._site.read_record()
        topology = self._host.recorded_topology(found)
        left = self._host.end_processes(found, topology)
        self._services.stop()
        self._launcher.reap()
        problems = self._host.remove(found, topology, left)
        if problems:
            raise LabError("lab down left something behind: " + "; ".join(problems))

    # ------------------------------------------------------------------ agents

    @property
    def ensemble(self) -> ZooKeeperEnsemble:
        """The lab's ZooKeeper servers, in the process that brought the lab up."""
        return self._services.ensemble

    def fence_command(self) -> list[str]:
        """The command the agents run to fence their peer (``{peer}`` is filled in)."""
        return self._agents.fence_command(self._pair)

    def configure_agent(self, node: str, overrides: configs.Sections) -> Path:
        """Write ``node``'s agent configuration: the lab's, with ``overrides`` section by section.

        A section's keys replace the lab's (``{"fencing": {}}`` keeps the section as it is, a
        ``None`` value drops the key, e.g. ``{"fencing": {"commands": None}}`` for no STONITH).
        It takes effect when the agent starts next.
        """
        return self._agents.configure(node, overrides)

    def start_agent(self, node: str, env: Mapping[str, str] | None = None) -> None:
        """Start ``node``'s agent (which starts its relay); LabError if the node still runs.

        ``env`` adds to the agent's environment (e.g. libfaketime's, for a skewed clock).
        """
        self._agents.start(node, env)

    def active_node(self, timeout: float = 2.0, *, pair: str | None = None) -> str | None:
        """The node (of ``pair``, default :attr:`pair`) that holds its virtual IP alone and
        answers SMTP on it from the client."""
        return self._agents.active_node(timeout, pair=pair or self._pair)

    def wait_active(
        self, timeout: float = 30.0, *, other_than: str | None = None, pair: str | None = None
    ) -> str:
        """Wait until one node (of ``pair``, default :attr:`pair`) is active (and, with
        ``other_than``, not that one); return it."""
        return self._agents.wait_active(timeout, other_than=other_than, pair=pair or self._pair)

    def fleet_status(self) -> dict[str, Any]:
        """``hamta fleet status --json`` from the client host with the reader's credentials."""
        return pairs.fleet_status(self._site, self._inspection)

    # ------------------------------------------------------------------ looking

    def exec(
        self, host: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``host``'s namespace and wait (output captured as text by default)."""
        return self._inspection.exec(host, argv, **kwargs)

    def run_module(
        self, host: str, module: str, args: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """``python -m module args`` of this checkout in ``host``'s namespace, and wait."""
        return self._inspection.run_module(host, module, args, timeout)

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``host``'s namespace; the caller waits for it."""
        return self._inspection.popen(host, argv, **kwargs)

    def node_pids(self, node: str) -> list[int]:
        """Every process in ``node``'s namespace (any host of the lab may be named)."""
        return self._inspection.node_pids(node)

    def vip_holders(self, pair: str | None = None) -> list[str]:
        """The nodes (of ``pair``, default :attr:`pair`) whose ``eth0`` carries its virtual IP
        now (more than one is split brain)."""
        return self._inspection.vip_holders(pair or self._pair)

    def spool_mounted_on(self, pair: str | None = None) -> list[str]:
        """The nodes (of ``pair``, default :attr:`pair`) on which some process sees its shared
        disk mounted."""
        return self._inspection.spool_mounted_on(pair or self._pair)

    def deliveries(self) -> list[dict[str, Any]]:
        """Every line the sink has recorded (one per delivered recipient), in order."""
        return self._inspection.deliveries()

    def delivered_ids(self) -> set[str]:
        """The ``X-Lab-Id`` values the sink has recorded."""
        return self._inspection.delivered_ids()

    def relay_state(self, node: str) -> str | None:
        """What ``node``'s relay says it is (standby, active, ...); None when it does not answer."""
        return self._inspection.relay_state(node)

    def relay_ready(self, node: str) -> bool | None:
        """What ``node``'s relay says of its readiness; None when it does not answer."""
        return self._inspection.relay_ready(node)

    def cluster_status(self, timeout: float = 15.0) -> dict[str, Any] | None:
        """``hamta cluster status --json`` (of :attr:`pair`) run from the client namespace; None
        if it fails."""
        return self._inspection.cluster_status(timeout, self._pair)

    def start_monitors(self, failure_threshold: int = 1) -> None:
        """Start the check locations' monitors (a lab brought up without them: the chaos
        suite's, for the scenarios that need them); in the background, not waited for. A check
        is down after ``failure_threshold`` failures in a row (checks every second)."""
        self._monitors.start(failure_threshold)

    def stop_monitors(self) -> None:
        """End the check locations' monitors; their stores and logs stay."""
        self._monitors.stop()

    def monitor_verdicts(self, timeout: float = 15.0) -> dict[str, Any]:
        """Each check location's monitor: its checks' states (None: no answer from its store
        within ``timeout``)."""
        return self._monitors.verdicts(timeout)

    def alerts(self) -> list[dict[str, Any]]:
        """The monitors' notifications the lab's alert receiver recorded (oldest first)."""
        return read_alerts(self._site)

    def status(self, *, cluster: bool = True) -> dict[str, Any]:
        """The lab as data: hosts with their processes, ZooKeeper, VIP, spool and roles."""
        return self._inspection.status(cluster=cluster)

    # ------------------------------------------------------------------ acting

    def send(
        self,
        count: int,
        *,
        size: int = 1024,
        domain: str = "a.lab.test",
        timeout: float = 30.0,
        connections: int = 1,
        submission: int | None = None,
        password: str | None = None,
        sender: str | None = None,
        pair: str | None = None,
    ) -> SendResult:
        """Send ``count`` messages from the client namespace to the virtual IP (of ``pair``),
        port 25.

        ``submission`` (587, 465): through submission with the probe account instead (see
        ``cluster.lab.submission``); ``password``, ``sender``: to see AUTH and policy refuse.
        """
        return self._actions.send(
            count,
            size=size,
            domain=domain,
            timeout=timeout,
            connections=connections,
            submission=submission,
            password=password,
            sender=sender,
            pair=pair or self._pair,
        )

    def kill_node(self, node: str, sig: int = signal.SIGKILL) -> None:
        """Signal every process of ``node`` (agent and relay); with SIGKILL, wait until gone."""
        self._actions.kill_node(node, sig)

    def fence(self, node: str) -> None:
        """The lab's STONITH, power-off only: SIGKILL every process of ``node``, drop its VIP.

        ``start_agent`` powers the node on again.
        """
        self._actions.fence(node)
