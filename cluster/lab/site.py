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
from cluster.lab.topology import INTERNET, NODES, Topology, TopologyError

__all__ = ["AGENT_PREFIX", "LabError", "LabSite", "Launcher", "log_tail"]

AGENT_PREFIX: Final = "agent-"  # the recorded name of a node's agent: agent-node1


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
    def build(cls, directory: Path, prefix: str, subnet: str, python: str) -> LabSite:
        """The site of a lab in ``directory``; LabError for a prefix or subnet that cannot be."""
        try:
            topology = Topology.build(prefix, subnet)
        except TopologyError as exc:
            raise LabError(str(exc)) from None
        return cls(Path(directory).absolute(), topology, python)

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
    def power_log(self) -> Path:
        """The lab's record of the nodes it powered off (``fence``), JSON lines."""
        return self.directory / "power.log"

    @property
    def loop_device(self) -> str:
        """The shared disk's loop device ("" when none is attached)."""
        found = self.read_record()
        return found.loop_device if found is not None else ""

    def check_node(self, node: str) -> None:
        """LabError unless ``node`` is one of the pair."""
        if node not in NODES:
            raise LabError(f"no node {node!r} in the lab (nodes: {', '.join(NODES)})")

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
