"""What an operator sees when the agent or a command cannot start: one line naming the cause.

Real ``hamta`` processes against a real ZooKeeper server (the session's standalone one): a
credentials file that is missing or readable by others, a wrong password, an unreachable
ensemble, a log file that cannot be created. Each must end with a non-zero exit and exactly one
line on standard error, never a traceback nor kazoo's retry notes.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cluster.coordination import Coordinator
from cluster.coordination_layout import Credentials
from cluster.zookeeper import ZooKeeperEnsemble
from tests.support import free_port
from tests.support.relay import HAMTA, read_events, render_toml

PASSWORD = "right-password"


def run(*args: str, timeout: float = 60.0) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [*HAMTA, *args], check=False, capture_output=True, text=True, timeout=timeout
    )
    return done, time.monotonic() - started


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single line on stderr of a command that failed."""
    assert done.returncode != 0, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in lines[0]
    return lines[0]


class Node:
    """An agent configuration in ``directory`` (relay configuration included)."""

    def __init__(self, directory: Path, zookeeper: str, cluster: str) -> None:
        self.directory = directory
        self.zookeeper = zookeeper
        self.cluster = cluster
        self.credentials = directory / "zk-credentials"
        self.credentials.write_text(f"hamta:{PASSWORD}\n")
        self.credentials.chmod(0o600)
        self.relay_config = directory / "relay.toml"
        self.relay_config.write_text(
            render_toml(
                {
                    # The tests run as root, and the relay keeps it only when told so.
                    "node": {"user": "root"},
                    "smtp": {"listen": [f"127.0.0.1:{free_port()}"]},
                    "spool": {"path": directory / "spool"},
                    "admin": {"listen": ""},
                    "control": {"socket": directory / "relay.sock"},
                    "log": {"file": directory / "relay.log"},
                }
            )
        )
        self.log = directory / "agent.log"

    def config(self, **agent: Any) -> Path:
        section: dict[str, Any] = {
            "node": "n1",
            "cluster": self.cluster,
            "zookeeper": self.zookeeper,
            "credentials": self.credentials,
            "relay_config": self.relay_config,
            "state_dir": self.directory / "state",
            "log_file": self.log,
        }
        section.update(agent)
        path = self.directory / f"agent-{uuid.uuid4().hex[:6]}.toml"
        storage = {"driver": "directory", "path": self.directory / "shared"}
        path.write_text(render_toml({"agent": section, "storage": storage}))
        return path


@pytest.fixture
def node(tmp_path: Path, zookeeper: ZooKeeperEnsemble) -> Node:
    """A node of a cluster that exists, made by an agent with the right password."""
    cluster = f"e{uuid.uuid4().hex[:10]}"
    # A chroot of its own: the session's server is shared with clusters of other credentials.
    hosts = f"{zookeeper.hosts}/{cluster}"
    owner = Coordinator(hosts, cluster, "n0", credentials=Credentials("hamta", PASSWORD))
    owner.start(10)
    owner.stop()
    return Node(tmp_path, hosts, cluster)


@pytest.mark.parametrize("command", ["agent", "cluster"])
def test_a_credentials_file_missing_or_open_to_others_is_one_line(node: Node, command: str) -> None:
    args = ["agent"] if command == "agent" else ["cluster", "status"]
    missing = node.config(credentials=node.directory / "nothing-here")
    line = one_line(run(*args, "--config", str(missing))[0])
    assert f"credentials file {node.directory / 'nothing-here'} does not exist" in line
    node.credentials.chmod(0o644)
    line = one_line(run(*args, "--config", str(node.config()))[0])
    assert "accessible to group or others (mode 0644)" in line
    assert f"chmod 600 {node.credentials}" in line


@pytest.mark.parametrize("command", ["agent", "cluster"])
def test_a_wrong_password_is_one_line(node: Node, command: str) -> None:
    node.credentials.write_text("hamta:wrong-password\n")
    args = ["agent"] if command == "agent" else ["cluster", "status"]
    line = one_line(run(*args, "--config", str(node.config()))[0])
    assert f"ZooKeeper at {node.zookeeper} denies user 'hamta' access" in line
    assert "wrong credentials" in line
    if command == "agent":  # the log says it too
        assert read_events(node.log, "AgentFailed")


@pytest.mark.parametrize("command", ["agent", "cluster", "drbd"])
def test_an_unreachable_ensemble_fails_in_bounded_time_naming_the_hosts(
    node: Node, command: str
) -> None:
    hosts = f"127.0.0.1:{free_port()},127.0.0.2:{free_port('127.0.0.2')}"  # nobody listens
    config = node.config(zookeeper=hosts, connect_timeout="2s")
    args = {
        "agent": ["agent"],
        "cluster": ["cluster", "status"],
        "drbd": ["drbd", "split-brain", "--resource", "r0", "--timeout", "2"],
    }[command]
    done, seconds = run(*args, "--config", str(config))
    line = one_line(done)
    assert f"ZooKeeper at {hosts} unreachable: no session within 2s" in line
    # Bounded, not fast: without the bound it would hang until run()'s timeout. The slack is a
    # Python start under load (10-11 s were seen at a load average of 25).
    assert seconds < 2 + 15, f"{seconds:.1f}s"
    if command == "agent":
        # kazoo's retry notes are in the agent's log, as events, not on the operator's screen.
        assert any(e.get("library", "").startswith("kazoo") for e in read_events(node.log))


def test_a_log_file_that_cannot_be_created_is_one_line(node: Node, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    log = blocker / "logs" / "hamta.log"
    line = one_line(run("agent", "--config", str(node.config(log_file=log)))[0])
    assert line.startswith(f"hamta agent: log file {log}: cannot open it: Not a directory")

    relay = tmp_path / "relay-badlog.toml"
    relay.write_text(
        node.relay_config.read_text().replace(str(node.directory / "relay.log"), str(log))
    )
    line = one_line(run("serve", "--config", str(relay), timeout=30)[0])
    assert line.startswith(f"hamta: log file {log}: cannot open it: Not a directory")

    checked, _ = run("config", "check", str(relay))
    assert checked.returncode == 2
    line = one_line(checked)
    assert f"log.file: log file {log}: cannot create its directory: {blocker} is not a " in line


def test_an_unreadable_relay_configuration_or_state_directory_is_one_line(
    node: Node, tmp_path: Path
) -> None:
    missing = tmp_path / "no-relay.toml"
    line = one_line(run("agent", "--config", str(node.config(relay_config=missing)))[0])
    assert line == f"hamta agent: {missing}: cannot read: No such file or directory"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_line(run("agent", "--config", str(node.config(state_dir=blocker / "state")))[0])
    assert line == f"hamta agent: state directory {blocker / 'state'}: Not a directory"
