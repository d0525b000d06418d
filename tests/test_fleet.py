"""Two pairs on one real ZooKeeper, each under its own root with its own credentials.

The administrator creates the fleet's root and each pair's; each pair's agents (Coordinators
with the pair's credentials and the fleet reader's id) fill their own. Pair A's credentials get
NoAuth on everything of pair B's; the fleet reader reads both and changes neither; ``hamta fleet
status`` lists both and names a pair it may not read instead of failing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.security import OPEN_ACL_UNSAFE

from cluster.config import ConfigError, parse_agent_config
from cluster.coordination import Coordinator
from cluster.coordination_layout import CoordinationError, Credentials
from cluster.decision_data import Member, Role
from cluster.fleet import FleetError, create_pair, fleet_history, fleet_root, fleet_status
from cluster.zookeeper import ZooKeeperEnsemble

ADMIN = Credentials("fleet-admin", "admin-secret")
READER = Credentials("fleet-reader", "reader-secret")
PAIR_A = Credentials("pair-a", "a-secret")
PAIR_B = Credentials("pair-b", "b-secret")
CHROOT = "/fleet-test"


def client(ensemble: ZooKeeperEnsemble, credentials: Credentials | None) -> KazooClient:
    made = KazooClient(
        hosts=ensemble.hosts, auth_data=[credentials.auth] if credentials is not None else None
    )
    made.start(timeout=20)
    return made


@pytest.fixture(scope="module")
def fleet(zookeeper: ZooKeeperEnsemble) -> Iterator[dict[str, Coordinator]]:
    """Pairs a and b created by the administrator, one agent of each started and publishing."""
    root = fleet_root(zookeeper.hosts + CHROOT)[1]
    admin = client(zookeeper, ADMIN)
    for name, owner in (("a", PAIR_A), ("b", PAIR_B)):
        create_pair(
            admin, root, name, admin=ADMIN, owner=owner.digest_id, readers=[READER.digest_id]
        )
    # A pair created without the reader's READ: the listing must name it, not fail.
    create_pair(admin, root, "hidden", admin=ADMIN, owner=PAIR_A.digest_id, readers=[])
    admin.stop()
    admin.close()
    agents = {}
    for name, owner in (("a", PAIR_A), ("b", PAIR_B)):
        agent = Coordinator(
            zookeeper.hosts + CHROOT,
            name,
            f"{name}1",
            credentials=owner,
            readers=[READER.digest_id],
        )
        agent.start(20)
        agent.publish_member(
            Member(
                f"{name}1", Role.PASSIVE, queue_depth=7, heartbeat=0.0, vip=f"10.{len(name)}.0.1/24"
            )
        )
        agent.record_failover(
            {"at": 100.0 if name == "a" else 50.0, "epoch": 1, "node": f"{name}1"}
        )
        agents[name] = agent
    yield agents
    for agent in agents.values():
        agent.stop()


def test_one_pair_s_credentials_can_neither_read_nor_change_another_pair(
    zookeeper: ZooKeeperEnsemble, fleet: dict[str, Coordinator]
) -> None:
    b_root = f"{CHROOT}/hamta/b"
    as_a = client(zookeeper, PAIR_A)
    try:
        for path in (b_root, f"{b_root}/epoch", f"{b_root}/history", f"{b_root}/members/b1"):
            with pytest.raises(NoAuthError):
                as_a.get(path)
            with pytest.raises(NoAuthError):
                as_a.set(path, b"{}")
            with pytest.raises(NoAuthError):
                as_a.set_acls(path, OPEN_ACL_UNSAFE)
        with pytest.raises(NoAuthError):
            as_a.get_children(f"{b_root}/members")
        with pytest.raises(NoAuthError):
            as_a.create(f"{b_root}/leader", b"{}", ephemeral=True)
        with pytest.raises(NoAuthError):
            as_a.delete(f"{b_root}/epoch")
        # Nor may it make a pair of its own beside them: the fleet's root is the administrator's.
        with pytest.raises(NoAuthError):
            as_a.create(f"{CHROOT}/hamta/c", b"")
    finally:
        as_a.stop()
        as_a.close()
    # An agent of pair a pointed at pair b's name refuses to start.
    stray = Coordinator(zookeeper.hosts + CHROOT, "b", "a9", credentials=PAIR_A)
    with pytest.raises(CoordinationError, match=r"denies|another user"):
        stray.start(20)


def test_the_fleet_reader_reads_every_pair_and_changes_none(
    zookeeper: ZooKeeperEnsemble, fleet: dict[str, Coordinator]
) -> None:
    reader = client(zookeeper, READER)
    try:
        for pair in ("a", "b"):
            root = f"{CHROOT}/hamta/{pair}"
            assert reader.get_children(f"{root}/members") == [f"{pair}1"]
            with pytest.raises(NoAuthError):
                reader.set(f"{root}/epoch", b"{}")
            with pytest.raises(NoAuthError):
                reader.create(f"{root}/paused", b"{}")
            with pytest.raises(NoAuthError):
                reader.delete(f"{root}/history")
            with pytest.raises(NoAuthError):
                reader.set_acls(root, OPEN_ACL_UNSAFE)
    finally:
        reader.stop()
        reader.close()


def test_fleet_status_lists_every_pair_and_names_the_unreadable_one(
    zookeeper: ZooKeeperEnsemble, fleet: dict[str, Coordinator]
) -> None:
    reader = client(zookeeper, READER)
    try:
        root = fleet_root(zookeeper.hosts + CHROOT)[1]
        status = {pair["pair"]: pair for pair in fleet_status(reader, root, wall=lambda: 10.0)}
        history = fleet_history(reader, root)
    finally:
        reader.stop()
        reader.close()
    assert {"a", "b", "hidden"} <= set(status)  # and "c", once created below
    assert status["hidden"]["problem"].startswith("unreadable")
    for pair in ("a", "b"):
        assert status[pair]["problem"] is None
        assert [node["node"] for node in status[pair]["nodes"]] == [f"{pair}1"]
        assert status[pair]["nodes"][0]["role"] == "passive"
        assert status[pair]["queue_depth"] == 7
        assert status[pair]["vip"] == ["10.1.0.1/24"]
        assert status[pair]["last_failover"]["node"] == f"{pair}1"
    # Merged, oldest first, each record naming its pair.
    assert [(record["pair"], record["at"]) for record in history] == [("b", 50.0), ("a", 100.0)]


def test_the_command_reads_with_a_private_reader_file_only(
    zookeeper: ZooKeeperEnsemble, fleet: dict[str, Coordinator], tmp_path: Path
) -> None:
    secret = tmp_path / "reader"
    secret.write_text(f"{READER.user}:{READER.password}\n")
    secret.chmod(0o644)
    command = [sys.executable, "-m", "hamtactl", "fleet", "status", "--json"]
    command += ["--zookeeper", zookeeper.hosts + CHROOT, "--credentials", str(secret)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    refused = subprocess.run(
        command, check=False, capture_output=True, text=True, env=env, timeout=60
    )
    assert refused.returncode == 1
    assert "chmod 600" in refused.stderr
    secret.chmod(0o600)
    shown = subprocess.run(
        command, check=False, capture_output=True, text=True, env=env, timeout=60
    )
    assert shown.returncode == 0, shown.stderr
    pairs = {pair["pair"]: pair for pair in json.loads(shown.stdout)["pairs"]}
    assert pairs["a"]["nodes"][0]["node"] == "a1"
    assert pairs["hidden"]["problem"].startswith("unreadable")


def test_a_pair_is_created_once_and_a_fleet_root_must_exist(
    zookeeper: ZooKeeperEnsemble, fleet: dict[str, Coordinator]
) -> None:
    admin = client(zookeeper, ADMIN)
    try:
        root = fleet_root(zookeeper.hosts + CHROOT)[1]
        with pytest.raises(FleetError, match="exists already"):
            create_pair(admin, root, "a", admin=ADMIN, owner=PAIR_A.digest_id, readers=[])
        with pytest.raises(FleetError, match="no fleet"):
            fleet_status(admin, "/nowhere/hamta")
    finally:
        admin.stop()
        admin.close()


def test_fleet_reader_must_be_a_digest_identity(tmp_path: Path) -> None:
    def config(reader: str) -> str:
        return (
            f'[agent]\nnode = "a"\nzookeeper = "127.0.0.1:2181"\nrelay_config = "{tmp_path}/r"\n'
            f'fleet_reader = "{reader}"\n[storage]\npath = "{tmp_path}"\n'
        )

    assert parse_agent_config(config(READER.digest_id)).agent.fleet_reader == READER.digest_id
    # The password itself, by mistake: refused, and the message does not echo it.
    with pytest.raises(ConfigError, match="fleet_reader") as refused:
        parse_agent_config(config("fleet-reader:reader-secret"))
    assert "reader-secret" not in str(refused.value)


def test_create_pair_from_standard_input_is_idempotent_with_exist_ok(
    zookeeper: ZooKeeperEnsemble, fleet: dict[str, Coordinator], tmp_path: Path
) -> None:
    owner = tmp_path / "owner"
    owner.write_text("pair-c:c-secret\n")
    owner.chmod(0o600)
    command = [sys.executable, "-m", "hamtactl", "fleet", "create-pair", "c", "--exist-ok"]
    command += ["--zookeeper", zookeeper.hosts + CHROOT, "--credentials", "-"]
    command += ["--owner", str(owner), "--reader-id", READER.digest_id]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    admin_line = f"{ADMIN.user}:{ADMIN.password}\n"
    runs = [
        subprocess.run(
            command,
            input=admin_line,
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        for _ in range(2)
    ]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert runs[0].stdout == f"created {CHROOT}/hamta/c\n"
    assert runs[1].stdout.startswith("exists:")
    # The pair's own agents may now start there; the reader sees it.
    agent = Coordinator(
        zookeeper.hosts + CHROOT,
        "c",
        "c1",
        credentials=Credentials("pair-c", "c-secret"),
        readers=[READER.digest_id],
    )
    agent.start(20)
    agent.stop()
    reader = client(zookeeper, READER)
    try:
        assert reader.exists(f"{CHROOT}/hamta/c/epoch") is not None
    finally:
        reader.stop()
        reader.close()


def test_an_unreachable_ensemble_is_one_line_and_exit_status_1() -> None:
    command = [sys.executable, "-m", "hamtactl", "fleet", "status", "--timeout", "1"]
    command += ["--zookeeper", "127.0.0.1:1"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "hamta fleet: ZooKeeper at 127.0.0.1:1 unreachable within 1s (Connection time-out)"
    ]


def test_a_pair_that_joins_the_fleet_later_gives_the_reader_read_at_its_agents_start(
    zookeeper: ZooKeeperEnsemble, fleet: dict[str, Coordinator]
) -> None:
    """An existing pair (no reader yet) whose agents get agent.fleet_reader: one start is enough."""
    root = fleet_root(zookeeper.hosts + CHROOT)[1]
    admin = client(zookeeper, ADMIN)
    create_pair(admin, root, "later", admin=ADMIN, owner=PAIR_A.digest_id, readers=[])
    admin.stop()
    admin.close()
    hosts = zookeeper.hosts + CHROOT
    before = Coordinator(hosts, "later", "l1", credentials=PAIR_A)
    before.start(20)
    before.stop()
    reader = client(zookeeper, READER)
    try:
        with pytest.raises(NoAuthError):
            reader.get(f"{root}/later/epoch")
        after = Coordinator(hosts, "later", "l1", credentials=PAIR_A, readers=[READER.digest_id])
        after.start(20)
        after.stop()
        for path in ("", "/epoch", "/history", "/members", "/nodes/l1"):
            reader.get(f"{root}/later{path}")
    finally:
        reader.stop()
        reader.close()
