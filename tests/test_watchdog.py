"""The self-fencing watchdog as a real process: fed, starved, orphaned, disarmed, fed garbage.

The victims are ``sleep`` processes, each in a session of its own: a "relay" whose process group
the watchdog is told, and an "agent" whose pid it is given with ``--agent-pid``. The watchdog's
JSON lines go to a file the tests read. The virtual IP test needs root: it builds a network
namespace of its own (``hwd-*``), runs the watchdog inside it and removes it afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from kazoo.client import KazooClient

from cluster.zookeeper import ZooKeeperEnsemble
from fencing.watchdog import (
    EXIT_FIRED,
    GONE_LIMIT,
    Arm,
    BadCommandError,
    Guard,
    Watchdog,
    WatchdogError,
    parse_command,
)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 0.3
DEADLINE = 5.0

Procs = list[subprocess.Popen[bytes]]


@pytest.fixture
def procs() -> Iterator[Procs]:
    """Processes a test starts; those still running at the end are killed by pid."""
    started: Procs = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def victim(procs: Procs) -> subprocess.Popen[bytes]:
    """A ``sleep`` in a session (and process group) of its own."""
    process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    procs.append(process)
    return process


def killed(process: subprocess.Popen[bytes]) -> bool:
    """Whether ``process`` dies of SIGKILL within the deadline."""
    try:
        return process.wait(DEADLINE) == -signal.SIGKILL
    except subprocess.TimeoutExpired:
        return False


def alive(*processes: subprocess.Popen[bytes]) -> bool:
    return all(process.poll() is None for process in processes)


def events_in(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


@dataclass
class Running:
    """A watchdog process started by a test, its input and its log."""

    process: subprocess.Popen[bytes]
    log: Path

    def send(self, *lines: dict[str, Any] | bytes) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        for line in lines:
            stdin.write(line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n")
        stdin.flush()

    def arm(self, timeout: float = TIMEOUT, **settings: Any) -> None:
        self.send({"cmd": "arm", "timeout": timeout, **settings})

    def feed(self) -> None:
        self.send({"cmd": "feed"})

    def end_input(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()

    def wait(self) -> int:
        return self.process.wait(DEADLINE)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        return [e for e in events_in(self.log) if name is None or e["event"] == name]

    def fired(self) -> dict[str, Any]:
        (record,) = self.events("WatchdogFired")
        return record


def outcomes(record: dict[str, Any]) -> dict[str, str]:
    return {action["action"]: action["outcome"] for action in record["actions"]}


def start_watchdog(
    procs: Procs, tmp_path: Path, *args: str, prefix: tuple[str, ...] = ()
) -> Running:
    """``python -m fencing.watchdog args`` (behind ``prefix``), once it printed ``ready``."""
    log = tmp_path / f"watchdog{len(procs)}.log"
    with open(log, "ab") as stderr:
        process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "fencing.watchdog", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=ROOT,
            start_new_session=True,
        )
    procs.append(process)
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], DEADLINE)
    assert readable, "the watchdog did not get ready"
    assert process.stdout.readline() == b"ready\n"
    return Running(process, log)


def feed_for(watchdog: Running, seconds: float, every: float = 0.1) -> None:
    """Feed every ``every`` seconds for ``seconds``; the watchdog must stay quiet meanwhile."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(every)
        watchdog.feed()
        assert watchdog.process.poll() is None, watchdog.events()


# ---------------------------------------------------------------------- firing


def test_fires_when_the_feeds_stop_and_not_before(procs: Procs, tmp_path: Path) -> None:
    relay, agent = victim(procs), victim(procs)
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    watchdog.arm(relay_pgid=relay.pid)
    feed_for(watchdog, 1.0)
    assert alive(relay, agent)
    assert watchdog.events("WatchdogFired") == []

    assert watchdog.wait() == EXIT_FIRED
    assert killed(relay)
    assert killed(agent)
    record = watchdog.fired()
    assert record["reason"] == "missed_feed"
    assert record["relay_pgid"] == relay.pid
    assert record["agent_pid"] == agent.pid
    assert record["vip"] is None
    assert TIMEOUT <= record["since_feed"] < TIMEOUT + 1.0
    assert 0 <= record["late_by"] < 1.0
    assert outcomes(record) == {
        "kill_relay": "killed",
        "remove_vip": "skipped",
        "kill_agent": "killed",
    }


def test_fires_at_the_end_of_input_but_leaves_the_agent_pid_alone(
    procs: Procs, tmp_path: Path
) -> None:
    relay, agent = victim(procs), victim(procs)
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    watchdog.arm(timeout=30.0, relay_pgid=relay.pid)
    started = time.monotonic()
    watchdog.end_input()

    assert watchdog.wait() == EXIT_FIRED
    assert time.monotonic() - started < 5.0  # at once, not at the 30 s deadline
    assert killed(relay)
    assert alive(agent)
    record = watchdog.fired()
    assert record["reason"] == "stdin_eof"
    assert record["late_by"] is None
    assert outcomes(record) == {
        "kill_relay": "killed",
        "remove_vip": "skipped",
        "kill_agent": "skipped",
    }


def test_the_relay_command_moves_the_kill_to_the_new_group(procs: Procs, tmp_path: Path) -> None:
    old, new, agent = victim(procs), victim(procs), victim(procs)
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    watchdog.arm(timeout=30.0, relay_pgid=old.pid)
    watchdog.send({"cmd": "relay", "pgid": new.pid})
    watchdog.end_input()

    assert watchdog.wait() == EXIT_FIRED
    assert killed(new)
    assert alive(old, agent)


def test_a_rearm_replaces_every_setting(procs: Procs, tmp_path: Path) -> None:
    relay, agent = victim(procs), victim(procs)
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    watchdog.arm(timeout=30.0, relay_pgid=relay.pid)
    watchdog.arm(timeout=30.0)  # the relay is no longer this node's to kill
    watchdog.end_input()

    assert watchdog.wait() == EXIT_FIRED
    assert outcomes(watchdog.fired())["kill_relay"] == "skipped"
    assert alive(relay, agent)
    assert [e["rearmed"] for e in watchdog.events("WatchdogArmed")] == [False, True]


def test_a_relay_already_gone_is_no_failure(procs: Procs, tmp_path: Path) -> None:
    relay, agent = victim(procs), victim(procs)
    relay.kill()
    relay.wait()
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    watchdog.arm(timeout=30.0, relay_pgid=relay.pid)
    watchdog.end_input()

    assert watchdog.wait() == EXIT_FIRED
    assert outcomes(watchdog.fired())["kill_relay"] == "gone"


# ---------------------------------------------------------------------- the agent's session


@pytest.fixture
def zk_session(zookeeper: ZooKeeperEnsemble) -> Iterator[tuple[KazooClient, dict[str, Any]]]:
    """A kazoo session (10 s) holding an ephemeral znode, and its ``session`` command."""
    client = KazooClient(hosts=zookeeper.hosts, timeout=10)
    client.start(10)
    client.create("/watchdog-session", ephemeral=True)
    session_id, password = client.client_id
    command = {
        "cmd": "session",
        "servers": zookeeper.hosts,
        "session_id": session_id,
        "password": password.hex(),
        "auth": [["digest", "hamta:watchdog-secret"]],
    }
    yield client, command
    client.stop()
    client.close()


def exists_after(client: KazooClient, seconds: float) -> bool:
    """Whether the session's znode still exists ``seconds`` from now, for another client."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and client.exists("/watchdog-session") is not None:
        time.sleep(0.01)
    return client.exists("/watchdog-session") is not None


def test_firing_ends_the_agents_session_after_the_relay_and_vip(
    procs: Procs,
    tmp_path: Path,
    zookeeper: ZooKeeperEnsemble,
    zk_session: tuple[KazooClient, dict[str, Any]],
) -> None:
    _owner, command = zk_session
    relay, agent = victim(procs), victim(procs)
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    watchdog.send(command)
    watchdog.arm(timeout=30.0, relay_pgid=relay.pid)
    observer = KazooClient(hosts=zookeeper.hosts)
    observer.start(10)
    try:
        assert exists_after(observer, 0.2), "the session lives while the agent does"
        agent.kill()  # the agent dies: its end of the pipe closes
        agent.wait()
        watchdog.end_input()
        assert watchdog.wait() == EXIT_FIRED
        assert not exists_after(observer, 0.5), "the agent's ephemeral znode outlived it"
    finally:
        observer.stop()
        observer.close()
    assert killed(relay)
    names = [e["event"] for e in watchdog.events()]
    assert names[-2:] == ["WatchdogFired", "WatchdogSessionEnded"]  # fenced first
    (ended,) = watchdog.events("WatchdogSessionEnded")
    assert ended["outcome"] == "closed", ended
    assert ended["session_id"] == f"0x{command['session_id']:x}"
    assert watchdog.events("WatchdogSession")[0]["auth"] == ["digest"]
    log = watchdog.log.read_text()
    assert command["password"] not in log and "watchdog-secret" not in log


def test_the_session_outlives_a_process_that_will_not_die(
    procs: Procs, tmp_path: Path, zk_session: tuple[KazooClient, dict[str, Any]]
) -> None:
    owner, command = zk_session
    agent = victim(procs)  # its input ends but it lives on: it may still hold the spool
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    watchdog.send(command)
    watchdog.arm(timeout=30.0)
    watchdog.end_input()
    assert watchdog.wait() == EXIT_FIRED
    (ended,) = watchdog.events("WatchdogSessionEnded")
    assert ended["outcome"] == "skipped" and str(agent.pid) in ended["detail"]
    assert ended["seconds"] >= GONE_LIMIT
    assert owner.connected and exists_after(owner, 0.3)


def test_a_clean_stop_leaves_the_session_alone(
    procs: Procs,
    tmp_path: Path,
    zookeeper: ZooKeeperEnsemble,
    zk_session: tuple[KazooClient, dict[str, Any]],
) -> None:
    owner, command = zk_session
    agent = victim(procs)
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    watchdog.send(command)
    watchdog.arm(timeout=30.0)
    watchdog.send({"cmd": "disarm"})
    watchdog.end_input()
    assert watchdog.wait() == 0
    assert not watchdog.events("WatchdogSessionEnded")
    assert owner.connected and exists_after(owner, 0.3)


def test_a_bad_session_command_is_refused_without_showing_its_secrets(
    procs: Procs, tmp_path: Path
) -> None:
    agent = victim(procs)
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    secret = "00112233445566778899aabbccddeeff"
    bad = [
        {"cmd": "session", "servers": "127.0.0.1:2181", "session_id": 0, "password": secret},
        {"cmd": "session", "servers": "127.0.0.1:x", "session_id": 5, "password": secret},
        {"cmd": "session", "servers": "127.0.0.1", "session_id": 5, "password": secret + "zz"},
        {"cmd": "session", "servers": "h", "session_id": 5, "password": secret, "auth": "no"},
        {"cmd": "session", "session_id": 5, "password": secret, "token": secret},
    ]
    watchdog.send(*bad)
    watchdog.arm(timeout=30.0)
    watchdog.end_input()
    assert watchdog.wait() == EXIT_FIRED
    assert len(watchdog.events("WatchdogBadCommand")) == len(bad)
    assert not watchdog.events("WatchdogSession") and not watchdog.events("WatchdogSessionEnded")
    assert secret not in watchdog.log.read_text()


def test_a_session_it_cannot_end_is_reported_and_changes_nothing_else(
    procs: Procs, tmp_path: Path
) -> None:
    relay, agent = victim(procs), victim(procs)
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))
        servers = f"127.0.0.1:{refusing.getsockname()[1]}"
        watchdog.send(
            {"cmd": "session", "servers": servers, "session_id": 7, "password": "ab" * 16}
        )
        watchdog.arm(timeout=30.0, relay_pgid=relay.pid)
        agent.kill()
        agent.wait()
        watchdog.end_input()
        assert watchdog.wait() == EXIT_FIRED
    assert killed(relay)
    assert outcomes(watchdog.fired())["kill_relay"] == "killed"
    (ended,) = watchdog.events("WatchdogSessionEnded")
    assert (ended["outcome"], ended["session_id"]) == ("unreachable", "0x7")
    assert ended["level"] == "error"
    assert "Connection refused" in ended["detail"]


def test_when_fencing_failed_the_session_is_left_to_expire(
    zookeeper: ZooKeeperEnsemble, zk_session: tuple[KazooClient, dict[str, Any]]
) -> None:
    owner, command = zk_session
    # ``ip`` that fails: the VIP may still be up, so the peer must not be let in early.
    guard = Guard(agent_pid=os.getpid(), device=None, ip="/bin/false")
    guard.handle(parse_command(json.dumps(command).encode()), 0.0)
    guard.handle(Arm(timeout=30.0, vip="198.18.0.100/24", interface="eth0"), 0.0)
    record = guard.fire("stdin_eof", 1.0)
    assert outcomes(record)["remove_vip"] == "failed"
    assert record["session"]["outcome"] == "skipped"
    assert "remove_vip failed" in record["session"]["detail"]
    assert owner.connected and exists_after(owner, 0.3)


# ---------------------------------------------------------------------- not firing


def test_disarmed_it_waits_for_ever_and_stops_cleanly(procs: Procs, tmp_path: Path) -> None:
    relay, agent = victim(procs), victim(procs)
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    watchdog.arm(relay_pgid=relay.pid)
    watchdog.feed()
    watchdog.send({"cmd": "disarm"})
    time.sleep(3 * TIMEOUT)  # the absence of feeds is what is tested
    watchdog.feed()  # a feed racing the disarm arms nothing
    time.sleep(3 * TIMEOUT)
    assert alive(watchdog.process, relay, agent)

    watchdog.end_input()
    assert watchdog.wait() == 0
    assert alive(relay, agent)
    names = [e["event"] for e in watchdog.events()]
    assert names == ["WatchdogStarted", "WatchdogArmed", "WatchdogDisarmed", "WatchdogStopped"]


GARBAGE = [
    b"feed\n",
    b"[1, 2]\n",
    b"\xff\xfe{}\n",
    b'{"cmd": "launch"}\n',
    b'{"cmd": "feed", "now": true}\n',
    b'{"cmd": "arm"}\n',
    b'{"cmd": "arm", "timeout": -1}\n',
    b'{"cmd": "arm", "timeout": NaN}\n',
    b'{"cmd": "arm", "timeout": true}\n',
    b'{"cmd": "arm", "timeout": 1, "relay_pgid": 1}\n',
    b'{"cmd": "arm", "timeout": 1, "relay_pid": 1234}\n',
    b'{"cmd": "arm", "timeout": 1, "vip": "198.18.0.100/24"}\n',
    b'{"cmd": "arm", "timeout": 1, "vip": "not-an-ip", "interface": "eth0"}\n',
    b'{"cmd": "arm", "timeout": 1, "vip": "198.18.0.100/24", "interface": "-x"}\n',
    b'{"cmd": "relay", "pgid": "1234"}\n',
    b'{"cmd": "relay"}\n',
    b'{"cmd": "feed"' + b" " * 10_000 + b"}\n",
]


def test_garbage_neither_fires_nor_arms_it(procs: Procs, tmp_path: Path) -> None:
    relay, agent = victim(procs), victim(procs)
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid))
    watchdog.send(*GARBAGE)
    time.sleep(3 * TIMEOUT)  # none of the bad arms armed it
    assert alive(watchdog.process, relay, agent)

    watchdog.arm(relay_pgid=relay.pid)
    end = time.monotonic() + 0.8
    while time.monotonic() < end:  # while armed, garbage in between the feeds
        for line in GARBAGE[::4]:
            watchdog.send(line)
        feed_for(watchdog, 0.1)
    watchdog.send({"cmd": "disarm"})
    watchdog.end_input()

    assert watchdog.wait() == 0
    assert alive(relay, agent)
    bad = watchdog.events("WatchdogBadCommand")
    assert len(bad) >= len(GARBAGE) + 5
    assert any("relay_pid" in e["error"] for e in bad)
    assert watchdog.events("WatchdogArmed")[0]["relay_pgid"] == relay.pid
    assert len(watchdog.events("WatchdogArmed")) == 1


def test_a_bad_command_line_is_refused_with_a_status_of_its_own() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fencing.watchdog", "--agent-pid", "1"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        cwd=ROOT,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode == 64  # not 2, which means "fired"
    assert b"not an agent's pid" in done.stderr


# ---------------------------------------------------------------------- the kernel device


def read_fifo(fd: int, enough: Callable[[bytes], bool] | None = None) -> bytes:
    """Bytes from the non-blocking FIFO ``fd`` until ``enough`` holds for them, or (None) until
    its writer is gone; at most until the deadline."""
    data = b""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        select.select([fd], [], [], 0.05)
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            continue
        data += chunk
        if enough is None and not chunk:
            break
        if enough is not None and enough(data):
            break
        if not chunk:
            time.sleep(0.01)  # no writer yet: the FIFO reads as ended until the device opens
    return data


def test_the_device_is_fed_closed_with_v_and_left_open_when_firing(
    procs: Procs, tmp_path: Path
) -> None:
    relay, agent = victim(procs), victim(procs)
    device = tmp_path / "watchdog"
    os.mkfifo(device)
    reader = os.open(device, os.O_RDONLY | os.O_NONBLOCK)
    try:
        watchdog = start_watchdog(
            procs, tmp_path, "--agent-pid", str(agent.pid), "--device", str(device)
        )
        watchdog.arm(timeout=5.0, relay_pgid=relay.pid)
        for _ in range(3):
            watchdog.feed()
        watchdog.send({"cmd": "disarm"})
        assert read_fifo(reader, lambda data: b"V" in data) == b"\0" * 4 + b"V"

        watchdog.arm(relay_pgid=relay.pid)
        watchdog.feed()
        assert watchdog.wait() == EXIT_FIRED
        # Once the watchdog has exited, the FIFO reads as ended.
        rest = read_fifo(reader)
        assert rest == b"\0\0"  # keepalives for the arm and the feed, no magic close
    finally:
        os.close(reader)
    armed = watchdog.events("WatchdogArmed")
    assert [e["device_error"] for e in armed] == [None, None]
    assert watchdog.fired()["device"] == str(device)


def test_a_device_that_cannot_be_opened_is_reported_and_done_without(
    procs: Procs, tmp_path: Path
) -> None:
    relay, agent = victim(procs), victim(procs)
    missing = tmp_path / "no-such-watchdog"
    watchdog = start_watchdog(
        procs, tmp_path, "--agent-pid", str(agent.pid), "--device", str(missing)
    )
    watchdog.arm(relay_pgid=relay.pid)
    assert watchdog.wait() == EXIT_FIRED
    assert killed(relay)
    (armed,) = watchdog.events("WatchdogArmed")
    assert armed["device_error"] == f"cannot open {missing}: No such file or directory"


# ---------------------------------------------------------------------- the virtual IP


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with a veth end ``hwd0`` holding 198.18.7.1/24 and the VIP .100."""
    name = f"hwd-{secrets.token_hex(3)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "add", "hwd0", "type", "veth", "peer", "name", "hwd1")
        ip("-n", name, "addr", "add", "198.18.7.1/24", "dev", "hwd0")
        ip("-n", name, "addr", "add", "198.18.7.100/24", "dev", "hwd0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def addresses(ns: str) -> set[str]:
    data = json.loads(ip("-n", ns, "-j", "-4", "addr", "show", "dev", "hwd0"))
    return {entry["local"] for entry in data[0]["addr_info"]}


@pytest.mark.root
def test_firing_takes_the_vip_off_in_the_agents_namespace(
    procs: Procs, tmp_path: Path, netns: str
) -> None:
    relay, agent = victim(procs), victim(procs)
    prefix = ("ip", "netns", "exec", netns)
    settings: dict[str, Any] = {
        "relay_pgid": relay.pid,
        "vip": "198.18.7.100/24",
        "interface": "hwd0",
    }
    watchdog = start_watchdog(procs, tmp_path, "--agent-pid", str(agent.pid), prefix=prefix)
    watchdog.arm(**settings)
    feed_for(watchdog, 0.3)
    assert addresses(netns) == {"198.18.7.1", "198.18.7.100"}

    assert watchdog.wait() == EXIT_FIRED
    assert addresses(netns) == {"198.18.7.1"}
    assert killed(relay)
    assert killed(agent)
    assert outcomes(watchdog.fired())["remove_vip"] == "removed"

    # A second fire finds the address gone already: that is the outcome wanted, not a failure.
    bystander = victim(procs)
    again = start_watchdog(procs, tmp_path, "--agent-pid", str(bystander.pid), prefix=prefix)
    again.arm(timeout=30.0, vip="198.18.7.100/24", interface="hwd0")
    again.end_input()
    assert again.wait() == EXIT_FIRED
    assert outcomes(again.fired())["remove_vip"] == "absent"
    assert addresses(netns) == {"198.18.7.1"}
    assert alive(bystander)


# ---------------------------------------------------------------------- the asyncio client


def test_the_client_arms_feeds_and_closes(procs: Procs, tmp_path: Path) -> None:
    relay, agent = victim(procs), victim(procs)
    log = tmp_path / "client.log"

    async def scenario(stderr: IO[bytes]) -> int | None:
        watchdog = Watchdog()
        await watchdog.start(agent_pid=agent.pid, stderr=stderr)
        assert watchdog.pid is not None
        # A session of its own: killing the agent's or the relay's group does not reach it.
        assert os.getsid(watchdog.pid) == watchdog.pid
        watchdog.arm(TIMEOUT, relay_pgid=relay.pid)
        for _ in range(8):
            await asyncio.sleep(0.1)
            watchdog.feed()
        watchdog.relay(relay.pid)
        assert watchdog.returncode is None
        return await watchdog.close()

    with open(log, "ab") as stderr:
        assert asyncio.run(scenario(stderr)) == 0
    assert alive(relay, agent)
    names = [e["event"] for e in events_in(log)]
    assert names == [
        "WatchdogStarted",
        "WatchdogArmed",
        "WatchdogRelay",
        "WatchdogDisarmed",
        "WatchdogStopped",
    ]


def test_the_client_raises_once_the_watchdog_fired(procs: Procs, tmp_path: Path) -> None:
    relay, agent = victim(procs), victim(procs)

    async def scenario(stderr: IO[bytes]) -> None:
        watchdog = Watchdog()
        await watchdog.start(agent_pid=agent.pid, stderr=stderr)
        watchdog.arm(0.2, relay_pgid=relay.pid)
        assert await asyncio.wait_for(watchdog.wait(), DEADLINE) == EXIT_FIRED
        with pytest.raises(WatchdogError, match="exited with status 2"):
            watchdog.feed()
        assert await watchdog.close() == EXIT_FIRED

    with open(tmp_path / "client.log", "ab") as stderr:
        asyncio.run(scenario(stderr))
    assert killed(relay)
    assert killed(agent)


def test_the_client_refuses_bad_settings_and_a_watchdog_not_running() -> None:
    watchdog = Watchdog()
    with pytest.raises(BadCommandError, match="timeout"):
        watchdog.arm(0)
    with pytest.raises(BadCommandError, match="together"):
        watchdog.arm(1.0, vip="198.18.0.100/24")
    with pytest.raises(WatchdogError, match="not started"):
        watchdog.arm(1.0)
    with pytest.raises(WatchdogError, match="did not start"):
        asyncio.run(watchdog.start(python="/bin/false"))
    assert watchdog.pid is None


# ---------------------------------------------------------------------- with a real agent

# An agent in miniature: starts its watchdog through the client, arms it for the relay whose
# pid it is given, prints the watchdog's pid and feeds it every 50 ms for ever.
AGENT = """
import asyncio, sys
from fencing.watchdog import Watchdog

async def main() -> None:
    watchdog = Watchdog()
    with open(sys.argv[2], "ab") as stderr:
        await watchdog.start(stderr=stderr)
    watchdog.arm(0.3, relay_pgid=int(sys.argv[1]))
    print(watchdog.pid, flush=True)
    while True:
        await asyncio.sleep(0.05)
        watchdog.feed()

asyncio.run(main())
"""


@pytest.fixture
def orphans() -> Iterator[list[int]]:
    """Watchdog pids of the mini agents; any still running (not a zombie) is killed at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if running(pid) and b"fencing.watchdog" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's parent may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start_agent(
    procs: Procs, orphans: list[int], tmp_path: Path
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], int, Path]:
    """A mini agent feeding its watchdog: its relay, itself, its watchdog's pid and log."""
    relay = victim(procs)
    log = tmp_path / "agent-watchdog.log"
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(relay.pid), str(log)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        start_new_session=True,
    )
    procs.append(agent)
    assert agent.stdout is not None
    readable, _, _ = select.select([agent.stdout], [], [], DEADLINE)
    assert readable, "the agent did not start its watchdog"
    watchdog_pid = int(agent.stdout.readline())
    orphans.append(watchdog_pid)
    return relay, agent, watchdog_pid, log


def gone(pid: int) -> bool:
    deadline = time.monotonic() + DEADLINE
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not running(pid)


def test_a_hung_agent_is_killed_with_its_relay(
    procs: Procs, orphans: list[int], tmp_path: Path
) -> None:
    relay, agent, watchdog_pid, log = start_agent(procs, orphans, tmp_path)
    os.kill(agent.pid, signal.SIGSTOP)  # hung: alive, but feeding nobody

    assert killed(agent)
    assert killed(relay)
    assert gone(watchdog_pid)
    (record,) = [e for e in events_in(log) if e["event"] == "WatchdogFired"]
    assert record["reason"] == "missed_feed"
    assert record["agent_pid"] == agent.pid


def test_the_watchdog_outlives_its_agents_group_and_fences(
    procs: Procs, orphans: list[int], tmp_path: Path
) -> None:
    relay, agent, watchdog_pid, log = start_agent(procs, orphans, tmp_path)
    os.killpg(agent.pid, signal.SIGKILL)  # the agent and anything in its group

    assert agent.wait(DEADLINE) == -signal.SIGKILL
    assert killed(relay)
    assert gone(watchdog_pid)
    (record,) = [e for e in events_in(log) if e["event"] == "WatchdogFired"]
    assert record["reason"] == "stdin_eof"
    assert record["pid"] == watchdog_pid
