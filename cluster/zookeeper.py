"""Real ZooKeeper servers from Debian's package, for the lab and the tests.

The agent never runs ZooKeeper; it needs one to be tested, and the lab needs an ensemble it can
hurt (kill the leader, freeze a follower, cut a namespace off). Each server is the package's JVM
started directly (``QuorumPeerMain``, as ``zkServer.sh`` would, without its pid files and
``/var/log`` paths), in its own process group, optionally inside a network namespace. Whether a
server serves is asked the way an operator would: the ``srvr`` four-letter word on its client
port, opened from inside the server's namespace when it has one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from pyroute2 import netns as pyroute2_netns

# Debian's zookeeper.jar names its own dependencies in its manifest; the slf4j binding and log4j
# are not among them, and without them the server would log nothing at all.
CLASSPATH: Final = (
    "/etc/zookeeper/conf",
    "/usr/share/java/zookeeper.jar",
    "/usr/share/java/slf4j-log4j12.jar",
    "/usr/share/java/log4j-1.2.jar",
)
MAIN_CLASS: Final = "org.apache.zookeeper.server.quorum.QuorumPeerMain"

# Small, short-lived servers: the serial collector and the first JIT tier start fastest.
_JVM_FLAGS: Final = (
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:-UsePerfData",
    "-Dzookeeper.jmx.log4j.disable=true",
    "-Dzookeeper.root.logger=INFO,CONSOLE",
)
_STOP_GRACE: Final = 5.0  # seconds between SIGTERM and SIGKILL
_POLL_INTERVAL: Final = 0.1  # between two ``srvr`` probes while waiting for a server
_PROBE_TIMEOUT: Final = 1.0  # one ``srvr`` exchange
_LOG_TAIL_LINES: Final = 30
_SERVING_MODES: Final = frozenset({"standalone", "leader", "follower", "observer"})


class ZooKeeperError(Exception):
    """A server would not start, serve or stop."""


@dataclass(frozen=True)
class ServerSpec:
    """One server of an ensemble: its id (``myid``), address and ports."""

    id: int
    address: str
    client_port: int = 2181
    quorum_port: int = 2888
    election_port: int = 3888

    @property
    def hosts(self) -> str:
        """``address:client_port``, as a ZooKeeper client wants it."""
        return f"{self.address}:{self.client_port}"


def four_letter_word(
    address: str, port: int, word: str, *, netns: str | None = None, timeout: float = _PROBE_TIMEOUT
) -> str:
    """Send a four-letter word to a server and return its whole answer.

    With ``netns`` the connection is opened from inside that network namespace. Raises OSError
    when the server does not answer.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = _socket_in(netns, family) if netns else socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        sock.connect((address, port))
        sock.sendall(word.encode("ascii"))
        chunks: list[bytes] = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _socket_in(netns: str, family: socket.AddressFamily) -> socket.socket:
    """A TCP socket that belongs to network namespace ``netns``.

    A socket stays in the namespace it was created in, so it is created by a throwaway thread
    that entered the namespace (setns changes only the calling thread, and that thread ends
    right after): the rest of this multi-threaded process never changes namespace.
    """
    outcome: list[socket.socket | BaseException] = []

    def create() -> None:
        try:
            pyroute2_netns.setns(netns, flags=0)  # flags=0: never create a missing namespace
            outcome.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=create, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise OSError(f"cannot open a socket in network namespace {netns}: {result}") from result
    return result


def _parse_mode(answer: str) -> str | None:
    for line in answer.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Mode":
            return value.strip() or None
    return None


class ZooKeeperServer:
    """One ZooKeeper server process: standalone, or one member of ``ensemble``."""

    def __init__(
        self,
        spec: ServerSpec,
        data_dir: Path,
        *,
        ensemble: Sequence[ServerSpec] = (),
        tick_ms: int = 500,
        netns: str | None = None,
        heap_mb: int = 128,
    ) -> None:
        self.spec = spec
        self.data_dir = data_dir
        self.ensemble = tuple(ensemble)
        self.tick_ms = tick_ms
        self.netns = netns
        self.heap_mb = heap_mb
        self.config_path = data_dir / "zoo.cfg"
        self.log_path = data_dir / "zookeeper.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> str:
        """``address:client_port``."""
        return self.spec.hosts

    @property
    def pid(self) -> int | None:
        """The JVM's pid while it runs (it leads its own process group), else None."""
        process = self._process
        if process is None or process.poll() is not None:
            return None
        return process.pid

    def config(self) -> str:
        """The text of this server's ``zoo.cfg``."""
        lines = [
            f"tickTime={self.tick_ms}",
            "initLimit=10",
            "syncLimit=5",
            f"dataDir={self.data_dir}",
            f"clientPort={self.spec.client_port}",
            f"clientPortAddress={self.spec.address}",
            # Sessions of up to 20 ticks: 2 s sessions need ticks of at most 1 s (minimum 2 ticks).
            f"maxSessionTimeout={20 * self.tick_ms}",
            # The admin server would take port 8080 on every address.
            "admin.enableServer=false",
            "4lw.commands.whitelist=ruok,srvr,stat,mntr",
            "quorumListenOnAllIPs=false",
        ]
        if len(self.ensemble) > 1:
            lines += [
                f"server.{peer.id}={peer.address}:{peer.quorum_port}:{peer.election_port}"
                for peer in self.ensemble
            ]
        return "\n".join(lines) + "\n"

    def command(self) -> list[str]:
        """The command line that runs this server (under ``ip netns exec`` when in a namespace)."""
        java = shutil.which("java") or "/usr/bin/java"
        argv = [
            java,
            f"-Xmx{self.heap_mb}m",
            *_JVM_FLAGS,
            f"-Dzookeeper.log.dir={self.data_dir}",
            "-cp",
            ":".join(CLASSPATH),
            MAIN_CLASS,
            str(self.config_path),
        ]
        if self.netns is not None:
            # ip execs the command itself, so the pid it leaves us is the JVM's.
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def start(self) -> None:
        """Write ``zoo.cfg`` and ``myid`` and spawn the JVM in its own process group."""
        if self.pid is not None:
            raise ZooKeeperError(f"ZooKeeper server {self.spec.id} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        (self.data_dir / "myid").write_text(f"{self.spec.id}\n")
        with self.log_path.open("ab") as log:
            try:
                self._process = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ZooKeeperError(
                    f"cannot start ZooKeeper server {self.spec.id}: {exc}"
                ) from exc

    def mode(self) -> str | None:
        """What ``srvr`` says the server is (standalone, leader, follower), None when silent."""
        try:
            answer = four_letter_word(
                self.spec.address, self.spec.client_port, "srvr", netns=self.netns
            )
        except OSError:
            return None
        return _parse_mode(answer)

    def wait_serving(self, timeout: float = 30.0) -> str:
        """Wait until the server serves clients; return its mode.

        Raises ZooKeeperError, with the end of the server's log, when it exits or the time is up.
        """
        process = self._process
        if process is None:
            raise ZooKeeperError(f"ZooKeeper server {self.spec.id} was never started")
        deadline = time.monotonic() + timeout
        while True:
            mode = self.mode()
            if mode in _SERVING_MODES:
                assert mode is not None
                return mode
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ZooKeeperError(
                    f"ZooKeeper server {self.spec.id} at {self.hosts} not serving after "
                    f"{timeout:g}s (mode {mode}); log tail:\n{self.log_tail()}"
                )
            # Waiting on the process doubles as the pause between probes and notices an exit.
            try:
                code = process.wait(timeout=min(_POLL_INTERVAL, remaining))
            except subprocess.TimeoutExpired:
                continue
            raise ZooKeeperError(
                f"ZooKeeper server {self.spec.id} exited with status {code}; "
                f"log tail:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, signum: signal.Signals) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it is still there after a few seconds. Idempotent."""
        process = self._process
        if process is None or not self._signal(signal.SIGTERM):
            self._reap()
            return
        self._signal(signal.SIGCONT)  # a frozen server must run to act on SIGTERM
        try:
            process.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server (a crash, for the lab) and reap it."""
        if self._signal(signal.SIGKILL):
            self._reap()

    def freeze(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing."""
        if not self._signal(signal.SIGSTOP):
            raise ZooKeeperError(f"ZooKeeper server {self.spec.id} is not running")

    def thaw(self) -> None:
        """SIGCONT a frozen server."""
        if not self._signal(signal.SIGCONT):
            raise ZooKeeperError(f"ZooKeeper server {self.spec.id} is not running")

    def _reap(self) -> None:
        process = self._process
        if process is None:
            return
        try:
            process.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired as exc:  # SIGKILL was sent; only a kernel hang is left
            raise ZooKeeperError(f"ZooKeeper server {self.spec.id} did not exit") from exc


def _peers_of(pid: int) -> set[tuple[str, int]]:
    """The remote ends of process ``pid``'s established TCP connections, from /proc: its
    socket inodes (``/proc/PID/fd``) looked up in its own network namespace's tables
    (``/proc/PID/net``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    peers = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] != "01" or fields[9] not in inodes:  # 01: ESTABLISHED
                    continue
                address, port = fields[2].split(":")
                raw = bytes.fromhex(address)
                # The kernel prints each 32-bit word of the address in host (little-endian) order.
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                peers.add((socket.inet_ntop(family, words), int(port, 16)))
    return peers


class ZooKeeperEnsemble:
    """N servers (1 for standalone), started together and stopped together."""

    def __init__(
        self,
        specs: Sequence[ServerSpec],
        base_dir: Path,
        *,
        tick_ms: int = 500,
        netns: Mapping[int, str] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("an ensemble needs at least one server")
        namespaces = netns or {}
        self.specs = tuple(specs)
        self.servers = [
            ZooKeeperServer(
                spec,
                base_dir / f"zk{spec.id}",
                ensemble=self.specs,
                tick_ms=tick_ms,
                netns=namespaces.get(spec.id),
            )
            for spec in self.specs
        ]

    @property
    def hosts(self) -> str:
        """The connection string for clients: ``a:p,b:p,c:p``."""
        return ",".join(spec.hosts for spec in self.specs)

    def start(self, timeout: float = 60.0) -> None:
        """Start every server and wait until all serve; on failure stop them all and raise."""
        deadline = time.monotonic() + timeout
        try:
            for server in self.servers:
                server.start()
            for server in self.servers:
                server.wait_serving(max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every server (idempotent)."""
        errors: list[ZooKeeperError] = []
        for server in self.servers:
            try:
                server.stop()
            except ZooKeeperError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def leader(self) -> ZooKeeperServer | None:
        """The server that leads (or the standalone one), None during an election."""
        for server in self.servers:
            if server.mode() in ("leader", "standalone"):
                return server
        return None

    def server_of(self, pid: int) -> ZooKeeperServer | None:
        """The server process ``pid`` (a ZooKeeper client: an agent) is connected to, or None
        (not connected, or gone). Which server a client chose is kazoo's affair; a test or a
        fault that stops one server needs to know it."""
        try:
            peers = _peers_of(pid)
        except OSError:
            return None
        for server in self.servers:
            spec = server.spec
            if (str(ipaddress.ip_address(spec.address)), spec.client_port) in peers:
                return server
        return None

    def server(self, server_id: int) -> ZooKeeperServer:
        """The server with ``myid`` ``server_id``."""
        for server in self.servers:
            if server.spec.id == server_id:
                return server
        raise KeyError(server_id)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
