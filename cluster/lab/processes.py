"""The lab's processes: started detached inside a namespace, recorded, and ended by pid.

A lab outlives the command that built it (``hamta lab up`` returns, the servers go on), so every
process is started in a session of its own and recorded with its pid and its start time. The
start time (field 22 of /proc/PID/stat, in clock ticks since boot) guards against pid reuse: a
recorded pid whose start time differs is some other process now, and is left alone.

Waiting for a process to end uses a pidfd (Linux 5.3+), which becomes readable when the process
exits, whether or not it is our child: no polling of /proc.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster.lab import netns

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """A process the lab started: what it is, where it runs and how to recognise it."""

    name: str  # e.g. "zk1", "dns", "sink", "agent-node1"
    host: str
    pid: int
    start_time: int  # clock ticks since boot, from /proc/PID/stat
    argv: tuple[str, ...] = ()
    log: str = ""

    def to_json(self) -> dict[str, Any]:
        """The record as plain JSON data."""
        data = asdict(self)
        data["argv"] = list(self.argv)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcessRecord:
        """The record from :meth:`to_json`'s output."""
        return cls(
            name=str(data["name"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            argv=tuple(str(a) for a in data.get("argv", ())),
            log=str(data.get("log", "")),
        )

    def alive(self) -> bool:
        """Whether this very process (same pid, same start time) still runs."""
        return start_time(self.pid) == self.start_time


@dataclass(slots=True)
class Started:
    """A process just started: its record, and the Popen handle that reaps it."""

    record: ProcessRecord
    popen: subprocess.Popen[bytes] = field(repr=False)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The start time of a running process; None if it is gone or has exited (a zombie)."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in {"Z", "X"}:
        return None
    return int(fields[19])  # field 22 of stat; fields here start at field 3 (the state)


def cmdline(pid: int) -> list[str]:
    """The command line of ``pid`` (empty if gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def spawn(
    name: str,
    host: str,
    namespace: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Started:
    """Start ``argv`` inside ``namespace``, detached, with stdout and stderr appended to ``log``.

    The process gets a session of its own so that it survives the command that started it and
    a ^C in the user's terminal reaches only that command.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full = netns.exec_argv(namespace, argv)
    with log.open("ab") as out:
        popen = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    started = start_time(popen.pid)
    if started is None:  # it failed at once (e.g. ip could not enter the namespace)
        popen.wait()
        raise OSError(f"{name} exited at once (status {popen.returncode}); see {log}")
    record = ProcessRecord(name, host, popen.pid, started, tuple(argv), str(log))
    return Started(record, popen)


def wait_gone(pids: Iterable[int], timeout: float, clock: Clock = time.monotonic) -> set[int]:
    """Wait until every process in ``pids`` has exited; return those still running at timeout.

    An exited child of this process stays a zombie until its owner (its Popen) reaps it, and
    keeps its exit status for that owner.
    """
    fds: dict[int, int] = {}
    try:
        for pid in set(pids):
            try:
                fds[os.pidfd_open(pid)] = pid
            except ProcessLookupError:
                continue
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = set(fds)
        deadline = clock() + timeout
        while pending:
            left = deadline - clock()
            if left <= 0:
                break
            for fd, _ in poller.poll(left * 1000):
                poller.unregister(fd)
                pending.discard(fd)
        return {fds[fd] for fd in pending}
    finally:
        for fd in fds:
            os.close(fd)


def send_signal(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each pid, ignoring those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def end(pids: Iterable[int], grace: float, clock: Clock = time.monotonic) -> None:
    """SIGTERM ``pids``, give them ``grace`` seconds to exit, then SIGKILL whoever is left."""
    remaining = set(pids)
    if not remaining:
        return
    send_signal(remaining, signal.SIGTERM)
    send_signal(remaining, signal.SIGCONT)  # a frozen process must run to act on SIGTERM
    remaining = wait_gone(remaining, grace, clock)
    kill(remaining, clock=clock)


def kill(pids: Iterable[int], timeout: float = 10.0, clock: Clock = time.monotonic) -> set[int]:
    """SIGKILL ``pids`` and wait until they are gone; return any that outlived ``timeout``."""
    remaining = set(pids)
    if not remaining:
        return set()
    send_signal(remaining, signal.SIGKILL)
    return wait_gone(remaining, timeout, clock)


def live(records: Iterable[ProcessRecord]) -> list[ProcessRecord]:
    """The records whose process still runs (same pid and start time)."""
    return [record for record in records if record.alive()]
