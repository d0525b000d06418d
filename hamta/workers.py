"""Several relay processes on one node: one per core, sharing the SMTP port, each with its shard.

A relay process runs on one core (Python's interpreter lock), and a relay is CPU-bound long before
the disk or the network is busy. With ``node.workers = N`` the process started by ``hamta serve``
(worker 0) starts N-1 more relay processes and drives them over their control sockets. Every
worker listens on the same SMTP addresses with SO_REUSEPORT, so the kernel spreads connections
across them, and owns one shard of the spool: worker 0 the spool directory itself, worker K the
directory ``shard-K`` inside it. A message lives its whole life in the shard that accepted it, so
the workers share no state and need no locking between them; each shard is a complete spool
(docs/spool-format.md) with its own lock, journal and recovery.

Worker 0 is the relay the outside world sees: its control socket and admin endpoint answer for
the whole node, fanning commands out and adding figures up. The other workers are started warm
(standby) when worker 0 starts, so that activation costs no interpreter start-up; they die with
worker 0 (the kernel sends them SIGTERM when it goes, even by kill -9), and worker 0 restarts any
that dies on its own, activating it on its shard again.

A spool taken over from a node that ran more workers may hold mail in shards beyond this node's
count. With ``node.workers`` unset (the count follows the CPUs) worker 0 adopts them: for the
activation it starts one worker per such shard with no SMTP socket, which recovers and delivers
that shard's mail and takes no new mail (docs/cluster.md "Workers on both nodes").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hamta import control_client
from hamta.control_client import ControlError
from hamta.listeners import unlisten
from hamta.spool import Spawn, create_task, load_state

SHARD_PREFIX = "shard-"
_PR_SET_PDEATHSIG = 1


def shard_path(root: Path, worker: int) -> Path:
    """The spool directory of ``worker`` inside the node's spool ``root``."""
    return root if worker == 0 else root / f"{SHARD_PREFIX}{worker}"


def shard_index(shard: Path) -> int:
    """The worker that owns ``shard``, a directory named by :func:`shard_path` (not the root)."""
    return int(shard.name.removeprefix(SHARD_PREFIX))


def control_path(socket: Path, worker: int) -> Path:
    """The control socket of ``worker`` (worker 0's is the configured one)."""
    return socket if worker == 0 else socket.with_name(f"{socket.name}.{worker}")


def stray_shards(root: Path, workers: int) -> list[Path]:
    """Shards of ``root`` holding mail that no worker would deliver with ``workers`` workers."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        suffix = entry.name.removeprefix(SHARD_PREFIX)
        if not (entry.name.startswith(SHARD_PREFIX) and suffix.isdigit()):
            continue
        # A drained shard strands nothing, so fewer workers may run once it is empty.
        if int(suffix) >= workers and (entry / "journal").is_dir() and load_state(entry).live:
            found.append(entry)
    return sorted(found)


def stray_refusal(root: Path, workers: int, stray: list[Path], *, default: bool) -> str:
    """Why a node whose ``workers`` would strand the ``stray`` shards of ``root`` does not start.

    ``default``: ``node.workers`` is not set, so the count is this machine's CPUs; a spool that
    came from a larger node by a failover is the usual cause, hence the hint.
    """
    reason = (
        f"{root} has shards no worker owns with node.workers = {workers}: "
        f"{', '.join(p.name for p in stray)}; raise node.workers until they are empty"
    )
    if default:
        reason += (
            f" (node.workers is not set: it follows the {workers} CPU(s) this relay may use; "
            "set it to the same value on every node of a cluster)"
        )
    return reason


def die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGTERM this process when ``parent``, the process that started it, dies.

    ``parent`` is the pid the starter gave: a parent that died while this process was still
    starting (before the Linux prctl took effect) has left it to another one, which the kernel's
    request would never report; the pid that differs shows it.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # orphaned already: go as if the parent's death were reported
        os.kill(os.getpid(), signal.SIGTERM)


class _Worker:
    def __init__(self, index: int, control: Path, listeners: list[socket.socket]) -> None:
        self.index = index
        self.socket = control
        # Its SMTP sockets, bound by worker 0 before it gave up root (hamta.listeners).
        self.listeners = listeners
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0


class WorkerPool:
    """Workers 1..N-1 of a node, started and driven by worker 0."""

    def __init__(
        self,
        config_file: Path | None,
        control: Path,
        log: Any,
        listeners: list[list[socket.socket]],
        spawn: Spawn = create_task,
    ) -> None:
        """Workers 1..N-1, ``listeners[k - 1]`` being worker K's bound SMTP sockets."""
        self.workers = [
            _Worker(k, control_path(control, k), sockets)
            for k, sockets in enumerate(listeners, start=1)
        ]
        # The node's supervisor: a watcher dying of a bug would leave a worker unrestarted.
        self._spawn_task = spawn
        self._config_file = config_file
        self._control = control
        self._log = log
        self._root: Path | None = None  # set while active
        self._term: dict[str, Any] = {}  # the activation's epoch and fencing token
        self._stopping = False
        self._watchers: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------- processes

    async def start(self, timeout: float = 30.0) -> None:
        """Start every worker warm and wait until each answers on its control socket."""
        await asyncio.gather(*(self._spawn(worker, timeout) for worker in self.workers))

    async def _spawn(self, worker: _Worker, timeout: float) -> None:
        args = [
            sys.executable,
            "-m",
            "hamtactl",
            "serve",
            "--standby",
            "--worker",
            str(worker.index),
            "--parent-pid",
            str(os.getpid()),
        ]
        if self._config_file is not None:
            args += ["--config", str(self._config_file)]
        fds = [sock.fileno() for sock in worker.listeners]
        args += ["--listen-fds", ",".join(map(str, fds))]
        worker.process = await asyncio.create_subprocess_exec(
            *args, stdin=asyncio.subprocess.DEVNULL, pass_fds=fds
        )
        deadline = time.monotonic() + timeout
        while True:
            # An external process has no event to wait on: poll its socket, briefly.
            if worker.process.returncode is not None:
                raise ControlError(
                    f"worker {worker.index} exited with {worker.process.returncode} at start"
                )
            try:
                reply = await self._command(worker, {"command": "status"}, timeout=2)
            except ControlError:
                reply = {}
            # A worker of an earlier run, still stopping, may answer at the same path.
            if reply.get("pid") == worker.process.pid:
                break
            if time.monotonic() > deadline:
                raise ControlError(f"worker {worker.index} did not start")
            await asyncio.sleep(0.05)
        task = self._spawn_task(
            f"worker {worker.index} watcher", self._watch(worker, worker.process)
        )
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        self._log.info("WorkerStarted", worker=worker.index, worker_pid=worker.process.pid)

    async def _watch(self, worker: _Worker, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        if self._stopping or worker.process is not process:
            return
        # Worker 0 still holds the dead worker's sockets: were they left listening, the kernel
        # would queue its share of connections where nobody accepts them.
        for sock in worker.listeners:
            unlisten(sock)
        worker.restarts += 1
        self._log.error("WorkerExited", worker=worker.index, code=code, restarts=worker.restarts)
        try:
            await self._spawn(worker, timeout=30)
            if self._root is not None:
                await self._command(
                    worker, {"command": "activate", "spool": str(self._root), **self._term}
                )
                self._log.info("WorkerReactivated", worker=worker.index)
        except ControlError as exc:
            self._log.error("WorkerRestartFailed", worker=worker.index, error=str(exc))

    async def stop(self, timeout: float) -> None:
        """Stop every worker gracefully (SIGTERM), killing any still there after ``timeout``."""
        self._stopping = True
        for task in list(self._watchers):
            task.cancel()
        await self._stop(self.workers, timeout)

    @staticmethod
    async def _stop(workers: list[_Worker], timeout: float) -> None:
        running = [w.process for w in workers if w.process and w.process.returncode is None]
        for worker in workers:
            worker.process = None  # its watcher must not start it again
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if running:
            _, late = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in running], timeout=timeout + 5
            )
            if late:
                for process in running:
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                await asyncio.gather(*(p.wait() for p in running))

    # ----------------------------------------------------------------- commands

    async def _command(
        self, worker: _Worker, request: dict[str, Any], timeout: float = 120.0
    ) -> dict[str, Any]:
        return await control_client.request(worker.socket, request, timeout)

    async def _all(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._command(w, request) for w in self.workers)))

    async def activate(
        self,
        root: Path,
        epoch: int | None = None,
        token: Path | None = None,
        adopt: Sequence[int] = (),
    ) -> list[dict[str, Any]]:
        """Activate every worker on its shard of ``root`` (each finds its shard in the root).

        Each worker checks the fencing token (``epoch``, ``token``) on its own, as the first.
        ``adopt``: shards holding mail that no worker owns (a spool from a node that ran more
        workers): a worker with no SMTP socket is started for each, for this activation, to
        recover and deliver that shard's mail while accepting none into it.
        """
        self._root = root
        self._term = {"epoch": epoch, "token": str(token)} if token is not None else {}
        adopters = [_Worker(k, control_path(self._control, k), []) for k in adopt]
        self.workers.extend(adopters)
        await asyncio.gather(*(self._spawn(worker, 30) for worker in adopters))
        return await self._all({"command": "activate", "spool": str(root), **self._term})

    async def deactivate(self, timeout: float) -> None:
        """Deactivate every worker gracefully; the ones started to adopt a shard then stop."""
        self._root = None
        results = await asyncio.gather(
            *(
                self._command(w, {"command": "deactivate", "timeout": timeout})
                for w in self.workers
                if w.process is not None
            ),
            return_exceptions=True,
        )
        started = [w for w in self.workers if w.process is not None]
        for worker, result in zip(started, results, strict=True):
            if isinstance(result, BaseException):
                self._log.warning("WorkerDeactivateFailed", worker=worker.index, error=str(result))
        adopters = [w for w in self.workers if not w.listeners]
        self.workers[:] = [w for w in self.workers if w.listeners]
        await self._stop(adopters, timeout)

    def adopting(self) -> list[int]:
        """The shards this pool's workers adopted in the current activation."""
        return [w.index for w in self.workers if not w.listeners]

    async def broadcast(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """Send one command to every worker; their replies in worker order, or a ControlError."""
        return await self._all(request)

    async def statuses(self) -> list[dict[str, Any]]:
        """Every worker's queue summary; an unreachable worker reads as not ready."""
        results = await asyncio.gather(
            *(self._command(w, {"command": "status"}, timeout=5) for w in self.workers),
            return_exceptions=True,
        )
        return [
            {"ready": False, "state": "unreachable", "error": str(r), "worker": w.index}
            if isinstance(r, BaseException)
            else {**r, "worker": w.index}
            for w, r in zip(self.workers, results, strict=True)
        ]

    async def metrics(self) -> list[str]:
        """Every reachable worker's Prometheus exposition."""
        results = await asyncio.gather(
            *(self._command(w, {"command": "metrics"}, timeout=5) for w in self.workers),
            return_exceptions=True,
        )
        return [str(r["text"]) for r in results if isinstance(r, dict)]

    async def domains(self) -> list[dict[str, Any]]:
        """Every reachable worker's per-domain snapshot (``hamta.domain_stats``)."""
        results = await asyncio.gather(
            *(self._command(w, {"command": "domains"}, timeout=5) for w in self.workers),
            return_exceptions=True,
        )
        return [r["snapshot"] for r in results if isinstance(r, dict) and "snapshot" in r]


_SUMMED = (
    "depth",
    "recipients_ready",
    "recipients_deferred",
    "in_flight",
    "connections",
    "delivery_rate_per_s",
    "received_total",
    "delivered_total",
    "bounced_total",
    "expired_total",
    "delivered_last_minute",
    "bounced_last_minute",
)


def merge_summaries(own: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """One queue summary for the node out of each worker's."""
    merged = dict(own)
    merged["workers"] = [
        {
            "worker": 0,
            "state": own.get("state"),
            "ready": own.get("ready"),
            "depth": own.get("depth"),
        }
    ] + [
        {
            "worker": s.get("worker", k),
            "state": s.get("state"),
            "ready": s.get("ready"),
            "depth": s.get("depth"),
        }
        for k, s in enumerate(others, start=1)
    ]
    for summary in others:
        for key in _SUMMED:
            if isinstance(summary.get(key), int | float):
                merged[key] = merged.get(key, 0) + summary[key]
        for domain, row in summary.get("domains", {}).items():
            target = merged.setdefault("domains", {}).setdefault(
                domain, {"ready": 0, "deferred": 0, "in_flight": 0}
            )
            for column, value in row.items():
                target[column] = target.get(column, 0) + value
        merged["ready"] = bool(merged.get("ready")) and bool(summary.get("ready"))
        merged["recovering"] = bool(merged.get("recovering")) or bool(summary.get("recovering"))
    delivered = merged.get("delivered_last_minute", 0)
    bounced = merged.get("bounced_last_minute", 0)
    merged["bounce_rate"] = round(bounced / (delivered + bounced), 4) if bounced else 0.0
    merged["delivery_rate_per_s"] = round(merged.get("delivery_rate_per_s", 0.0), 3)
    return merged
