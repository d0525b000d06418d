"""DRBD's handlers (``hamta drbd ...``) against a real ZooKeeper, run as drbdadm runs them."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.coordination import Coordinator
from cluster.decision_data import Member, Role
from cluster.zookeeper import ZooKeeperEnsemble
from tests.support import free_port
from tests.support.relay import HAMTA


@pytest.fixture
def cluster(zookeeper: ZooKeeperEnsemble) -> Iterator[tuple[str, Coordinator, Coordinator]]:
    """A cluster of nodes a (leading) and b (passive), both connected."""
    name = f"d{uuid.uuid4().hex[:10]}"
    a = Coordinator(zookeeper.hosts, name, "a", session_timeout=2.0)
    b = Coordinator(zookeeper.hosts, name, "b", session_timeout=2.0)
    a.start(10)
    b.start(10)
    try:
        a.publish_member(Member("a", Role.ACTIVE, epoch=1, holds=True))
        b.publish_member(Member("b", Role.PASSIVE, relay_running=True))
        assert a.acquire_leadership() is not None
        yield name, a, b
    finally:
        a.stop()
        b.stop()


def config(tmp_path: Path, node: str, cluster: str, zookeeper: str) -> Path:
    path = tmp_path / f"{node}.toml"
    path.write_text(
        f'[agent]\nnode = "{node}"\ncluster = "{cluster}"\nzookeeper = "{zookeeper}"\n'
        f'relay_config = "{tmp_path / "relay.toml"}"\n'
        f'[storage]\ndriver = "drbd"\nresource = "r0"\ndevice = "/dev/drbd0"\n'
        f'mountpoint = "{tmp_path / "mnt"}"\n'
    )
    return path


def drbd(action: str, config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``hamta drbd ACTION`` with the environment drbdadm gives its handlers."""
    return subprocess.run(
        [*HAMTA, "drbd", action, "--config", str(config)],
        env={**os.environ, "DRBD_RESOURCE": "r0", "DRBD_MINOR": "0", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_leader_outdates_its_peer_until_a_resync_clears_the_mark(
    zookeeper: ZooKeeperEnsemble, cluster: tuple[str, Coordinator, Coordinator], tmp_path: Path
) -> None:
    name, a, b = cluster
    done = drbd("fence-peer", config(tmp_path, "a", name, zookeeper.hosts))
    assert done.returncode == 4, done.stderr
    assert "b marked outdated for r0 by a, leader in epoch" in done.stderr
    assert b.view().outdated == frozenset({"b"})
    # The peer's own handler, while it does not lead: it is the one to outdate itself.
    done = drbd("fence-peer", config(tmp_path, "b", name, zookeeper.hosts), DRBD_PEER="a")
    assert done.returncode == 6, done.stderr
    assert "b does not lead the cluster (a does)" in done.stderr
    assert a.view().outdated == frozenset({"b"})
    leader_config = config(tmp_path, "a", name, zookeeper.hosts)
    status = subprocess.run(
        [*HAMTA, "cluster", "status", "--config", str(leader_config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "OUTDATED: b's replica missed writes" in status.stdout, status.stderr
    done = drbd("unfence", config(tmp_path, "b", name, zookeeper.hosts))
    assert done.returncode == 0, done.stderr
    assert "its outdated mark cleared" in done.stderr
    assert a.view().outdated == frozenset()
    assert drbd("unfence", config(tmp_path, "b", name, zookeeper.hosts)).returncode == 0


def test_run_as_the_kernel_runs_it_without_standard_streams_the_handler_still_fences(
    zookeeper: ZooKeeperEnsemble, cluster: tuple[str, Coordinator, Coordinator], tmp_path: Path
) -> None:
    """DRBD starts its handlers from the kernel with no file descriptors 0-2 and a bare
    environment: the handler must still decide (it crashed on structlog's missing stdout, and
    DRBD refused every promotion with "peer is not outdated")."""
    name, _, b = cluster
    config_file = config(tmp_path, "a", name, zookeeper.hosts)
    argv = " ".join([*HAMTA, "drbd", "fence-peer", "--config", str(config_file)])
    done = subprocess.run(
        ["/bin/sh", "-c", f"exec 0<&- 1>&- 2>&- {argv}"],
        env={
            "HOME": "/",
            "TERM": "linux",
            "PATH": "/sbin:/usr/sbin:/bin:/usr/bin",
            "DRBD_RESOURCE": "r0",
            "DRBD_MINOR": "0",
            "DRBD_PEER": "b",
        },
        timeout=60,
        check=False,
    )
    assert done.returncode == 4
    assert b.view().outdated == frozenset({"b"})


def test_a_split_brain_is_reported_until_an_operator_clears_it(
    zookeeper: ZooKeeperEnsemble, cluster: tuple[str, Coordinator, Coordinator], tmp_path: Path
) -> None:
    name, a, _ = cluster
    done = drbd("split-brain", config(tmp_path, "b", name, zookeeper.hosts))
    assert done.returncode == 0, done.stderr
    reported = a.view().split_brain
    assert reported is not None and "split brain of r0 on b" in reported
    done = drbd("clear-split-brain", config(tmp_path, "a", name, zookeeper.hosts))
    assert done.returncode == 0 and "split brain cleared" in done.stderr
    assert a.view().split_brain is None


def test_without_zookeeper_the_handler_fails_so_drbd_keeps_io_frozen(tmp_path: Path) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run(
        [
            *HAMTA,
            "drbd",
            "fence-peer",
            "--timeout",
            "2",
            "--config",
            str(config(tmp_path, "a", "mail", nowhere)),
        ],
        env={**os.environ, "DRBD_RESOURCE": "r0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "ZooKeeper" in done.stderr
    assert time.monotonic() - started < 30


def test_a_handler_without_a_resource_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DRBD_RESOURCE"}
    done = subprocess.run(
        [*HAMTA, "drbd", "fence-peer", "--config", str(config(tmp_path, "a", "m", "127.0.0.1:1"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "no DRBD resource" in done.stderr


def test_a_peer_name_that_is_not_a_node_of_the_cluster_is_refused(
    zookeeper: ZooKeeperEnsemble, cluster: tuple[str, Coordinator, Coordinator], tmp_path: Path
) -> None:
    name, a, _ = cluster
    done = drbd("fence-peer", config(tmp_path, "a", name, zookeeper.hosts), DRBD_PEER="b.example")
    assert done.returncode == 1 and "b.example is not a node of this cluster" in done.stderr
    assert a.view().outdated == frozenset()


def test_only_the_current_leader_can_mark_a_replica_outdated(
    cluster: tuple[str, Coordinator, Coordinator],
) -> None:
    _, a, b = cluster
    record = {"by": "b", "resource": "r0", "at": 0.0}
    assert b.mark_outdated("a", record, leader="b") is None  # b does not lead
    assert a.view().outdated == frozenset()
    epoch = a.mark_outdated("b", record, leader="a")
    assert epoch is not None and a.view().outdated == frozenset({"b"})
