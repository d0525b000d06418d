"""The agent's self-fencing watchdog: a small process that fences its own node when the agent hangs.

While the node holds the spool, the virtual IP and a serving relay, the agent *arms* the watchdog
and must *feed* it more often than the armed timeout. A hung agent can still keep its ZooKeeper
session alive (kazoo pings from a thread of its own), so the peer would never take over: when no
feed comes in time, or when the agent dies while the watchdog is armed (its standard input ends),
the watchdog fires. It

1. SIGKILLs the relay's process group,
2. takes the virtual IP off its interface (``ip addr del ADDR/PREFIX dev IFACE``, in its own
   network namespace, which is the agent's), and the addresses of ``also`` (the relay's egress
   addresses, which move with it),
3. SIGKILLs the agent, for a missed feed only (at the end of input the agent is gone already),
4. writes one ``WatchdogFired`` JSON line to standard error saying what it did and why,
5. ends the agent's ZooKeeper session, if the agent handed it one (``fencing.zk_session``) and
   every action above succeeded, so that its ephemeral znodes vanish now rather than at the
   session's expiry and the peer's promotion starts at once, and writes one
   ``WatchdogSessionEnded`` line with the outcome,
6. exits with status 2 (``EXIT_FIRED``).

Disarmed, it waits for nothing; the end of its input while disarmed is a clean stop (status 0).

``python -m fencing.watchdog [--agent-pid PID] [--device /dev/watchdog]`` reads one JSON object
a line on standard input::

    {"cmd": "arm", "timeout": 1.0, "relay_pgid": 1234, "vip": "198.18.0.100/24",
     "interface": "eth0", "also": ["198.18.0.101/32"]}
    {"cmd": "relay", "pgid": 1240}
    {"cmd": "feed"}
    {"cmd": "disarm"}
    {"cmd": "session", "servers": "10.0.0.1:2181,10.0.0.2:2181", "session_id": 72057...,
     "password": "<hex>", "auth": [["digest", "user:password"]]}

An arm replaces every setting (what it leaves out, or sets to null, is not protected), so that a
process group or address from an earlier term is never acted on; arming while armed also counts
as a feed. ``relay`` changes the process group while armed (after a relay restart). ``session``
(armed or not, kept across arms and disarms: it is the agent's, not a term's) replaces the
session to end when firing; its password and credentials are secrets, held in memory only and
never logged, nor is a line that may hold them. A line that
is not a valid command is logged and ignored: garbage never fires the watchdog, but neither does
a malformed ``arm`` arm it (``Watchdog.arm`` checks with the same code before it sends).

A feed is counted when the watchdog reads it. A feed still in the pipe at the deadline is too
late: the watchdog cannot tell a feed written just in time from one written by an agent that
came back from a stall after its session may have expired, and it fires.

With ``--device``, a kernel watchdog device is opened at arm, written a keepalive byte on each
feed, and closed with the magic ``V`` at disarm, so the kernel stops its timer. When the watchdog
fires it leaves the device without the magic close: if the machine can no longer be trusted to
fence itself, the kernel reboots it. A device that cannot be opened is reported in the
``WatchdogArmed`` line and the watchdog goes on without it.

The watchdog imports only the standard library (it starts in a fraction of a second), prints
``ready`` on standard output when it reads commands, and nothing else there. ``Watchdog``, the
asyncio client the agent uses, starts it in a session of its own and without a parent-death
signal, so that neither killing the relay's or the agent's process group nor the agent's death
takes the watchdog with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any, Final, NoReturn

from fencing.zk_session import Closed, ZkSession, close_session, parse_servers

EXIT_FIRED: Final = 2
# Not argparse's 2, which would read as "fired" to whoever checks the status.
EXIT_USAGE: Final = 64
MAX_LINE: Final = 4096
READY: Final = b"ready\n"
KEEPALIVE: Final = b"\0"
MAGIC_CLOSE: Final = b"V"
IP_TIMEOUT: Final = 3.0
#: How long the processes it killed may take to exit before it ends the agent's session.
GONE_LIMIT: Final = 2.0
_IFNAMSIZ: Final = 16  # the kernel's limit on interface names, NUL included
# Where ``ip`` lives when the agent's PATH (a service manager's) lacks the sbin directories.
_IP_FALLBACK: Final = "/usr/sbin:/sbin:/usr/bin:/bin"

Clock = Callable[[], float]


class BadCommandError(ValueError):
    """A command line that is not one of the protocol's commands, or has bad values."""


def _pgid(value: Any, key: str) -> int | None:
    if value is None:
        return None
    # 0 and 1 would make killpg hit the watchdog's own group or init's.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 1:
        raise BadCommandError(f"{key} must be an integer above 1 or null")
    return value


@dataclass(frozen=True)
class Arm:
    """Arm (or re-arm) with these settings; None means that resource is not protected.

    ``vip`` is an address with its prefix length as ``ip`` takes it ("198.18.0.100/24"); it
    needs ``interface``. ``also``: more addresses on that interface that move with the virtual
    IP (the relay's egress addresses, "198.18.0.101/32"), removed with it when firing. Raises
    ``BadCommandError`` for values the watchdog would refuse.
    """

    timeout: float
    relay_pgid: int | None = None
    vip: str | None = None
    interface: str | None = None
    also: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        timeout = self.timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise BadCommandError("timeout must be a positive number of seconds")
        _pgid(self.relay_pgid, "relay_pgid")
        if (self.vip is None) != (self.interface is None):
            raise BadCommandError("vip and interface go together")
        if self.vip is not None:
            if not isinstance(self.vip, str):
                raise BadCommandError("vip must be a string")
            try:
                ipaddress.ip_interface(self.vip)
            except ValueError as exc:
                raise BadCommandError(f"vip: {exc}") from None
        if not isinstance(self.also, list | tuple):
            raise BadCommandError("also must be a list of addresses")
        object.__setattr__(self, "also", tuple(self.also))  # a JSON list arrives
        if self.also and self.interface is None:
            raise BadCommandError("also needs interface")
        for address in self.also:
            if not isinstance(address, str):
                raise BadCommandError("also must be a list of addresses")
            try:
                ipaddress.ip_interface(address)
            except ValueError as exc:
                raise BadCommandError(f"also: {exc}") from None
        interface = self.interface
        if interface is not None and (
            not isinstance(interface, str)
            or not interface
            or len(interface) >= _IFNAMSIZ
            or interface.startswith("-")
            or any(c in interface for c in "/ \t\r\n")
        ):
            raise BadCommandError(f"invalid interface name {interface!r}")


@dataclass(frozen=True)
class Relay:
    """The relay's process group is now ``pgid`` (None: no relay to kill)."""

    pgid: int | None

    def __post_init__(self) -> None:
        _pgid(self.pgid, "pgid")


@dataclass(frozen=True)
class Feed:
    """The agent is alive: the deadline moves one timeout past now."""


@dataclass(frozen=True)
class Disarm:
    """The node holds nothing any more: stop watching."""


Command = Arm | Relay | Feed | Disarm | ZkSession

_FIELDS: Final[dict[str, frozenset[str]]] = {
    "arm": frozenset({"timeout", "relay_pgid", "vip", "interface", "also"}),
    "relay": frozenset({"pgid"}),
    "feed": frozenset(),
    "disarm": frozenset(),
    "session": frozenset({"servers", "session_id", "password", "auth"}),
}


def _session(message: dict[str, Any]) -> ZkSession:
    # Every message below names no value: one could be the password or the credentials.
    missing = sorted({"servers", "session_id", "password"} - set(message))
    if missing:
        raise BadCommandError(f"session: {', '.join(missing)} required")
    password, auth = message["password"], message.get("auth") or []
    try:
        if not isinstance(password, str):
            raise ValueError("password must be a hex string")
        if not isinstance(auth, list) or not all(isinstance(pair, list) for pair in auth):
            raise ValueError("auth must be a list of [scheme, credential] pairs")
        return ZkSession(
            parse_servers(message["servers"]),
            message["session_id"],
            bytes.fromhex(password),
            tuple((pair[0], pair[1]) if len(pair) == 2 else ("", "") for pair in auth),
        )
    except ValueError as exc:
        raise BadCommandError(f"session: {exc}") from None


def parse_command(line: bytes) -> Command:
    """The command on one line of the protocol; ``BadCommandError`` says what is wrong with it."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadCommandError(f"not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise BadCommandError("not a JSON object")
    cmd = message.pop("cmd", None)
    if not isinstance(cmd, str) or cmd not in _FIELDS:
        raise BadCommandError(f"cmd must be one of {', '.join(_FIELDS)}")
    # Refused, not ignored: a misspelt "relay_pid" would leave the relay unprotected.
    unknown = sorted(set(message) - _FIELDS[cmd])
    if unknown:
        raise BadCommandError(f"{cmd}: unknown key(s) {', '.join(unknown)}")
    if cmd == "arm":
        if "timeout" not in message:
            raise BadCommandError("arm: timeout is required")
        return Arm(**message)
    if cmd == "session":
        return _session(message)
    if cmd == "relay":
        if "pgid" not in message:
            raise BadCommandError("relay: pgid is required")
        return Relay(message["pgid"])
    return Feed() if cmd == "feed" else Disarm()


def encode(command: Command) -> bytes:
    """``command`` as one protocol line, newline included."""
    message: dict[str, Any]
    if isinstance(command, Arm):
        message = {
            "cmd": "arm",
            "timeout": command.timeout,
            "relay_pgid": command.relay_pgid,
            "vip": command.vip,
            "interface": command.interface,
            "also": list(command.also),
        }
    elif isinstance(command, Relay):
        message = {"cmd": "relay", "pgid": command.pgid}
    elif isinstance(command, ZkSession):
        message = {
            "cmd": "session",
            "servers": ",".join(
                f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                for host, port in command.servers
            ),
            "session_id": command.session_id,
            "password": command.password.hex(),
            "auth": [list(pair) for pair in command.auth],
        }
    else:
        message = {"cmd": "feed" if isinstance(command, Feed) else "disarm"}
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


# ---------------------------------------------------------------------- the watchdog process


def log(event: str, level: str = "info", **fields: Any) -> None:
    """One JSON line on standard error, in one write; a failing log never stops the watchdog."""
    record = {
        "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "level": level,
        "event": event,
        "component": "watchdog",
        "pid": os.getpid(),
        **fields,
    }
    with contextlib.suppress(OSError):
        os.write(2, json.dumps(record).encode() + b"\n")


class Device:
    """A kernel watchdog device: open while armed, fed a byte a feed, closed with the magic V."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def open(self) -> str | None:
        """Open the device (once) and feed it; the reason when that failed, else None."""
        if self.fd is None:
            try:
                # Non-blocking: a FIFO without a reader fails at once instead of hanging here.
                self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                return f"cannot open {self.path}: {exc.strerror or exc}"
        return self.keepalive()

    def keepalive(self) -> str | None:
        """Write the keepalive byte; the reason when that failed, else None."""
        return self._write(KEEPALIVE)

    def magic_close(self) -> str | None:
        """Write the magic V (the kernel stops its timer) and close the device."""
        if self.fd is None:
            return None
        problem = self._write(MAGIC_CLOSE)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None
        return problem

    def _write(self, data: bytes) -> str | None:
        if self.fd is None:
            return None
        try:
            os.write(self.fd, data)
        except OSError as exc:
            return f"cannot write {self.path}: {exc.strerror or exc}"
        return None


def find_ip() -> str | None:
    """The ``ip`` program, found once at start rather than looked for while fencing."""
    path = os.environ.get("PATH", "")
    return shutil.which("ip", path=f"{path}:{_IP_FALLBACK}" if path else _IP_FALLBACK)


def _action(action: str, target: Any, outcome: str, detail: str = "") -> dict[str, Any]:
    return {"action": action, "target": target, "outcome": outcome, "detail": detail}


def _kill(action: str, target: int | None, kill: Callable[[int, int], None]) -> dict[str, Any]:
    if target is None:
        return _action(action, None, "skipped", "none given")
    if target in (os.getpid(), os.getpgrp()):
        return _action(action, target, "failed", "refused: that is the watchdog itself")
    try:
        kill(target, signal.SIGKILL)
    except ProcessLookupError:
        return _action(action, target, "gone", "no such process")
    except OSError as exc:
        return _action(action, target, "failed", exc.strerror or str(exc))
    return _action(action, target, "killed")


# What ``ip`` says, in its versions and address families, when there is nothing to remove.
_NOT_THERE: Final = ("cannot assign requested address", "address not found", "cannot find device")


def remove_vip(
    ip: str | None, vip: str | None, interface: str | None, action: str = "remove_vip"
) -> dict[str, Any]:
    """Run ``ip addr del vip dev interface``; an address or interface not there is no failure."""
    if vip is None or interface is None:
        return _action(action, None, "skipped", "none given")
    target = f"{vip} dev {interface}"
    if ip is None:
        return _action(action, target, "failed", "ip not found")
    try:
        done = subprocess.run(
            [ip, "addr", "del", vip, "dev", interface],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=IP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return _action(action, target, "failed", f"ip killed after {IP_TIMEOUT:g}s")
    except OSError as exc:
        return _action(action, target, "failed", exc.strerror or str(exc))
    said = " ".join(done.stderr.decode(errors="replace").split())[:300]
    if done.returncode == 0:
        return _action(action, target, "removed")
    if any(words in said.lower() for words in _NOT_THERE):
        return _action(action, target, "absent", said)
    return _action(action, target, "failed", f"ip exit {done.returncode}: {said}")


class Guard:
    """The watchdog's state: armed or not, the deadline, and what to fence when it passes.

    ``handle`` applies commands, ``wait`` says how long input may take, ``fire`` fences. Times
    are monotonic seconds passed in by the caller, so that one reading serves one decision.
    """

    def __init__(self, agent_pid: int, device: Device | None, ip: str | None) -> None:
        self.agent_pid = agent_pid
        self.device = device
        self.ip = ip
        self.armed: Arm | None = None
        self.relay_pgid: int | None = None
        self.session: ZkSession | None = None
        self.deadline = math.inf
        self.last_feed = 0.0

    def handle(self, command: Command, now: float) -> None:
        """Apply ``command`` read at ``now``."""
        if isinstance(command, Arm):
            self._arm(command, now)
        elif isinstance(command, ZkSession):
            self.session = command
            servers = [f"{host}:{port}" for host, port in command.servers]
            schemes = [scheme for scheme, _ in command.auth]
            log("WatchdogSession", session_id=command.label, servers=servers, auth=schemes)
        elif isinstance(command, Relay):
            if self.armed is not None:
                self.relay_pgid = command.pgid
                log("WatchdogRelay", relay_pgid=command.pgid)
        elif isinstance(command, Feed):
            if self.armed is not None:
                self._feed(now)
        elif self.armed is not None:
            self.armed = None
            self.relay_pgid = None
            self.deadline = math.inf
            problem = self.device.magic_close() if self.device is not None else None
            log("WatchdogDisarmed", device_error=problem)

    def _arm(self, command: Arm, now: float) -> None:
        rearmed = self.armed is not None
        self.armed = command
        self.relay_pgid = command.relay_pgid
        self.last_feed = now
        self.deadline = now + command.timeout
        fields: dict[str, Any] = {}
        if self.device is not None:
            fields = {"device": self.device.path, "device_error": self.device.open()}
        if command.vip is not None and self.ip is None:
            fields["vip_error"] = "ip not found: the virtual IP cannot be removed"
        log(
            "WatchdogArmed",
            rearmed=rearmed,
            timeout=command.timeout,
            relay_pgid=command.relay_pgid,
            vip=command.vip,
            interface=command.interface,
            agent_pid=self.agent_pid,
            **fields,
        )

    def _feed(self, now: float) -> None:
        assert self.armed is not None
        self.last_feed = now
        self.deadline = now + self.armed.timeout
        if self.device is not None:
            problem = self.device.keepalive()
            if problem is not None:
                log("WatchdogDeviceError", level="warning", device=self.device.path, error=problem)

    def wait(self, now: float) -> float | None:
        """Seconds until the deadline (None: disarmed, wait for ever)."""
        return None if self.armed is None else max(0.0, self.deadline - now)

    def due(self, now: float) -> bool:
        """Armed and past the deadline."""
        return self.armed is not None and now >= self.deadline

    def fire(self, reason: str, now: float) -> dict[str, Any]:
        """Fence: kill the relay's group, drop the virtual IP, kill a hung agent; the record.

        The device, if any, stays open without the magic close, so the kernel goes on counting.
        """
        armed = self.armed
        assert armed is not None
        actions = [
            _kill("kill_relay", self.relay_pgid, os.killpg),
            remove_vip(self.ip, armed.vip, armed.interface),
            *(remove_vip(self.ip, a, armed.interface, "remove_egress") for a in armed.also),
        ]
        if reason == "missed_feed":
            actions.append(_kill("kill_agent", self.agent_pid, os.kill))
        else:
            actions.append(_action("kill_agent", self.agent_pid, "skipped", "agent gone"))
        record = {
            "reason": reason,
            "timeout": armed.timeout,
            "late_by": round(now - self.deadline, 3) if reason == "missed_feed" else None,
            "since_feed": round(now - self.last_feed, 3),
            "relay_pgid": self.relay_pgid,
            "vip": armed.vip,
            "interface": armed.interface,
            "also": list(armed.also),
            "agent_pid": self.agent_pid,
            "device": self.device.path if self.device is not None else None,
            "actions": actions,
        }
        log("WatchdogFired", level="error", **record)
        if self.session is not None:
            record["session"] = self._end_session(self.session, actions)
        return record

    def _end_session(self, session: ZkSession, actions: list[dict[str, Any]]) -> dict[str, Any]:
        """End the agent's session, once the relay and the VIP are surely gone; the record.

        The peer may take over as soon as the session ends (docs/fencing.md, "Ending the dead
        agent's session"): a SIGKILLed process may still be exiting (an fsync under way, its
        mounts still held), so the agent and the relay's group are waited for first. Should an
        action have failed, or a process outlive ``GONE_LIMIT``, the session is left to expire,
        as without a watchdog.
        """
        failed = [action["action"] for action in actions if action["outcome"] == "failed"]
        if failed:
            closed = Closed("skipped", None, f"{', '.join(failed)} failed: left to expire", 0.0)
        else:
            started = time.monotonic()
            left = _still_running(self.agent_pid, self.relay_pgid)
            while left and time.monotonic() - started < GONE_LIMIT:
                time.sleep(0.005)  # a SIGKILLed process is gone within milliseconds; no event
                left = _still_running(self.agent_pid, self.relay_pgid)
            if left:
                detail = f"processes {left} still running after {GONE_LIMIT:g}s: left to expire"
                closed = Closed("skipped", None, detail, round(time.monotonic() - started, 3))
            else:
                closed = close_session(session)
        ended = _session_record(session, closed)
        level = "info" if closed.outcome in ("closed", "not_open") else "error"
        log("WatchdogSessionEnded", level=level, **ended)
        return ended


def _still_running(agent_pid: int, relay_pgid: int | None) -> list[int]:
    """The agent, if alive, and the relay group's live processes (a zombie has let go of its
    files and mounts: it counts as gone)."""
    running = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid != agent_pid and relay_pgid is None:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        state, pgrp = fields[0], int(fields[2])
        if state != b"Z" and (pid == agent_pid or pgrp == relay_pgid):
            running.append(pid)
    return running


def _session_record(session: ZkSession, closed: Closed) -> dict[str, Any]:
    return {
        "session_id": session.label,
        "outcome": closed.outcome,
        "server": closed.server,
        "detail": closed.detail,
        "seconds": closed.seconds,
    }


class _Lines:
    """Splits input into lines, dropping (and reporting) any line longer than ``MAX_LINE``."""

    def __init__(self) -> None:
        self.buffer = b""
        self.skipping = False

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        if self.skipping and lines:
            lines = lines[1:]  # the tail of the overlong line
            self.skipping = False
        if len(self.buffer) > MAX_LINE:
            self.buffer = b""
            if not self.skipping:
                log("WatchdogBadCommand", level="warning", error=f"line over {MAX_LINE} bytes")
            self.skipping = True
        return lines


def serve(guard: Guard, stdin: int = 0, clock: Clock = time.monotonic) -> int:
    """Read commands from ``stdin`` until the end (status 0) or the watchdog fires (2)."""
    poller = select.poll()
    poller.register(stdin, select.POLLIN)
    lines = _Lines()
    while True:
        wait = guard.wait(clock())
        # Rounded up: waking a millisecond early would only cost another round.
        events = poller.poll(None if wait is None else math.ceil(wait * 1000))
        now = clock()
        chunk: bytes | None = None
        if events:
            try:
                chunk = os.read(stdin, 65536)
            except OSError as exc:
                log("WatchdogInputError", level="error", error=exc.strerror or str(exc))
                chunk = b""
        if guard.due(now):
            guard.fire("stdin_eof" if chunk == b"" else "missed_feed", now)
            return EXIT_FIRED
        if chunk is None:
            continue
        if chunk == b"":
            if guard.armed is not None:
                guard.fire("stdin_eof", now)
                return EXIT_FIRED
            log("WatchdogStopped", reason="stdin_eof")
            return 0
        for line in lines.feed(chunk):
            if not line.strip():
                continue
            if len(line) > MAX_LINE:
                log("WatchdogBadCommand", level="warning", error=f"line over {MAX_LINE} bytes")
                continue
            try:
                command = parse_command(line)
            except BadCommandError as exc:
                log("WatchdogBadCommand", level="warning", error=str(exc), line=_show(line))
                continue
            guard.handle(command, now)


def _show(line: bytes) -> str:
    if b"session" in line or b"password" in line or b"auth" in line:
        return "(withheld: it may hold the session's password or credentials)"
    return line[:200].decode(errors="replace")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fencing.watchdog``: the exit status (0 stopped, 2 fired, 64 usage)."""
    parser = _Parser(
        prog="python -m fencing.watchdog",
        description="The agent's self-fencing watchdog; commands come on standard input.",
    )
    parser.add_argument("--agent-pid", type=int, help="the agent to kill (default: parent)")
    parser.add_argument("--device", help="a kernel watchdog device, e.g. /dev/watchdog")
    args = parser.parse_args(argv)
    agent_pid: int = args.agent_pid if args.agent_pid is not None else os.getppid()
    if agent_pid <= 1 or agent_pid == os.getpid():
        parser.error(f"--agent-pid {agent_pid}: not an agent's pid")
    device = Device(args.device) if args.device else None
    guard = Guard(agent_pid, device, find_ip())
    log("WatchdogStarted", agent_pid=agent_pid, device=args.device, ip=guard.ip)
    with contextlib.suppress(OSError):
        os.write(1, READY)
    return serve(guard)


# ---------------------------------------------------------------------- the agent's client


class WatchdogError(Exception):
    """The watchdog could not be started, or is no longer there to take a command."""


class Watchdog:
    """The agent's handle on its watchdog process.

    ``arm``, ``relay``, ``feed`` and ``disarm`` write one line to the watchdog's pipe and return
    at once (asyncio buffers what the pipe does not take). They raise ``WatchdogError`` when the
    watchdog has exited or its pipe is closed, since the node is then unprotected, and
    ``BadCommandError`` (a ``ValueError``) for settings the watchdog would refuse.
    """

    def __init__(self) -> None:
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        """The watchdog's pid once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """Its exit status once it exited: 0 stopped, 2 fired (``EXIT_FIRED``)."""
        return self._process.returncode if self._process is not None else None

    async def start(
        self,
        python: str = sys.executable,
        agent_pid: int | None = None,
        device: str | None = None,
        *,
        stderr: int | IO[Any] | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Start the watchdog and wait until it reads commands.

        ``agent_pid`` (default: this process) is killed when a feed is missed; ``stderr``
        receives its JSON lines (default: this process's standard error).
        """
        if self._process is not None:
            raise WatchdogError("watchdog already started")
        argv = [python, "-m", "fencing.watchdog", "--agent-pid", str(agent_pid or os.getpid())]
        if device is not None:
            argv += ["--device", device]
        try:
            # A session of its own and no parent-death signal: it must outlive the agent's
            # death and its process group, which is when it is needed.
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
            )
        except OSError as exc:
            raise WatchdogError(f"cannot start the watchdog: {exc.strerror or exc}") from None
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), timeout)
        except TimeoutError:
            line = b""
        if line != READY:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            status = await process.wait()
            raise WatchdogError(f"the watchdog did not start (status {status})")
        self._process = process

    def arm(
        self,
        timeout: float,
        relay_pgid: int | None = None,
        vip: str | None = None,
        interface: str | None = None,
        also: Sequence[str] = (),
    ) -> None:
        """Arm, replacing every setting; feeds must then come within ``timeout`` seconds."""
        self._send(Arm(timeout, relay_pgid, vip, interface, tuple(also)))

    def relay(self, pgid: int | None) -> None:
        """The relay's process group changed (a restart), or is gone (None)."""
        self._send(Relay(pgid))

    def feed(self) -> None:
        """Tell the watchdog the agent is alive.

        A feed while earlier lines still wait for the pipe adds nothing: the watchdog reads them
        all at once, and one feed read is as good as several.
        """
        stdin = self._stdin()
        if stdin.transport.get_write_buffer_size() == 0:
            self._send(Feed())

    def disarm(self) -> None:
        """Stop watching: missed feeds and the end of input no longer fire."""
        self._send(Disarm())

    def session(self, session: ZkSession) -> None:
        """The agent's ZooKeeper session (a new one after an expiry): ended when it fires."""
        self._send(session)

    async def wait(self) -> int:
        """Wait for the watchdog to exit; its status."""
        if self._process is None:
            raise WatchdogError("watchdog not started")
        return await self._process.wait()

    async def close(self, timeout: float = 5.0) -> int | None:
        """Disarm, end its input and wait for it to exit (killed after ``timeout``); its status."""
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            with contextlib.suppress(WatchdogError):
                self.disarm()
        stdin = process.stdin
        assert stdin is not None
        stdin.close()  # flushes the disarm first
        with contextlib.suppress(OSError):
            await stdin.wait_closed()
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        return process.returncode

    def _stdin(self) -> asyncio.StreamWriter:
        process = self._process
        if process is None:
            raise WatchdogError("watchdog not started")
        if process.returncode is not None:
            raise WatchdogError(f"the watchdog exited with status {process.returncode}")
        assert process.stdin is not None
        if process.stdin.is_closing():
            raise WatchdogError("the watchdog's pipe is closed")
        return process.stdin

    def _send(self, command: Command) -> None:
        stdin = self._stdin()
        stdin.write(encode(command))
        if stdin.is_closing():  # the write found the pipe broken
            raise WatchdogError("the watchdog's pipe is broken")


if __name__ == "__main__":
    sys.exit(main())
