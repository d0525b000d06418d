"""The cluster's znodes against clients without its credentials, on a real three-server ensemble.

An agent creates every path it needs (the chroot's components and ``/hamta`` included) with the
cluster's digest ACL; a client without credentials may then neither create a znode anywhere
under them nor delete, change or re-permission any; a cluster root squatted before the agents
came (an open ACL) is taken back when they start.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NotEmptyError
from kazoo.security import OPEN_ACL_UNSAFE, make_acl

from cluster.coordination import Coordinator
from cluster.coordination_layout import CoordinationError, Credentials
from cluster.decision_data import Member, Role
from cluster.zookeeper import ZooKeeperEnsemble
from tests.support import zookeeper as zookeeper_support

CREDENTIALS = Credentials("hamta", "acl-test-secret")


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperEnsemble]:
    """Three servers of this module's own: the tests here change ``/hamta``'s ACL."""
    with zookeeper_support.three_servers(tmp_path_factory.mktemp("acl-ensemble")) as servers:
        yield servers


@pytest.fixture
def clients(ensemble: ZooKeeperEnsemble) -> Iterator[dict[str, KazooClient]]:
    """An anonymous client and the cluster's own (as its agents authenticate)."""
    made = {
        "anonymous": KazooClient(hosts=ensemble.hosts),
        "owner": KazooClient(hosts=ensemble.hosts, auth_data=[CREDENTIALS.auth]),
    }
    for client in made.values():
        client.start(timeout=20)
    yield made
    for client in made.values():
        client.stop()
        client.close()


def tree(client: KazooClient, root: str) -> list[str]:
    """Every znode from ``root`` down, parents first."""
    paths, pending = [], [root]
    while pending:
        path = pending.pop(0)
        paths.append(path)
        pending += [f"{path}/{child}" for child in sorted(client.get_children(path))]
    return paths


def assert_closed(anonymous: KazooClient, paths: list[str]) -> None:
    for path in paths:
        with pytest.raises(NoAuthError):
            anonymous.create(f"{path}/intruder", b"", acl=OPEN_ACL_UNSAFE)
        # ZooKeeper checks DELETE on the parent: "/" is the ensemble administrator's (open by
        # default), so a top-level znode is only safe by never being empty.
        with pytest.raises(NotEmptyError if path.count("/") == 1 else NoAuthError):
            anonymous.delete(path)
        with pytest.raises(NoAuthError):
            anonymous.set(path, b"{}")
        with pytest.raises(NoAuthError):
            anonymous.set_acls(path, OPEN_ACL_UNSAFE)


def start(ensemble: ZooKeeperEnsemble, cluster: str, chroot: str = "") -> Coordinator:
    """An agent's coordinator (node "a") with the cluster's credentials, started."""
    coordinator = Coordinator(ensemble.hosts + chroot, cluster, "a", credentials=CREDENTIALS)
    coordinator.start(20)
    return coordinator


@pytest.mark.parametrize("chroot", ["", "/tenants/mail"])
def test_an_unauthenticated_client_can_neither_create_under_the_roots_nor_delete_anything(
    ensemble: ZooKeeperEnsemble, clients: dict[str, KazooClient], chroot: str
) -> None:
    cluster = "closed" + chroot.replace("/", "-")
    agent = start(ensemble, cluster, chroot)
    try:
        agent.publish_member(Member("a", Role.ACTIVE))
        assert agent.acquire_leadership() is not None
        agent.record_failover({"node": "a"})
        agent.pause("alice", "maintenance")
        agent.report_split_brain("diverged")
        owner, anonymous = clients["owner"], clients["anonymous"]
        top = (chroot or "/hamta").split("/")[1]
        everything = tree(owner, f"/{top}")
        root = f"{chroot}/hamta/{cluster}"
        assert {f"{root}/leader", f"{root}/members/a", f"{root}/epoch", f"{root}/paused"} <= set(
            everything
        )
        for path in everything:
            assert owner.get_acls(path)[0] == CREDENTIALS.acl(), path
        assert_closed(anonymous, everything)
        for path in (f"/{top}", root):  # not even the names of clusters are public
            with pytest.raises(NoAuthError):
                anonymous.get_children(path)
    finally:
        agent.stop()


def test_a_squatted_cluster_root_is_taken_back_at_start(
    ensemble: ZooKeeperEnsemble, clients: dict[str, KazooClient]
) -> None:
    anonymous, owner = clients["anonymous"], clients["owner"]
    # Before any agent of "victim" came: its root, open to anybody, with some of its znodes.
    anonymous.ensure_path("/squat/hamta/victim/members", acl=OPEN_ACL_UNSAFE)
    anonymous.create("/squat/hamta/victim/paused", b"{}", acl=OPEN_ACL_UNSAFE)
    agent = start(ensemble, "victim", "/squat")
    try:
        agent.publish_member(Member("a", Role.PASSIVE))
        everything = tree(owner, "/squat")
        assert "/squat/hamta/victim/epoch" in everything
        for path in everything:
            assert owner.get_acls(path)[0] == CREDENTIALS.acl(), path
        # The squatter can no longer delete what the agents wrote, nor add anything.
        assert_closed(anonymous, everything)
    finally:
        agent.stop()


def test_a_root_whose_acl_cannot_be_taken_back_refuses_the_start(
    ensemble: ZooKeeperEnsemble, clients: dict[str, KazooClient]
) -> None:
    anonymous = clients["anonymous"]
    # Open to create and delete, but nobody may change its ACL.
    closed_admin = [make_acl("world", "anyone", read=True, create=True, delete=True)]
    anonymous.ensure_path("/locked", acl=OPEN_ACL_UNSAFE)
    anonymous.create("/locked/hamta", b"", acl=OPEN_ACL_UNSAFE)
    anonymous.create("/locked/hamta/mail", b"", acl=closed_admin)
    with pytest.raises(CoordinationError, match=r"/locked/hamta/mail has the ACL world:anyone:cdr"):
        start(ensemble, "mail", "/locked")


def test_another_user_s_cluster_needs_a_chroot_of_its_own(
    ensemble: ZooKeeperEnsemble, clients: dict[str, KazooClient]
) -> None:
    first = start(ensemble, "first", "/shared")
    first.stop()
    other = Credentials("other", "other-secret")
    beside = Coordinator(ensemble.hosts + "/shared", "second", "b", credentials=other)
    with pytest.raises(CoordinationError, match=r"chroot of its own"):
        beside.start(20)
    alone = Coordinator(ensemble.hosts + "/other-tenant", "second", "b", credentials=other)
    alone.start(20)
    alone.stop()
    # The first cluster's parents stay closed to the other user, as to anybody.
    assert clients["owner"].get_acls("/shared/hamta")[0] == CREDENTIALS.acl()
