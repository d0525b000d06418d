"""The fencing package against real programs: fence-agent-like scripts and fake vendor tools;
and the agent's plain fence commands (``cluster.fencers``), which run through the same runner.

The fake ``ipmitool``, ``ssh`` and ``virsh`` are executables placed first on ``PATH``; they
record their argv and environment and answer like the real tools. No root, no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.fencers import CommandFencer, FenceFailedError
from fencing import (
    CommandAgent,
    FenceAgent,
    FenceChain,
    FenceError,
    FenceResult,
    FencingConfigError,
    IpmiAgent,
    LabAgent,
    LibvirtAgent,
    Outcome,
    SshAgent,
    agents_from_config,
)

PASSWORD = "s3cret-Pa55"

# A fence-agents style program: reads key=value lines on stdin, records them with its argv and
# pid, then behaves as the "mode" option says.
FENCE_AGENT = """
import json, os, subprocess, sys, time
options = dict(line.rstrip("\\n").split("=", 1) for line in sys.stdin if "=" in line)
record = {"argv": sys.argv, "options": options, "pid": os.getpid(),
          "cmdline": open("/proc/self/cmdline").read().split("\\0")}
mode = options.get("mode", "ok")
if mode == "hang":
    child = subprocess.Popen(["sleep", "30"])
    record["child"] = child.pid
with open(sys.argv[1], "a") as log:
    log.write(json.dumps(record) + "\\n")
if mode == "ok":
    print("Success: Powered OFF")
    sys.exit(0)
if mode == "fail":
    print("Connecting to BMC", file=sys.stderr)
    print("Failed: Unable to obtain correct plug status or plug is not available", file=sys.stderr)
    sys.exit(1)
time.sleep(30)
"""

# The fake vendor tools: each records its argv and the password variable, then answers by mode.
FAKE_TOOL = """
import json, os, sys, time
name = os.path.basename(sys.argv[0])
log = os.environ["FAKE_LOG"]
with open(log, "a") as handle:
    handle.write(json.dumps({"tool": name, "argv": sys.argv[1:],
                             "password": os.environ.get("IPMI_PASSWORD")}) + "\\n")
mode = os.environ.get("FAKE_MODE", "ok")
args = " ".join(sys.argv[1:])
if mode == "hang":
    time.sleep(30)
if name == "ipmitool":
    if mode == "refused":
        print("Error: Unable to establish IPMI v2 / RMCP+ session", file=sys.stderr)
        sys.exit(1)
    if args.endswith("chassis power off"):
        print("Chassis Power Control: Down/Off")
        sys.exit(0)
    if args.endswith("chassis power status"):
        polls = sum(1 for line in open(log) if "status" in line)
        off = mode == "ok" or (mode == "slow" and polls >= 3)
        print("Chassis Power is " + ("off" if off else "on"))
        sys.exit(0)
if name == "ssh":
    if mode == "ok":
        sys.exit(0)
    print("ssh: connect to host node2 port 22: Connection refused", file=sys.stderr)
    sys.exit(255)
if name == "virsh":
    if mode == "ok":
        print("Domain 'node2' destroyed")
        sys.exit(0)
    if mode == "notrunning":
        print("error: Failed to destroy domain 'node2'", file=sys.stderr)
        print("error: Requested operation is not valid: domain is not running", file=sys.stderr)
        sys.exit(1)
    print("error: failed to get domain 'node2'", file=sys.stderr)
    sys.exit(1)
sys.exit(3)
"""


def _script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _ends(pid: int, within: float = 5.0) -> bool:
    """Whether ``pid`` is dead (or a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _fence(agent: FenceAgent, timeout: float = 5.0, node: str = "node2") -> FenceResult:
    return asyncio.run(agent.fence(node, 7, timeout))


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "bmc.pw"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def fence_agent(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """The fence-agent-like script and the file it records to; kills what a test left running."""
    log = tmp_path / "agent.log"
    yield _script(tmp_path / "fence_fake", FENCE_AGENT), log
    for record in _records(log):
        for pid in (record["pid"], record.get("child")):
            if pid and _alive(pid):
                os.kill(pid, 9)


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake ipmitool, ssh and virsh first on PATH; returns the log they write to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("ipmitool", "ssh", "virsh"):
        _script(bin_dir / name, FAKE_TOOL)
    log = tmp_path / "tools.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_MODE", "ok")
    return log


# --- CommandAgent: the fence-agents stdin protocol ---


def test_command_agent_speaks_the_stdin_protocol(
    fence_agent: tuple[Path, Path], password_file: Path
) -> None:
    script, log = fence_agent
    agent = CommandAgent(
        [str(script), str(log), "--epoch={epoch}"],
        {"ip": "bmc-{node}", "username": "admin", "password_file": str(password_file)},
    )
    result = _fence(agent)
    assert result.outcome is Outcome.FENCED, result
    assert result.agent == "fence_fake"
    assert "Powered OFF" in result.detail
    [record] = _records(log)
    assert record["options"] == {
        "action": "off",
        "plug": "node2",
        "ip": "bmc-node2",
        "username": "admin",
        "password": PASSWORD,
    }
    assert record["argv"][1:] == [str(log), "--epoch=7"]
    assert not any(PASSWORD in arg for arg in record["cmdline"])
    assert PASSWORD not in result.detail


def test_command_agent_failure_reports_stderr(fence_agent: tuple[Path, Path]) -> None:
    script, log = fence_agent
    result = _fence(CommandAgent([str(script), str(log)], {"mode": "fail"}))
    assert result.outcome is Outcome.FAILED
    assert "exit 1" in result.detail
    assert "Unable to obtain correct plug status" in result.detail


def test_command_agent_never_shows_the_password(tmp_path: Path, password_file: Path) -> None:
    script = _script(
        tmp_path / "fence_echo",
        "import sys\nfor line in sys.stdin: print(line.strip(), file=sys.stderr)\nsys.exit(1)",
    )
    result = _fence(CommandAgent([str(script)], {"password_file": str(password_file)}))
    assert result.outcome is Outcome.FAILED
    assert result.detail.endswith("password=***"), result.detail


def test_command_agent_timeout_kills_the_program_and_its_children(
    fence_agent: tuple[Path, Path],
) -> None:
    script, log = fence_agent
    start = time.monotonic()
    result = _fence(CommandAgent([str(script), str(log)], {"mode": "hang"}), timeout=0.8)
    assert result.outcome is Outcome.TIMEOUT
    assert time.monotonic() - start < 3
    [record] = _records(log)
    # Killed with its group; the kernel may take a moment to end a child that was asleep.
    assert _ends(record["pid"]) and _ends(record["child"])


def test_command_agent_unreadable_password_file(fence_agent: tuple[Path, Path]) -> None:
    script, log = fence_agent
    result = _fence(CommandAgent([str(script), str(log)], {"password_file": "/nonexistent/pw"}))
    assert result.outcome is Outcome.FAILED
    assert "/nonexistent/pw" in result.detail
    assert _records(log) == []


def test_missing_program_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = _fence(CommandAgent(["fence_ipmilan"]))
    assert (result.outcome, result.detail) == (Outcome.FAILED, "fence_ipmilan not installed")
    password = tmp_path / "pw"
    password.write_text("x")
    cases: list[tuple[FenceAgent, str]] = [
        (IpmiAgent("bmc-{node}", "admin", password), "ipmitool"),
        (SshAgent(vip="198.18.0.100/24"), "ssh"),
        (LibvirtAgent(), "virsh"),
    ]
    for agent, program in cases:
        result = _fence(agent)
        assert (result.outcome, result.detail) == (Outcome.FAILED, f"{program} not installed")


# --- IpmiAgent ---


def test_ipmi_powers_off_with_the_password_in_the_environment(
    tools: Path, password_file: Path
) -> None:
    agent = IpmiAgent("bmc-{node}", "admin", password_file, poll_interval=0.05)
    result = _fence(agent)
    assert result.outcome is Outcome.FENCED, result
    calls = _records(tools)
    base = ["-I", "lanplus", "-H", "bmc-node2", "-U", "admin", "-E", "chassis", "power"]
    assert [c["argv"] for c in calls] == [[*base, "off"], [*base, "status"]]
    assert all(c["password"] == PASSWORD for c in calls)
    assert not any(PASSWORD in " ".join(c["argv"]) for c in calls)


def test_ipmi_polls_until_the_power_is_off(
    tools: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODE", "slow")
    result = _fence(IpmiAgent("bmc-{node}", "admin", password_file, poll_interval=0.05))
    assert result.outcome is Outcome.FENCED, result
    assert [c["argv"][-1] for c in _records(tools)] == ["off", "status", "status", "status"]


def test_ipmi_power_that_stays_on_times_out(
    tools: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODE", "stays_on")
    start = time.monotonic()
    result = _fence(IpmiAgent("bmc-{node}", "admin", password_file, poll_interval=0.1), 1.0)
    assert result.outcome is Outcome.TIMEOUT
    assert "Chassis Power is on" in result.detail
    assert time.monotonic() - start < 2.5
    assert len(_records(tools)) >= 3


def test_ipmi_refused_fails(
    tools: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODE", "refused")
    result = _fence(IpmiAgent("bmc-{node}", "admin", password_file))
    assert result.outcome is Outcome.FAILED
    assert "RMCP+ session" in result.detail
    assert len(_records(tools)) == 1


def test_ipmi_hanging_bmc_times_out(
    tools: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MODE", "hang")
    result = _fence(IpmiAgent("bmc-{node}", "admin", password_file), timeout=0.5)
    assert result.outcome is Outcome.TIMEOUT


# --- SshAgent ---


def test_ssh_runs_the_remote_command(tools: Path) -> None:
    agent = SshAgent(vip="198.18.0.100/24", connect_timeout=3)
    result = _fence(agent)
    assert result.outcome is Outcome.FENCED, result
    [call] = _records(tools)
    assert call["argv"][:5] == ["-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "root@node2"]
    remote = call["argv"][5]
    assert "hamta-relay.service" in remote
    assert "ip address del 198.18.0.100/24 dev eth0" in remote
    assert len(call["argv"]) == 6


def test_ssh_custom_command_and_failure(tools: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = SshAgent(host="{node}.mgmt", user="fence", command="poweroff -f # {epoch}")
    monkeypatch.setenv("FAKE_MODE", "fail")
    result = _fence(agent)
    assert result.outcome is Outcome.FAILED
    assert "exit 255" in result.detail and "Connection refused" in result.detail
    [call] = _records(tools)
    assert call["argv"][-2:] == ["fence@node2.mgmt", "poweroff -f # 7"]


# --- LibvirtAgent ---


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [("ok", Outcome.FENCED), ("notrunning", Outcome.FENCED), ("fail", Outcome.FAILED)],
)
def test_libvirt_destroy(
    tools: Path, monkeypatch: pytest.MonkeyPatch, mode: str, outcome: Outcome
) -> None:
    monkeypatch.setenv("FAKE_MODE", mode)
    result = _fence(LibvirtAgent(uri="qemu+ssh://host/system", domain="hamta-{node}"))
    assert result.outcome is outcome, result
    [call] = _records(tools)
    assert call["argv"] == ["-c", "qemu+ssh://host/system", "destroy", "hamta-node2"]


# --- LabAgent ---


def test_lab_agent_runs_the_lab_fence() -> None:
    agent = LabAgent("198.18.0.100/24", prefix="hamta-test-nonexistent")
    assert agent.argv("node2")[1:] == [
        "-m",
        "cluster.lab.fence",
        "--namespace",
        "hamta-test-nonexistent-node2",
        "--vip",
        "198.18.0.100/24",
        "--interface",
        "eth0",
    ]
    result = _fence(agent)  # the real module, refusing a namespace that does not exist
    assert result.outcome is Outcome.FAILED
    assert "no network namespace hamta-test-nonexistent-node2" in result.detail


# --- FenceChain ---


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ScriptedAgent:
    """A real FenceAgent that spends clock time and answers as told, recording its budgets."""

    def __init__(self, name: str, outcome: Outcome, spends: float, clock: ManualClock) -> None:
        self.name = name
        self.outcome = outcome
        self.spends = spends
        self.clock = clock
        self.budgets: list[float] = []

    async def fence(self, node: str, epoch: int, timeout: float) -> FenceResult:
        self.budgets.append(timeout)
        self.clock.now += self.spends
        return FenceResult(self.name, self.outcome, self.spends, f"{node}@{epoch}")


def test_chain_first_failure_then_fenced(fence_agent: tuple[Path, Path]) -> None:
    script, log = fence_agent
    chain = FenceChain(
        [
            CommandAgent([str(script), str(log)], {"mode": "fail"}, name="first"),
            CommandAgent([str(script), str(log)], name="second"),
            CommandAgent([str(script), str(log)], name="never"),
        ]
    )
    report = asyncio.run(chain.fence("node2", 7, 10.0))
    assert [(a.agent, a.outcome) for a in report.attempts] == [
        ("first", Outcome.FAILED),
        ("second", Outcome.FENCED),
    ]
    assert report.fenced_by.agent == "second"
    assert report.summary().startswith("fenced node2 with second in ")
    assert "first: failed" in report.summary()
    assert len(_records(log)) == 2


def test_chain_all_fail_lists_every_attempt(tmp_path: Path) -> None:
    clock = ManualClock()
    chain = FenceChain(
        [
            ScriptedAgent("ipmi", Outcome.FAILED, 1.0, clock),
            ScriptedAgent("ssh", Outcome.TIMEOUT, 2.0, clock),
        ],
        clock=clock,
    )
    with pytest.raises(FenceError) as caught:
        asyncio.run(chain.fence("node2", 7, 10.0))
    assert [a.agent for a in caught.value.attempts] == ["ipmi", "ssh"]
    assert "ipmi: failed" in str(caught.value) and "ssh: timeout" in str(caught.value)
    assert caught.value.node == "node2"


def test_chain_shares_the_overall_timeout() -> None:
    clock = ManualClock()
    agents = [
        ScriptedAgent("a", Outcome.FAILED, 2.0, clock),
        ScriptedAgent("b", Outcome.FAILED, 3.5, clock),
        ScriptedAgent("c", Outcome.FENCED, 0.5, clock),
    ]
    report = asyncio.run(FenceChain(agents, clock=clock).fence("node2", 7, 9.0))
    assert report.fenced_by.agent == "c"
    assert [agent.budgets for agent in agents] == [[3.0], [3.5], [3.5]]


def test_chain_out_of_time_skips_the_rest() -> None:
    clock = ManualClock()
    agents = [
        ScriptedAgent("a", Outcome.TIMEOUT, 5.0, clock),
        ScriptedAgent("b", Outcome.FENCED, 0.0, clock),
    ]
    with pytest.raises(FenceError) as caught:
        asyncio.run(FenceChain(agents, clock=clock).fence("node2", 7, 4.0))
    assert [(a.agent, a.outcome) for a in caught.value.attempts] == [
        ("a", Outcome.TIMEOUT),
        ("b", Outcome.TIMEOUT),
    ]
    assert agents[1].budgets == []


def test_chain_with_hanging_programs_keeps_to_the_overall_timeout(
    fence_agent: tuple[Path, Path],
) -> None:
    script, log = fence_agent
    hang = {"mode": "hang"}
    chain = FenceChain([CommandAgent([str(script), str(log)], hang, name=n) for n in "ab"])
    start = time.monotonic()
    with pytest.raises(FenceError) as caught:
        asyncio.run(chain.fence("node2", 7, 1.2))
    elapsed = time.monotonic() - start
    assert 1.0 < elapsed < 2.5
    assert [a.outcome for a in caught.value.attempts] == [Outcome.TIMEOUT, Outcome.TIMEOUT]
    assert 0.4 < caught.value.attempts[0].seconds < 1.0


def test_empty_chain_refuses() -> None:
    with pytest.raises(FenceError, match="no fence agent configured"):
        asyncio.run(FenceChain([]).fence("node2", 7, 1.0))


# --- agents_from_config ---


def test_agents_from_config_builds_each_type(password_file: Path) -> None:
    agents = agents_from_config(
        [
            {
                "type": "command",
                "argv": ["fence_ipmilan"],
                "options": {"ip": "bmc-{node}", "ipport": 623, "password_file": "/pw"},
            },
            {
                "type": "ipmi",
                "host": "bmc-{node}",
                "username": "admin",
                "password_file": str(password_file),
            },
            {"type": "ssh", "vip": "198.18.0.100/24", "name": "ssh-mgmt"},
            {"type": "libvirt", "uri": "qemu:///system"},
            {"type": "lab", "vip": "198.18.0.100/24", "prefix": "hamta-lab"},
        ]
    )
    assert [agent.name for agent in agents] == [
        "fence_ipmilan",
        "ipmi",
        "ssh-mgmt",
        "libvirt",
        "lab",
    ]
    command = agents[0]
    assert isinstance(command, CommandAgent)
    assert command.options["ipport"] == "623"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("not a table", "must be a table"),
        ({"type": "stonith"}, "type must be one of command, ipmi, ssh, libvirt, lab"),
        ({"argv": ["x"]}, "type must be one of"),
        ({"type": "command"}, "argv is required"),
        ({"type": "command", "argv": []}, "argv must be a non-empty list"),
        ({"type": "command", "argv": ["x"], "option": {}}, "unknown key(s) option"),
        ({"type": "command", "argv": ["x"], "options": {"password": "p"}}, "password_file"),
        ({"type": "command", "argv": ["x"], "options": {"ip": "a\nb"}}, "one line"),
        ({"type": "command", "argv": ["x"], "options": {"a=b": "c"}}, "bad option name"),
        ({"type": "ipmi", "host": "b", "password_file": "/pw"}, "username is required"),
        (
            {
                "type": "ipmi",
                "host": "b",
                "username": "u",
                "password_file": "/p",
                "poll_interval": 0,
            },
            "poll_interval must be a positive number",
        ),
        ({"type": "ssh"}, "vip is required unless command is given"),
        ({"type": "ssh", "command": "x", "connect_timeout": 1.5}, "whole seconds"),
        ({"type": "lab"}, "vip is required"),
        ({"type": "libvirt", "name": ""}, "name must be a non-empty string"),
    ],
)
def test_agents_from_config_errors(entry: Any, problem: str) -> None:
    good = {"type": "libvirt"}
    with pytest.raises(FencingConfigError) as caught:
        agents_from_config([good, entry])
    assert str(caught.value).startswith("fencing agent 1")
    assert problem in str(caught.value)


# --- the agent's plain fence commands (cluster.fencers): the same runner, fencing.process ---


# Forks a helper that keeps the output pipe open, records both pids, then hangs: the fence tool
# stuck on a dead BMC whose helper would outlive a kill of the tool alone.
HANGING_WITH_A_CHILD = """
import os, subprocess, sys, time
child = subprocess.Popen(["sleep", "30"])
with open(sys.argv[1], "w") as pids:
    pids.write(f"{os.getpid()} {child.pid}")
time.sleep(30)
"""


def _all_dead(pids: list[int]) -> bool:
    """Whether every pid is gone, allowing a moment for a SIGKILL to land."""
    deadline = time.monotonic() + 2
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _pids(path: Path) -> list[int]:
    deadline = time.monotonic() + 5
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, "the fence command never started"
        time.sleep(0.01)
    return [int(pid) for pid in path.read_text().split()]


@pytest.fixture
def hanging(tmp_path: Path) -> tuple[Path, Path]:
    """The hanging fence command and the file its pids go to."""
    return _script(tmp_path / "fence_hang", HANGING_WITH_A_CHILD), tmp_path / "pids"


def _kill_left(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)


def test_a_fence_command_over_its_limit_is_killed_with_its_children(
    hanging: tuple[Path, Path],
) -> None:
    script, pids_file = hanging
    fencer = CommandFencer([[str(script), str(pids_file)], ["true", "{peer}"]])
    started = time.monotonic()
    detail = asyncio.run(fencer.fence("node2", 7, 0.5))
    assert time.monotonic() - started < 3
    assert detail == "fenced node2 with true"
    pids = _pids(pids_file)
    try:
        assert _all_dead(pids), "a fence program outlived its limit"
    finally:
        _kill_left(pids)


def test_an_abandoned_fence_step_leaves_no_fence_program_running(
    hanging: tuple[Path, Path],
) -> None:
    script, pids_file = hanging

    async def abandon() -> None:
        task = asyncio.create_task(CommandFencer([[str(script), str(pids_file)]]).fence("n", 1, 30))
        await asyncio.to_thread(_pids, pids_file)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(abandon())
    pids = _pids(pids_file)
    try:
        assert _all_dead(pids), "the step was abandoned, its fence was not"
    finally:
        _kill_left(pids)


def test_every_failure_is_reported_in_order(tmp_path: Path) -> None:
    failing = _script(
        tmp_path / "fence_refused",
        "import sys\nprint('Connecting to BMC')\nprint('Unable to connect', file=sys.stderr)\n"
        "sys.exit(1)",
    )
    fencer = CommandFencer([[str(failing)], ["hvt-no-such-fence"]])
    with pytest.raises(FenceFailedError) as failed:
        asyncio.run(fencer.fence("node2", 7, 5))
    assert str(failed.value) == (
        f"{failing}: exit 1 Unable to connect; hvt-no-such-fence not installed"
    )
    with pytest.raises(FenceFailedError, match="no fence agent or command configured"):
        asyncio.run(CommandFencer([]).fence("node2", 7, 5))
