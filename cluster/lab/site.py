"""Where a lab is and what it is made of: its directory, topology, interpreter and record.

Every part of the lab (:mod:`cluster.lab.host_setup`, :mod:`cluster.lab.services`,
:mod:`cluster.lab.agents`, :mod:`cluster.lab.inspection`, :mod:`cluster.lab.actions`) works from
one :class:`LabSite` and, when it starts processes, one :class:`Launcher`. The site reads
``lab.json`` afresh each time, never from memory, so that several processes can look at and act
on the same lab.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import cluster
from cluster.lab import processes, record
from cluster.lab.processes import ProcessRecord
from cluster.lab.record import LabRecord
from cluster.lab.topology import INTERNET, PAIR_CLUSTER, Topology, TopologyError
from hamta.unix_paths import SocketPathError, check_socket_path

__all__ = ["AGENT_PREFIX", "CONTROL_SOCKET", "LabError", "LabSite", "Launcher", "log_tail"]

AGENT_PREFIX: Final = "agent-"  # the recorded name of a node's agent: agent-node1
CONTROL_SOCKET: Final = "relay.sock"  # in each node's directory: its relay's control socket
# Room after CONTROL_SOCKET for the sockets of a relay's other workers (relay.sock.1, ...).
_WORKER_SUFFIX: Final = ".99"


class LabError(Exception):
    """The lab cannot be built, found or taken down; the message says why and where to look."""


def _project_root() -> Path:
    # The directory holding the ``cluster`` and ``hamta`` packages, for the lab's own processes
    # (python -m ...), whatever the current directory of whoever started the lab.
    return Path(cluster.__file__).resolve().parent.parent


def log_tail(path: Path | str, lines: int = 15) -> str:
    """The last ``lines`` lines of a log, for an error message."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass(frozen=True)
class LabSite:
    """One lab's directory, names and addresses, and its record on disk."""

    directory: Path
    topology: Topology
    python: str

    @classmethod
    def build(
        cls, directory: Path, prefix: str, subnet: str, python: str, pairs: int = 1
    ) -> LabSite:
        """The site of a lab in ``directory``; LabError for a prefix, subnet or number of pairs
        that cannot be, or a directory too deep for the nodes' unix sockets."""
        try:
            topology = Topology.build(prefix, subnet, pairs)
        except TopologyError as exc:
            raise LabError(str(exc)) from None
        directory = Path(directory).absolute()
        for node in topology.nodes:
            # Refused here, before anything is built: past the limit, the relay could not bind
            # its control socket and the lab would only say that it never became ready.
            try:
                check_socket_path(directory / node / f"{CONTROL_SOCKET}{_WORKER_SUFFIX}")
            except SocketPathError as exc:
                raise LabError(f"lab directory {directory} is too deep: {exc}") from None
        return cls(directory, topology, python)

    @property
    def credentials_path(self) -> Path:
        """The ZooKeeper digest credentials the agents and operators use (``user:password``)."""
        return self.directory / "zk-credentials"

    @property
    def peer_secret_path(self) -> Path:
        """The agents' peer channel secret (``cluster.peer_channel``), mode 0600."""
        return self.directory / "peer-secret"

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
    def probe_mailbox(self) -> Path:
        """The sink's probe mailbox (cluster.lab.sink): a folder per monitor's probe address."""
        return self.directory / INTERNET / "probe-mailbox"

    @property
    def alert_record(self) -> Path:
        """The monitors' notifications as the alert receiver got them (cluster.lab.alert_sink)."""
        return self.directory / INTERNET / "alerts.jsonl"

    @property
    def power_log(self) -> Path:
        """The lab's record of the nodes it powered off (``fence``), JSON lines."""
        return self.directory / "power.log"

    @property
    def loop_device(self) -> str:
        """The shared disk's loop device ("" when none is attached)."""
        found = self.read_record()
        return found.loop_device if found is not None else ""

    # ------------------------------------------------------------------ pairs (--pairs N)
    # Pair 1 keeps the one-pair lab's files; pair k's carry its name (``spool-lab2.img``, ...).

    def _pair_file(self, stem: str, pair: str, suffix: str = "") -> Path:
        self.check_pair(pair)
        tail = "" if pair == PAIR_CLUSTER else f"-{pair}"
        return self.directory / f"{stem}{tail}{suffix}"

    def check_pair(self, pair: str) -> None:
        """LabError unless ``pair`` is one of the lab's pairs."""
        if pair not in self.topology.pair_names:
            names = ", ".join(self.topology.pair_names)
            raise LabError(f"no pair {pair!r} in the lab (pairs: {names})")

    def pair_of(self, node: str) -> str:
        """The pair ``node`` belongs to; LabError for no node of the lab."""
        self.check_node(node)
        return self.topology.pair_of(node)

    def pair_image(self, pair: str) -> Path:
        """The sparse file behind ``pair``'s shared disk."""
        return self._pair_file("spool", pair, ".img")

    def pair_credentials(self, pair: str) -> Path:
        """``pair``'s own ZooKeeper digest credentials (``user:password``), mode 0600."""
        return self._pair_file("zk-credentials", pair)

    def pair_peer_secret(self, pair: str) -> Path:
        """``pair``'s peer channel secret, mode 0600."""
        return self._pair_file("peer-secret", pair)

    def pair_loop_device(self, pair: str) -> str:
        """``pair``'s shared disk's loop device ("" when none is attached)."""
        self.check_pair(pair)
        found = self.read_record()
        if found is None:
            return ""
        return found.loop_device if pair == PAIR_CLUSTER else found.pair_devices.get(pair, "")

    @property
    def admin_credentials_path(self) -> Path:
        """The ensemble administrator's credentials (a lab of several pairs): creates each
        pair's root, as docs/fleet.md has the operator do."""
        return self.directory / "zk-admin-credentials"

    @property
    def reader_credentials_path(self) -> Path:
        """The fleet reader's credentials (a lab of several pairs): READ on every pair."""
        return self.directory / "fleet-reader-credentials"

    @property
    def run_files(self) -> tuple[str, ...]:
        """The names of the per-pair files and fleet files one run writes here."""
        pairs = self.topology.pair_names
        names = [
            *self.topology.nodes,
            *(self.pair_image(p).name for p in pairs),
            *(self.pair_credentials(p).name for p in pairs),
            *(self.pair_peer_secret(p).name for p in pairs),
        ]
        return (*names, self.admin_credentials_path.name, self.reader_credentials_path.name)

    def check_node(self, node: str) -> None:
        """LabError unless ``node`` is one of the lab's nodes (of any pair)."""
        if node not in self.topology.nodes:
            nodes = ", ".join(self.topology.nodes)
            raise LabError(f"no node {node!r} in the lab (nodes: {nodes})")

    def node_dir(self, node: str) -> Path:
        """The directory of ``node``: its configuration files, logs and mount point."""
        self.check_node(node)
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

    def read_record(self) -> LabRecord | None:
        """``lab.json`` as it is now; None when there is none or it cannot be read."""
        # Read afresh each time: another process may have started an agent since.
        try:
            return record.load(self.directory)
        except ValueError:
            return None  # unreadable: treated as no lab; down still cleans up by names

    def current_record(self) -> LabRecord:
        """``lab.json`` as it is now; LabError when no lab is up here."""
        found = self.read_record()
        if found is None:
            raise LabError(f"no lab is up in {self.directory} (no {record.RECORD_NAME})")
        return found

    def save(self, new: LabRecord) -> None:
        """Replace ``lab.json`` with ``new``."""
        record.save(new, self.directory)

    def recorded_process(self, name: str) -> ProcessRecord | None:
        """The recorded process called ``name`` (``dns``, ``zk1``, ``agent-node1``, ...)."""
        for process in self.current_record().processes:
            if process.name == name:
                return process
        return None

    def require_alive(self, name: str) -> None:
        """LabError, with its log, if the recorded process ``name`` has exited."""
        process = self.recorded_process(name)
        if process is not None and not process.alive():
            raise LabError(f"{name} exited; log {process.log}:\n{log_tail(process.log)}")

    def env(self) -> dict[str, str]:
        """The environment of the lab's Python processes: this checkout first on the path."""
        env = dict(os.environ)
        root = str(_project_root())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def module_argv(self, module: str, *args: str) -> list[str]:
        """``python -m module args`` with the lab's interpreter."""
        return [self.python, "-m", module, *args]


class Launcher:
    """Starts the lab's long-lived processes, records each in ``lab.json`` and reaps them.

    The processes this object started are its children: it keeps their handles so that a
    process that has ended does not stay a zombie in this process.
    """

    def __init__(self, site: LabSite) -> None:
        self._site = site
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(
        self,
        name: str,
        host: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ProcessRecord:
        """Start ``argv`` detached in ``host``'s namespace, log to ``log``, and record it."""
        started = processes.spawn(
            name, host, self._site.namespace(host), argv, log, env=env, cwd=cwd
        )
        self._children[started.record.pid] = started.popen
        self._site.save(self._site.current_record().with_process(started.record))
        return started.record

    def reap(self) -> None:
        """Collect the exit status of every child that has ended."""
        for popen in self._children.values():
            popen.poll()
        self._children = {pid: p for pid, p in self._children.items() if p.returncode is None}
