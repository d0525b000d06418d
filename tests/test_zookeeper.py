"""Real ZooKeeper servers from Debian's package: start, modes, election, signals, namespaces."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cluster.zookeeper import (
    ServerSpec,
    ZooKeeperEnsemble,
    ZooKeeperError,
    ZooKeeperServer,
    four_letter_word,
)
from tests.support import free_port
from tests.support.zookeeper import TEST_TICK_MS


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.05)


@pytest.fixture
def lone_server(tmp_path: Path) -> Iterator[ZooKeeperServer]:
    """A standalone server of the test's own (not started), stopped at the end."""
    server = ZooKeeperServer(
        ServerSpec(1, "127.0.0.1", free_port()), tmp_path / "zk", tick_ms=TEST_TICK_MS
    )
    yield server
    server.stop()


def test_a_standalone_server_serves_and_says_so(zookeeper: ZooKeeperEnsemble) -> None:
    (server,) = zookeeper.servers
    assert server.mode() == "standalone"
    assert server.pid is not None
    assert zookeeper.hosts == server.hosts == f"127.0.0.1:{server.spec.client_port}"
    assert zookeeper.leader() is server
    assert four_letter_word("127.0.0.1", server.spec.client_port, "ruok") == "imok"
    config = server.config_path.read_text()
    for line in (
        "tickTime=200",
        "admin.enableServer=false",
        "4lw.commands.whitelist=ruok,srvr,stat,mntr",
        "clientPortAddress=127.0.0.1",
        "maxSessionTimeout=4000",
    ):
        assert line in config.splitlines()
    assert "server.1=" not in config  # a single server runs standalone
    assert (server.data_dir / "myid").read_text() == "1\n"


def test_an_ensemble_elects_exactly_one_leader(zookeeper_ensemble: ZooKeeperEnsemble) -> None:
    modes = sorted(server.mode() or "" for server in zookeeper_ensemble.servers)
    assert modes == ["follower", "follower", "leader"]
    leader = zookeeper_ensemble.leader()
    assert leader is not None and leader.mode() == "leader"
    assert zookeeper_ensemble.hosts == ",".join(s.hosts for s in zookeeper_ensemble.servers)
    config = leader.config_path.read_text().splitlines()
    for spec in zookeeper_ensemble.specs:
        assert f"server.{spec.id}={spec.address}:{spec.quorum_port}:{spec.election_port}" in config


def test_a_frozen_server_is_silent_until_thawed(lone_server: ZooKeeperServer) -> None:
    lone_server.start()
    assert lone_server.wait_serving(15) == "standalone"
    lone_server.freeze()
    assert lone_server.mode() is None
    lone_server.thaw()
    wait_until(lambda: lone_server.mode() == "standalone", 5, "answers again after SIGCONT")


def test_stop_is_idempotent_and_works_on_a_frozen_server(lone_server: ZooKeeperServer) -> None:
    lone_server.stop()  # never started: nothing to do
    lone_server.start()
    lone_server.wait_serving(15)
    pid = lone_server.pid
    lone_server.freeze()
    started = time.monotonic()
    lone_server.stop()
    assert time.monotonic() - started < 4  # SIGTERM acted on, not the SIGKILL fallback
    assert lone_server.pid is None and lone_server.mode() is None
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    lone_server.stop()


def test_a_killed_server_can_be_started_again(lone_server: ZooKeeperServer) -> None:
    lone_server.start()
    lone_server.wait_serving(15)
    lone_server.kill()
    assert lone_server.pid is None and lone_server.mode() is None
    lone_server.start()
    assert lone_server.wait_serving(15) == "standalone"
    with pytest.raises(ZooKeeperError, match="already running"):
        lone_server.start()


def test_wait_serving_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    server = ZooKeeperServer(
        ServerSpec(1, "127.0.0.1", free_port()), tmp_path / "zk", tick_ms=TEST_TICK_MS, heap_mb=1
    )
    server.start()  # the JVM refuses a 1 MB heap and exits at once
    try:
        with pytest.raises(ZooKeeperError, match="exited with status 1") as failure:
            server.wait_serving(20)
        assert "Too small maximum heap" in str(failure.value)  # the log tail
    finally:
        server.stop()
    assert server.pid is None


def test_wait_serving_times_out_on_a_server_that_never_answers(
    lone_server: ZooKeeperServer,
) -> None:
    lone_server.start()
    lone_server.freeze()
    started = time.monotonic()
    with pytest.raises(ZooKeeperError, match="not serving after 1s"):
        lone_server.wait_serving(1.0)
    assert time.monotonic() - started < 3


@pytest.mark.root
def test_mode_asks_from_inside_the_servers_network_namespace(tmp_path: Path) -> None:
    name = f"hamta-zk-{uuid.uuid4().hex[:8]}"
    port = free_port()  # free on the host's loopback: only the namespace's server answers
    subprocess.run(["ip", "netns", "add", name], check=True)
    server = ZooKeeperServer(
        ServerSpec(1, "127.0.0.1", port), tmp_path / "zk", tick_ms=TEST_TICK_MS, netns=name
    )
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        server.start()
        assert server.wait_serving(15) == "standalone"
        assert four_letter_word("127.0.0.1", port, "ruok", netns=name) == "imok"
        with pytest.raises(OSError):
            four_letter_word("127.0.0.1", port, "ruok")  # the host's loopback has no server
    finally:
        server.stop()
        subprocess.run(["ip", "netns", "del", name], check=True)
    with pytest.raises(OSError):
        four_letter_word("127.0.0.1", port, "ruok", netns=name)  # gone: never created again
    assert not Path(f"/run/netns/{name}").exists()
