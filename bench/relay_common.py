"""What the relay benchmarks share: addresses, timeouts, and the small helpers for children.

``bench/relay.py``, ``bench/destination_isolation.py`` and the failover benchmarks use these:
ports, a child's environment without fsync-eaters, durable scratch directories, stopping a
child by its pid, waiting for an SMTP greeting, reading /proc.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

LOCALHOST = "127.0.0.1"
SINK_HOST = "127.0.0.5"
SENDER = "from@bench.test"
RECIPIENT = "to@sink.test"
HELO_NAME = "bench.test"
SINK_BACKLOG = 1000
POLL_SECONDS = 0.01  # completion polling, once submission has finished
SUBMIT_POLL_SECONDS = 0.5  # while smtp-source runs: only to fail fast, so as not to load the relay
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
REPO = Path(__file__).resolve().parent.parent
DEFAULT_HAMTA = REPO / ".venv" / "bin" / "hamta"
VOLATILE_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


class BenchError(Exception):
    """The benchmark could not run or produced an invalid measurement."""


def say(text: str) -> None:
    """Print one human-readable progress line (stdout, flushed)."""
    print(text, flush=True)


# --------------------------------------------------------------------------- small helpers


def postfix_tool(name: str) -> str:
    """The path of one of Postfix's programs (smtp-sink, smtp-source, postfix, ...)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        raise BenchError(f"{name} not found (Debian package postfix provides it)")
    return found


def child_env() -> dict[str, str]:
    """The environment for every child: no preloaded fsync-eaters, sbin on PATH."""
    env = {key: value for key, value in os.environ.items() if key != "LD_PRELOAD"}
    env.pop("MAIL_CONFIG", None)
    env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    return env


def free_ports(host: str, count: int, taken: set[int]) -> list[int]:
    """Ports free on ``host`` now (bound to port 0 and released), distinct from ``taken``."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            ports.append(port)
    return ports


def _filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path``, from /proc/self/mountinfo."""
    target = str(path.resolve())
    best, best_type = "", "unknown"
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4].replace("\\040", " ")
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, best_type = mount_point, right.split()[0]
    return best_type


def _require_durable(path: Path) -> None:
    fstype = _filesystem_type(path)
    if fstype in VOLATILE_FILESYSTEMS:
        raise BenchError(
            f"{path} is on {fstype}, where fsync is a no-op; use --workdir on a real disk"
        )


def vm_kib(pid: int, field: str) -> int | None:
    """A ``VmXXX`` figure (KiB) from /proc/PID/status, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def session_pids(leader: int) -> list[int]:
    """The processes of the session ``leader`` started (start_new_session): hamta's workers."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == leader:  # the session id, after state, ppid and pgrp
            pids.append(int(entry))
    return pids


def session_cpu_seconds(leader: int) -> float:
    """User + system CPU seconds used so far by the live processes of ``leader``'s session."""
    total = 0
    for pid in session_pids(leader):
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def pss_kib(pid: int) -> int | None:
    """Proportional set size (KiB) from /proc/PID/smaps_rollup, or None."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat), against pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 else None


def log_tail(path: Path, limit: int = 2000) -> str:
    """The last ``limit`` bytes of a log, for an error message ("" when unreadable)."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace").strip()


def wait_for_smtp(host: str, port: int, deadline: float, alive: Callable[[], bool]) -> None:
    """Wait until something on host:port sends a 220 greeting."""
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"the server for {host}:{port} exited during start-up")
        try:
            with socket.create_connection((host, port), timeout=2.0) as sock:
                greeting = sock.recv(512)
                if greeting.startswith(b"220"):
                    with contextlib.suppress(OSError):
                        sock.sendall(b"QUIT\r\n")
                        sock.recv(512)
                    return
                last_error = f"greeting {greeting[:60]!r}"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.05)
    raise BenchError(f"no SMTP greeting on {host}:{port}: {last_error}")


def stop_child(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    """Stop a child we started (by its pid, via Popen) and reap it; SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM while cleaning up, so a second Ctrl-C cannot strand processes."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def scratch_directory(workdir: Path | None, prefix: str, keep: bool) -> Iterator[Path]:
    """A fresh directory on a durable filesystem, removed afterwards unless ``keep``."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        base.chmod(0o755)  # Postfix's unprivileged daemons must traverse it.
        _require_durable(base)
        yield base
    finally:
        if keep:
            say(f"  kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str) -> tuple[int, bytes]:
    """GET url directly (never via an http_proxy from the environment): (status, body)."""
    try:
        with _NO_PROXY.open(url, timeout=5.0) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
