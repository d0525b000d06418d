"""STONITH agents: each one powers off, destroys or isolates one node, given its name.

An agent answers with a ``FenceResult`` and never raises for a fence that did not work: the
chain (``fencing.chain``) tries the next agent and keeps every attempt for the decision log.
Secrets (BMC passwords) are read from files at fence time, travel on standard input or in the
environment, never on a command line (``/proc/<pid>/cmdline`` is world-readable), and are cut
out of any output an agent reports.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from fencing.outcome import FenceResult, Outcome
from fencing.process import Completed, ProgramMissingError, run

Clock = Callable[[], float]


class FenceAgent(Protocol):
    """Fences one node: power it off, destroy its VM or stop everything it serves."""

    name: str

    async def fence(self, node: str, epoch: int, timeout: float) -> FenceResult:
        """Fence ``node`` for the takeover of term ``epoch`` within ``timeout`` seconds."""
        ...


def fill(template: str, node: str, epoch: int) -> str:
    """``template`` with ``{node}`` and ``{epoch}`` replaced; other braces are left alone.

    Plain replacement, not ``str.format``, so that a literal brace in an option stays valid.
    """
    return template.replace("{node}", node).replace("{epoch}", str(epoch))


def read_secret(path: Path) -> str:
    """The secret in ``path`` without its trailing newline; ``OSError`` names only the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OSError(f"cannot read {path}: {exc.strerror}") from None
    return text.rstrip("\r\n")


class _Timer:
    """Measures one attempt and turns outcomes into results carrying its duration."""

    def __init__(self, agent: str, clock: Clock) -> None:
        self.agent = agent
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def result(self, outcome: Outcome, detail: str) -> FenceResult:
        return FenceResult(self.agent, outcome, self.elapsed(), detail)


async def _run_for_verdict(
    name: str,
    argv: Sequence[str],
    timeout: float,
    clock: Clock,
    *,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    secrets: Sequence[str] = (),
    also_fenced: Callable[[Completed], bool] = lambda _: False,
) -> FenceResult:
    """Run ``argv``: exit 0 (or ``also_fenced``) is FENCED, the limit is TIMEOUT, else FAILED."""
    timer = _Timer(name, clock)
    try:
        completed = await run(argv, timeout=timeout, stdin=stdin, env=env)
    except ProgramMissingError as exc:
        return timer.result(Outcome.FAILED, str(exc))
    if completed.timed_out:
        return timer.result(Outcome.TIMEOUT, f"{argv[0]} killed after {timeout:.3g}s")
    if completed.returncode == 0:
        return timer.result(Outcome.FENCED, f"{argv[0]}: {completed.last_words(secrets)}")
    if also_fenced(completed):
        return timer.result(Outcome.FENCED, f"{argv[0]}: {completed.last_words(secrets)}")
    return timer.result(
        Outcome.FAILED,
        f"{argv[0]} exit {completed.returncode}: {completed.last_words(secrets)}",
    )


class CommandAgent:
    """Any agent of the fence-agents project (``fence_ipmilan``, ``fence_virsh``, ...).

    It runs ``argv`` and writes the fence-agents standard input protocol: ``action=off``,
    ``plug=<node>`` and the configured options, one ``key=value`` per line, then closes standard
    input; exit 0 means fenced. ``{node}`` and ``{epoch}`` are filled into ``argv`` and every
    option value. The option ``password_file`` is read at fence time and sent as ``password``.
    Fence agents that take no plug log and ignore it; set ``plug`` to direct it elsewhere.
    """

    def __init__(
        self,
        argv: Sequence[str],
        options: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if not argv:
            raise ValueError("a fence command needs a program")
        self.argv = list(argv)
        self.options = {"action": "off", "plug": "{node}", **(options or {})}
        self.name = name or os.path.basename(self.argv[0])
        self.clock = clock

    def stdin_lines(self, node: str, epoch: int) -> tuple[list[str], list[str]]:
        """The ``key=value`` lines for ``node`` and the secrets among them (to redact output).

        Raises ``OSError`` when the password file cannot be read and ``ValueError`` when a
        value would break the line protocol.
        """
        lines: list[str] = []
        secrets: list[str] = []
        for option, template in self.options.items():
            key, value = option, fill(template, node, epoch)
            if option == "password_file":
                key, value = "password", read_secret(Path(value))
                secrets.append(value)
            if "\n" in value or "\r" in value:
                raise ValueError(f"option {key} would span lines")
            lines.append(f"{key}={value}")
        return lines, secrets

    async def fence(self, node: str, epoch: int, timeout: float) -> FenceResult:
        """Run the fence agent for ``node``; exit 0 within ``timeout`` counts as fenced."""
        timer = _Timer(self.name, self.clock)
        try:
            lines, secrets = self.stdin_lines(node, epoch)
        except (OSError, ValueError) as exc:
            return timer.result(Outcome.FAILED, str(exc))
        argv = [fill(arg, node, epoch) for arg in self.argv]
        return await _run_for_verdict(
            self.name,
            argv,
            timeout,
            self.clock,
            stdin="".join(f"{line}\n" for line in lines).encode(),
            secrets=secrets,
        )


_POWER_OFF = re.compile(r"\bpower is off\b", re.IGNORECASE)


class IpmiAgent:
    """``ipmitool -I lanplus -H <host> -U <user> -E chassis power off``, then waits for "off".

    The password travels in ``IPMI_PASSWORD`` (``-E``). The BMC acknowledges "power off" before
    the machine is off, so the node counts as fenced only once ``chassis power status`` says
    off; it is asked every ``poll_interval`` seconds until ``timeout``.
    """

    def __init__(
        self,
        host: str,
        username: str,
        password_file: Path,
        *,
        interface: str = "lanplus",
        poll_interval: float = 1.0,
        name: str = "ipmi",
        clock: Clock = time.monotonic,
    ) -> None:
        self.host = host
        self.username = username
        self.password_file = password_file
        self.interface = interface
        self.poll_interval = poll_interval
        self.name = name
        self.clock = clock

    def argv(self, node: str, *command: str) -> list[str]:
        """The ``ipmitool`` command line for ``node`` (no secret on it)."""
        host = fill(self.host, node, 0)
        return ["ipmitool", "-I", self.interface, "-H", host, "-U", self.username, "-E", *command]

    async def fence(self, node: str, epoch: int, timeout: float) -> FenceResult:
        """Power ``node`` off and wait until its BMC reports the power off."""
        timer = _Timer(self.name, self.clock)
        try:
            password = read_secret(self.password_file)
        except OSError as exc:
            return timer.result(Outcome.FAILED, str(exc))
        env = {**os.environ, "IPMI_PASSWORD": password}
        secrets = [password]
        try:
            done = await run(self.argv(node, "chassis", "power", "off"), timeout=timeout, env=env)
        except ProgramMissingError as exc:
            return timer.result(Outcome.FAILED, str(exc))
        if done.timed_out:
            return timer.result(Outcome.TIMEOUT, f"power off: no answer within {timeout:.3g}s")
        if done.returncode != 0:
            words = done.last_words(secrets)
            return timer.result(Outcome.FAILED, f"power off exit {done.returncode}: {words}")
        last = "no answer"
        while (left := timeout - timer.elapsed()) > 0:
            status = await run(self.argv(node, "chassis", "power", "status"), timeout=left, env=env)
            if status.timed_out:
                break
            if status.returncode == 0 and _POWER_OFF.search(status.stdout):
                host = fill(self.host, node, epoch)
                return timer.result(Outcome.FENCED, f"{node} power is off (BMC {host})")
            last = status.last_words(secrets)
            if timeout - timer.elapsed() <= self.poll_interval:
                break
            # A BMC sends no event when the power drops: asking again is the only way.
            await asyncio.sleep(self.poll_interval)
        return timer.result(
            Outcome.TIMEOUT, f"power status not off within {timeout:.3g}s (last: {last})"
        )


# Kill first (no graceful demotion: the takeover is already under way), then make sure that
# neither the relay runs nor the address is held; the exit status is that of the last check.
_SSH_DEFAULT = (
    "systemctl kill --signal=SIGKILL hamta-agent.service hamta-relay.service; "
    "ip address del {vip} dev {interface} 2>/dev/null; "
    "! systemctl is-active --quiet hamta-relay.service && "
    "! ip -o address show dev {interface} to {address} | grep -q ."
)


class SshAgent:
    """``ssh -o BatchMode=yes -o ConnectTimeout=N <user>@<host> <command>``; exit 0 = fenced.

    The default remote command SIGKILLs the agent and the relay and drops the virtual IP. A
    node that is down or cut off cannot be reached, so this agent only fences a node that is
    alive but misbehaving: put a power agent after it.
    """

    def __init__(
        self,
        *,
        host: str = "{node}",
        user: str = "root",
        command: str | None = None,
        vip: str | None = None,
        interface: str = "eth0",
        connect_timeout: int = 5,
        identity_file: Path | None = None,
        name: str = "ssh",
        clock: Clock = time.monotonic,
    ) -> None:
        if command is None:
            if vip is None:
                raise ValueError("the default remote command needs the virtual IP")
            command = default_ssh_command(vip, interface)
        self.host = host
        self.user = user
        self.command = command
        self.connect_timeout = connect_timeout
        self.identity_file = identity_file
        self.name = name
        self.clock = clock

    def argv(self, node: str, epoch: int) -> list[str]:
        """The ``ssh`` command line that fences ``node``."""
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}"]
        if self.identity_file is not None:
            argv += ["-i", str(self.identity_file)]
        host = fill(self.host, node, epoch)
        return [*argv, f"{self.user}@{host}", fill(self.command, node, epoch)]

    async def fence(self, node: str, epoch: int, timeout: float) -> FenceResult:
        """Run the remote command on ``node``; exit 0 within ``timeout`` counts as fenced."""
        return await _run_for_verdict(self.name, self.argv(node, epoch), timeout, self.clock)


def default_ssh_command(vip: str, interface: str) -> str:
    """The remote shell command that stops the agent and relay and drops ``vip``."""
    address = vip.split("/", 1)[0]
    return (
        _SSH_DEFAULT.replace("{vip}", shlex.quote(vip))
        .replace("{interface}", shlex.quote(interface))
        .replace("{address}", shlex.quote(address))
    )


_NOT_RUNNING = re.compile(r"domain is not running", re.IGNORECASE)


class LibvirtAgent:
    """``virsh -c <uri> destroy <domain>``; a domain that is not running is fenced already."""

    def __init__(
        self,
        *,
        uri: str = "qemu:///system",
        domain: str = "{node}",
        name: str = "libvirt",
        clock: Clock = time.monotonic,
    ) -> None:
        self.uri = uri
        self.domain = domain
        self.name = name
        self.clock = clock

    def argv(self, node: str, epoch: int) -> list[str]:
        """The ``virsh`` command line that destroys ``node``'s domain."""
        return ["virsh", "-c", self.uri, "destroy", fill(self.domain, node, epoch)]

    async def fence(self, node: str, epoch: int, timeout: float) -> FenceResult:
        """Destroy ``node``'s domain (a hard power-off of the VM)."""
        return await _run_for_verdict(
            self.name,
            self.argv(node, epoch),
            timeout,
            self.clock,
            also_fenced=lambda done: bool(_NOT_RUNNING.search(done.stderr + done.stdout)),
        )


class LabAgent:
    """The lab's fence: ``python -m cluster.lab.fence --namespace <prefix>-<node> --vip <vip>``.

    Run as a program rather than imported, so that this package never imports ``cluster``.
    """

    def __init__(
        self,
        vip: str,
        *,
        prefix: str = "hamta",
        interface: str = "eth0",
        python: str = sys.executable,
        name: str = "lab",
        clock: Clock = time.monotonic,
    ) -> None:
        self.vip = vip
        self.prefix = prefix
        self.interface = interface
        self.python = python
        self.name = name
        self.clock = clock

    def argv(self, node: str) -> list[str]:
        """The lab fence's command line for ``node``."""
        return [
            self.python,
            "-m",
            "cluster.lab.fence",
            "--namespace",
            f"{self.prefix}-{node}",
            "--vip",
            self.vip,
            "--interface",
            self.interface,
        ]

    async def fence(self, node: str, epoch: int, timeout: float) -> FenceResult:
        """Kill ``node``'s relays and take the virtual IP off it."""
        return await _run_for_verdict(self.name, self.argv(node), timeout, self.clock)
