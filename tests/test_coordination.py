"""The coordinator against real ZooKeeper servers: leadership, epochs, sessions, ACLs, records."""

from __future__ import annotations

import itertools
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError

from cluster.coordination import Coordinator
from cluster.coordination_layout import HISTORY_LIMIT, CoordinationError, Credentials
from cluster.decision_data import Member, Role, Session
from cluster.zookeeper import ZooKeeperEnsemble
from fencing.zk_session import close_session
from tests.support import free_port
from tests.support import zookeeper as zookeeper_support
from tests.support.tcp_proxy import TcpProxy

CREDENTIALS = Credentials("hamta", "s3cret:with-colon")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.02)


def upstream(zookeeper: ZooKeeperEnsemble) -> tuple[str, int]:
    """The standalone server's client address, for a proxy in front of it."""
    spec = zookeeper.servers[0].spec
    return (spec.address, spec.client_port)


class MakeCoordinator(Protocol):
    def __call__(self, node: str, *, start: bool = True, **kwargs: Any) -> Coordinator: ...


@pytest.fixture
def cluster() -> str:
    """A cluster name of the test's own, so that tests sharing a server never meet."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_coordinator(zookeeper: ZooKeeperEnsemble, cluster: str) -> Iterator[MakeCoordinator]:
    """Coordinators on the shared standalone server, all stopped at the end."""
    made: list[Coordinator] = []

    def factory(node: str, *, start: bool = True, **kwargs: Any) -> Coordinator:
        kwargs.setdefault("hosts", zookeeper.hosts)
        kwargs.setdefault("cluster", cluster)
        coordinator = Coordinator(node=node, **kwargs)
        made.append(coordinator)
        if start:
            coordinator.start(timeout=10)
        return coordinator

    yield factory
    for coordinator in made:
        coordinator.stop()


@pytest.fixture
def raw_client(zookeeper: ZooKeeperEnsemble) -> Iterator[Callable[..., KazooClient]]:
    """Plain kazoo clients (to write what an agent never would, or to try what it must not)."""
    clients: list[KazooClient] = []

    def factory(**kwargs: Any) -> KazooClient:
        client = KazooClient(hosts=zookeeper.hosts, **kwargs)
        clients.append(client)
        client.start(timeout=10)
        return client

    yield factory
    for client in clients:
        client.stop()
        client.close()


class Changes:
    """Counts ``on_change`` calls and records the session state seen at each."""

    def __init__(self) -> None:
        self.count = 0
        self.sessions: list[Session] = []
        self.coordinator: Coordinator | None = None
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1
            if self.coordinator is not None:
                session = self.coordinator.session
                if not self.sessions or self.sessions[-1] is not session:
                    self.sessions.append(session)


# ------------------------------------------------------------------ members and views


def test_a_new_cluster_starts_empty(make_coordinator: MakeCoordinator) -> None:
    view = make_coordinator("a").view()
    assert view.session is Session.CONNECTED
    assert (view.leader, view.epoch, view.epoch_node, view.last_failover) == (None, 0, None, None)
    assert (view.members, view.paused, view.switchover) == ({}, None, None)


def test_members_are_published_and_vanish_with_their_session(
    make_coordinator: MakeCoordinator,
) -> None:
    changes = Changes()
    a, b = make_coordinator("a"), make_coordinator("b", on_change=changes)
    member = Member("a", Role.PASSIVE, relay_running=True, heartbeat=1000.5, smtp="198.18.0.10:25")
    a.publish_member(member)
    assert b.view().members == {"a": member}
    a.publish_member(Member("a", Role.ACTIVE, epoch=3, queue_depth=7))
    assert b.view().members["a"] == Member("a", Role.ACTIVE, epoch=3, queue_depth=7)
    before = changes.count
    a.stop()
    wait_until(lambda: b.view().members == {}, 3, "the member znode goes with its session")
    wait_until(lambda: changes.count > before, 3, "on_change for the membership change")


def test_the_end_of_a_known_node_s_session_is_timed_by_the_observer(
    make_coordinator: MakeCoordinator,
) -> None:
    now = [100.0]
    a, b = make_coordinator("a"), make_coordinator("b", clock=lambda: now[0])
    a.publish_member(Member("a", Role.ACTIVE, epoch=1, holds=True))
    assert b.view().absent_since == {}
    a.stop()
    wait_until(lambda: "a" not in b.view().members, 3, "the member znode goes with its session")
    assert b.view().absent_since == {"a": 100.0}
    now[0] = 103.0
    assert b.view().absent_since == {"a": 100.0}  # first seen gone, not last
    again = make_coordinator("a")  # it comes back: the lease is held again
    again.publish_member(Member("a", Role.PASSIVE))
    assert b.view().absent_since == {}


def test_a_new_session_replaces_the_member_znode_of_the_old_one(
    make_coordinator: MakeCoordinator, cluster: str
) -> None:
    old, new, watcher = make_coordinator("a"), make_coordinator("a"), make_coordinator("w")
    old.publish_member(Member("a", Role.PASSIVE, heartbeat=1.0))
    new.publish_member(Member("a", Role.PASSIVE, heartbeat=2.0))
    # Owned by the new session, so the old one's end cannot take the heartbeat with it.
    stat = watcher.client.exists(f"/hamta/{cluster}/members/a")
    assert stat is not None and stat.ephemeralOwner == new.client.client_id[0]
    old.stop()
    assert watcher.view().members["a"].heartbeat == 2.0


def test_operators_publish_nothing(make_coordinator: MakeCoordinator) -> None:
    agent, operator = make_coordinator("a"), make_coordinator("operator")
    agent.publish_member(Member("a", Role.PASSIVE))
    operator.pause("operator", "disk swap")
    view = operator.view()
    assert list(view.members) == ["a"]
    assert view.paused is not None and view.paused.by == "operator"


# ------------------------------------------------------------------ leadership


def race(*coordinators: Coordinator) -> dict[str, int | None]:
    """Every coordinator tries to take leadership at the same moment, each in its own thread."""
    barrier = threading.Barrier(len(coordinators))
    results: dict[str, int | None] = {}

    def attempt(coordinator: Coordinator) -> None:
        barrier.wait()
        results[coordinator.node] = coordinator.acquire_leadership()

    threads = [threading.Thread(target=attempt, args=(c,)) for c in coordinators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_of_two_racing_nodes_exactly_one_leads(make_coordinator: MakeCoordinator) -> None:
    a, b = make_coordinator("a"), make_coordinator("b")
    epochs: list[int] = []
    for _ in range(10):
        results = race(a, b)
        winners = [node for node, epoch in results.items() if epoch is not None]
        assert len(winners) == 1, results
        winner = a if winners[0] == "a" else b
        epoch = results[winner.node]
        assert epoch is not None
        epochs.append(epoch)
        for coordinator in (a, b):
            view = coordinator.view()
            assert view.leader is not None
            assert (view.leader.node, view.leader.epoch) == (winner.node, epoch)
            assert view.leader.ours is (coordinator is winner)
            assert (view.epoch, view.epoch_node) == (epoch, winner.node)
        assert winner.release_leadership(epoch)
    assert epochs == list(range(1, 11))


def test_epochs_strictly_increase_across_alternating_takeovers(
    make_coordinator: MakeCoordinator,
) -> None:
    nodes = [make_coordinator("a"), make_coordinator("b")]
    epochs: list[int] = []
    for turn in range(20):
        leader, other = nodes[turn % 2], nodes[(turn + 1) % 2]
        epoch = leader.acquire_leadership()
        assert epoch is not None
        assert other.acquire_leadership() is None  # the znode is held
        assert leader.acquire_leadership() is None  # even by itself: one term at a time
        assert leader.still_leader(epoch) and not other.still_leader(epoch)
        assert not leader.still_leader(epoch - 1)
        epochs.append(epoch)
        if turn % 2:
            assert leader.release_leadership(epoch)
        else:
            leader.stop()  # a crash: the session ends, the znode goes, the epoch stays
            nodes[turn % 2] = make_coordinator(leader.node)
    assert all(later > earlier for earlier, later in itertools.pairwise(epochs))
    assert len(set(epochs)) == 20


def test_only_the_owner_releases_the_leadership(make_coordinator: MakeCoordinator) -> None:
    a, b = make_coordinator("a"), make_coordinator("b")
    epoch = a.acquire_leadership()
    assert epoch is not None
    assert b.release_leadership(epoch)  # b does not lead in that term: nothing of its to release
    assert a.still_leader(epoch)  # and the znode is untouched
    assert not a.release_leadership(epoch + 1)  # another term than the one held
    assert a.still_leader(epoch)
    assert a.release_leadership(epoch)
    assert not a.still_leader(epoch)
    assert b.view().leader is None
    assert a.release_leadership(epoch)  # already gone


def test_epoch_zero_releases_a_stray_leadership(make_coordinator: MakeCoordinator) -> None:
    a = make_coordinator("a")
    epoch = a.acquire_leadership()
    assert epoch is not None
    assert a.release_leadership(0)
    assert a.view().leader is None


def test_the_leader_znode_goes_when_its_session_is_closed(
    make_coordinator: MakeCoordinator,
) -> None:
    changes = Changes()
    a, b = make_coordinator("a"), make_coordinator("b", on_change=changes)
    epoch = a.acquire_leadership()
    assert epoch is not None
    wait_until(lambda: b.view().leader is not None, 2, "b sees the leader")
    before = changes.count
    a.stop()
    assert a.session is Session.LOST
    wait_until(lambda: b.view().leader is None, 2, "the ephemeral leader znode is deleted")
    wait_until(lambda: changes.count > before, 5, "on_change for the leader's departure")
    assert b.acquire_leadership() == epoch + 1


def test_a_short_cut_suspends_the_session_and_keeps_the_leadership(
    zookeeper: ZooKeeperEnsemble, make_coordinator: MakeCoordinator
) -> None:
    with TcpProxy(upstream(zookeeper)) as proxy:
        changes = Changes()
        a = make_coordinator("a", start=False, hosts=proxy.hosts, on_change=changes)
        changes.coordinator = a
        a.start()
        epoch = a.acquire_leadership()
        assert epoch is not None
        assert a.view().leader is not None  # the last view read before the cut
        proxy.sever()
        wait_until(lambda: a.session is Session.SUSPENDED, 2, "suspended at once")
        view = a.view()
        assert view.session is Session.SUSPENDED and view.leader is not None and view.leader.ours
        assert not a.still_leader(epoch)  # cannot be confirmed while cut off
        with pytest.raises(CoordinationError, match="suspended"):
            a.acquire_leadership()
        proxy.restore()
        wait_until(lambda: a.session is Session.CONNECTED, 3, "reconnected in the same session")
        assert a.still_leader(epoch)
        assert changes.sessions[-2:] == [Session.SUSPENDED, Session.CONNECTED]


def test_an_expired_session_loses_its_leadership(
    zookeeper: ZooKeeperEnsemble, make_coordinator: MakeCoordinator
) -> None:
    with TcpProxy(upstream(zookeeper)) as proxy:
        changes, watcher_changes = Changes(), Changes()
        a = make_coordinator(
            "a", start=False, hosts=proxy.hosts, on_change=changes, session_timeout=2.0
        )
        changes.coordinator = a
        a.start()
        b = make_coordinator("b", on_change=watcher_changes)
        a.publish_member(Member("a", Role.ACTIVE))
        epoch = a.acquire_leadership()
        assert epoch is not None
        assert b.view().leader is not None
        cut = time.monotonic()
        proxy.sever()
        before = watcher_changes.count
        # The server expires the session on its own clock: 2 s, within a tick or two.
        wait_until(lambda: b.view().leader is None, 5, "the server expires the cut-off session")
        expired_after = time.monotonic() - cut
        assert 1.5 < expired_after < 4.0
        assert b.view().members == {}
        # The watch's notice comes on kazoo's thread, maybe just after the read saw it.
        wait_until(lambda: watcher_changes.count > before, 2, "a change notice")
        assert a.view().session is Session.SUSPENDED  # a cannot know yet
        proxy.restore()
        wait_until(lambda: Session.LOST in changes.sessions, 5, "a learns its session is lost")
        wait_until(lambda: a.session is Session.CONNECTED, 5, "a new session")
        assert changes.sessions[-3:] == [Session.SUSPENDED, Session.LOST, Session.CONNECTED]
        view = a.view()
        assert view.leader is None and view.epoch == epoch
        assert not a.still_leader(epoch)
        assert a.release_leadership(epoch)  # nothing left to release
        assert a.acquire_leadership() == epoch + 1  # a new term, never the old one again


def test_a_lost_session_drops_the_leadership_from_the_last_view(
    zookeeper: ZooKeeperEnsemble, make_coordinator: MakeCoordinator
) -> None:
    a = make_coordinator("a")
    epoch = a.acquire_leadership()
    assert epoch is not None
    assert a.view().leader is not None
    a.stop()
    view = a.view()
    assert view.session is Session.LOST and view.leader is None and view.epoch == epoch


# ------------------------------------------------------------------ failures and access


def test_an_unreachable_zookeeper_fails_clearly_within_the_timeout() -> None:
    hosts = f"127.0.0.1:{free_port()}"  # nothing listens there
    coordinator = Coordinator(hosts, "c", "a")
    started = time.monotonic()
    with pytest.raises(CoordinationError, match=f"ZooKeeper at {hosts} unreachable"):
        coordinator.start(timeout=1.5)
    assert time.monotonic() - started < 3
    assert coordinator.session is Session.LOST
    coordinator.stop()  # harmless after a failed start


def test_malformed_znodes_are_treated_as_absent_and_reported(
    make_coordinator: MakeCoordinator, raw_client: Callable[..., KazooClient], cluster: str
) -> None:
    a = make_coordinator("a")
    root = f"/hamta/{cluster}"
    raw = raw_client()
    raw.create(f"{root}/paused", b"{not json")
    raw.create(f"{root}/switchover", b'{"source": 3}')
    raw.create(f"{root}/members/x", b"[]", ephemeral=True)
    raw.set(f"{root}/history", b"\xff\xfe")
    view = a.view()
    assert view.session is Session.CONNECTED
    assert (view.paused, view.switchover, view.members) == (None, None, {})
    assert {problem.split(":")[0] for problem in a.problems} == {
        f"{root}/paused",
        f"{root}/switchover",
        f"{root}/members/x",
    }
    assert a.history() == []
    a.record_failover({"to": "a"})  # a damaged history starts afresh
    assert a.history() == [{"to": "a"}]
    raw.create(f"{root}/leader", b"garbage", ephemeral=True)
    assert a.view().leader is None  # unreadable, yet held: nobody else takes it
    assert a.acquire_leadership() is None
    raw.delete(f"{root}/leader")
    raw.set(f"{root}/epoch", b"garbage")  # the epoch znode's version still bounds the epoch
    epoch = a.acquire_leadership()
    assert epoch is not None and epoch > 1


def test_acls_keep_out_anonymous_and_wrong_credentials(tmp_path: Path) -> None:
    with zookeeper_support.standalone(tmp_path / "zk") as server:
        owner = Coordinator(server.hosts, "secure", "a", credentials=CREDENTIALS)
        clients: list[KazooClient] = []
        try:
            owner.start()
            owner.publish_member(Member("a", Role.PASSIVE))
            assert owner.acquire_leadership() == 1
            anonymous = KazooClient(hosts=server.hosts)
            impostor = KazooClient(hosts=server.hosts, auth_data=[("digest", "hamta:wrong")])
            clients += [anonymous, impostor]
            for client in clients:
                client.start(timeout=10)
                for path in ("/hamta/secure", "/hamta/secure/epoch", "/hamta/secure/leader"):
                    with pytest.raises(NoAuthError):
                        client.get(path)
                with pytest.raises(NoAuthError):
                    client.get_children("/hamta/secure/members")
                with pytest.raises(NoAuthError):
                    client.set("/hamta/secure/epoch", b'{"epoch": 99}')
                with pytest.raises(NoAuthError):
                    client.create("/hamta/secure/paused", b"{}")
                with pytest.raises(NoAuthError):
                    client.delete("/hamta/secure/members/a")
                with pytest.raises(NoAuthError):
                    client.get_children("/hamta")  # cluster names are not public either
            wrong = Coordinator(
                server.hosts, "secure", "b", credentials=Credentials("hamta", "wrong")
            )
            with pytest.raises(CoordinationError, match="denies user 'hamta' access"):
                wrong.start()
            assert wrong.session is Session.LOST
            # Nobody without the credentials may add a cluster (a name to squat) beside it.
            anonymous_cluster = Coordinator(server.hosts, "other", "x")
            with pytest.raises(CoordinationError, match="denies anonymous clients access"):
                anonymous_cluster.start()
            with pytest.raises(NoAuthError):
                clients[0].create("/hamta/other", b"")
            other = Coordinator(server.hosts + "/elsewhere", "other", "x")  # in its own chroot
            other.start()
            other.stop()
            peer = Coordinator(server.hosts, "secure", "b", credentials=CREDENTIALS)
            peer.start()
            view = peer.view()
            peer.stop()
            assert view.leader is not None and view.leader.node == "a" and "a" in view.members
        finally:
            owner.stop()
            for client in clients:
                client.stop()
                client.close()


def test_credentials_come_from_a_private_one_line_file(tmp_path: Path) -> None:
    path = tmp_path / "zk.cred"
    with pytest.raises(CoordinationError, match="does not exist"):
        Credentials.from_file(path)
    path.write_text("hamta:pa:ss\n")
    path.chmod(0o640)
    with pytest.raises(CoordinationError, match=r"group or others \(mode 0640\).*chmod 600"):
        Credentials.from_file(path)
    path.chmod(0o600)
    assert Credentials.from_file(path) == Credentials("hamta", "pa:ss")
    assert "pa:ss" not in repr(Credentials.from_file(path))
    for content in ("", "hamta\n", ":secret\n", "hamta:\n", "a:b\nc:d\n"):
        path.write_text(content)
        with pytest.raises(CoordinationError, match="exactly one line 'user:password'"):
            Credentials.from_file(path)


# ------------------------------------------------------------------ records


def test_history_keeps_the_last_fifty_records(make_coordinator: MakeCoordinator) -> None:
    a = make_coordinator("a")
    for index in range(HISTORY_LIMIT + 5):
        a.record_failover({"index": index, "role": Role.ACTIVE, "steps": (("acquire", 0.01),)})
    history = a.history()
    assert [record["index"] for record in history] == list(range(5, HISTORY_LIMIT + 5))
    assert history[0]["role"] == "active" and history[0]["steps"] == [["acquire", 0.01]]


def test_concurrent_history_appends_are_all_kept(make_coordinator: MakeCoordinator) -> None:
    writers = [make_coordinator("a"), make_coordinator("b")]

    def append(coordinator: Coordinator) -> None:
        for index in range(15):
            coordinator.record_failover({"by": coordinator.node, "index": index})

    threads = [threading.Thread(target=append, args=(w,)) for w in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = writers[0].history()
    assert len(history) == 30
    for node in ("a", "b"):  # each writer's records in its own order
        assert [r["index"] for r in history if r["by"] == node] == list(range(15))


def assert_none(value: object) -> None:
    assert value is None, value


def test_pause_resume_and_switchover_round_trip(make_coordinator: MakeCoordinator) -> None:
    changes = Changes()
    clock = iter(range(100, 200))
    agent = make_coordinator("a", on_change=changes)
    operator = make_coordinator("operator", wall=lambda: float(next(clock)))

    def changed_after(action: Callable[[], None]) -> None:
        before = changes.count
        action()
        wait_until(lambda: changes.count > before, 2, "on_change")

    changed_after(lambda: operator.pause("alice", "kernel update"))
    view = agent.view()
    assert view.paused is not None
    assert (view.paused.by, view.paused.at, view.paused.reason) == ("alice", 100.0, "kernel update")
    changed_after(operator.resume)
    assert agent.view().paused is None
    operator.resume()  # not paused: nothing to do

    changed_after(lambda: assert_none(operator.request_switchover("a", "b", 30)))
    request = agent.view().switchover
    assert request is not None and (request.source, request.target, request.at) == ("a", "b", 101.0)
    # A second request while one is in progress is refused with the first; the first stands.
    assert operator.request_switchover("a", None, 30) == request
    assert agent.view().switchover == request
    # One the agents ignore by now (older than stale_after) is replaced.
    changed_after(lambda: assert_none(operator.request_switchover("a", None, 1)))
    request = agent.view().switchover
    assert request is not None and request.target is None
    changed_after(agent.clear_switchover)
    assert agent.view().switchover is None
    agent.clear_switchover()


# ------------------------------------------------------------------ ensemble


def test_a_zookeeper_leader_crash_keeps_session_and_leadership(
    zookeeper_ensemble: ZooKeeperEnsemble, cluster: str
) -> None:
    changes = Changes()
    # 4 s (20 ticks): long enough to ride out an election, as in production.
    a = Coordinator(zookeeper_ensemble.hosts, cluster, "a", session_timeout=4.0, on_change=changes)
    changes.coordinator = a
    b = Coordinator(zookeeper_ensemble.hosts, cluster, "b", session_timeout=4.0)
    victim = zookeeper_ensemble.leader()
    assert victim is not None
    try:
        a.start()
        b.start()
        a.publish_member(Member("a", Role.ACTIVE))
        epoch = a.acquire_leadership()
        assert epoch is not None
        session_id = a.client.client_id
        victim.kill()
        wait_until(lambda: zookeeper_ensemble.leader() not in (None, victim), 10, "a new ZK leader")
        wait_until(lambda: a.still_leader(epoch), 10, "a's leadership confirmed again")
        assert a.session is Session.CONNECTED and a.client.client_id == session_id
        assert Session.LOST not in changes.sessions
        assert Session.SUSPENDED in changes.sessions  # every client was cut during the election
        wait_until(lambda: b.session is Session.CONNECTED, 10, "b back too")
        view = b.view()
        assert view.leader is not None and view.leader.node == "a" and view.epoch == epoch
        assert "a" in view.members
        assert b.acquire_leadership() is None
    finally:
        a.stop()
        b.stop()
        if victim.pid is None:
            victim.start()
            victim.wait_serving(30)


def _touched_until_confirmed(coordinator: Coordinator, timeout: float) -> None:
    def confirmed() -> bool:
        coordinator.touch()
        age = coordinator.confirmed_age()
        return age is not None and age < 0.5

    wait_until(confirmed, timeout, "a sync answered")


def test_a_stopped_leader_confirms_nothing_though_its_follower_answers_reads(
    zookeeper_ensemble: ZooKeeperEnsemble, cluster: str
) -> None:
    # A follower answers reads from memory while its leader is stopped (until it gives up on
    # it: 5 ticks here), yet the ensemble commits nothing: a node whose reads are answered is
    # no less cut off from a takeover (``cluster.failsafe.cut_off`` goes by the syncs).
    leader = zookeeper_ensemble.leader()
    assert leader is not None
    follower = next(s for s in zookeeper_ensemble.servers if s is not leader)
    a = Coordinator(follower.spec.hosts, cluster, "a", session_timeout=4.0)
    reader = KazooClient(hosts=follower.spec.hosts, timeout=4.0)
    try:
        a.start()
        reader.start(timeout=10)
        _touched_until_confirmed(a, 10)
        leader.freeze()
        try:
            frozen = time.monotonic()
            while time.monotonic() - frozen < 0.6:
                a.touch()
                reader.exists_async("/").get(timeout=0.5)  # answered from memory
                time.sleep(0.05)
            confirmed = a.confirmed_age()
        finally:
            leader.thaw()
        assert confirmed is not None and confirmed >= 0.6
        _touched_until_confirmed(a, 20)  # the leader back, or another one elected
    finally:
        reader.stop()
        reader.close()
        a.stop()


@contextmanager
def _unanswering_server() -> Iterator[str]:
    """``127.0.0.1:PORT`` where no SYN is answered, as on a host switched off: a listener whose
    accept queue is full (Linux then drops new SYNs)."""
    with socket.socket() as listener, ExitStack() as held:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(5):
            try:
                held.enter_context(socket.create_connection(address, timeout=0.5))
            except TimeoutError:
                break
        else:
            raise AssertionError("the listener's queue never filled: SYNs are answered")
        yield f"{address[0]}:{address[1]}"


def test_a_server_that_answers_no_syn_costs_a_connect_its_share_of_the_session(
    zookeeper: ZooKeeperEnsemble, cluster: str
) -> None:
    # kazoo gave a TCP connect the whole session: a dead host's server cost the Vagrant
    # cluster's passive agent 8 s at a time. Bounded by the session over the servers (2 s here),
    # a start that tries the unanswering server first is on the live one within about 2 s.
    # kazoo shuffles the servers: four starts try the dead one first 15 times in 16.
    with _unanswering_server() as dead:
        for _ in range(4):
            a = Coordinator(f"{dead},{zookeeper.hosts}", cluster, "a", session_timeout=4.0)
            started = time.monotonic()
            try:
                a.start(timeout=10)
                took = time.monotonic() - started
            finally:
                a.stop()
            assert took < 3.0, f"connected after {took:.2f}s"


def test_the_session_handle_is_the_live_session_and_follows_a_new_one(
    make_coordinator: MakeCoordinator, zookeeper: ZooKeeperEnsemble
) -> None:
    credentials = Credentials("hamta", "handle-secret")
    # A chroot of its own: the digest ACLs it creates must not make /hamta this user's for the
    # anonymous coordinators of the other tests on the same server.
    coordinator = make_coordinator(
        "a", start=False, credentials=credentials, hosts=f"{zookeeper.hosts}/handle-test"
    )
    assert coordinator.session_handle() is None  # no session yet
    coordinator.start(timeout=10)
    handle = coordinator.session_handle()
    assert handle is not None
    session_id, password = coordinator.client.client_id
    assert (handle.session_id, handle.password) == (session_id, password)
    assert handle.servers == ((zookeeper.servers[0].spec.address, upstream(zookeeper)[1]),)
    assert handle.auth == (("digest", "hamta:handle-secret"),)
    assert "handle-secret" not in repr(handle) and password.hex() not in repr(handle)

    # Its session ended (as the watchdog ends a dead agent's), kazoo makes a new one: a new handle.
    assert close_session(handle).outcome == "closed"
    wait_until(
        lambda: (new := coordinator.session_handle()) is not None and new != handle,
        10,
        "a handle for the new session",
    )
    new = coordinator.session_handle()
    assert new is not None and new.session_id != handle.session_id


def test_hosts_the_watchdog_could_not_reach_are_refused_at_once() -> None:
    with pytest.raises(CoordinationError, match="bad port"):
        Coordinator("127.0.0.1:2181,127.0.0.2:x/chroot", "c", "a")


# ------------------------------------------------------------------ the session deadline


def test_the_session_deadline_is_the_last_answered_request_plus_the_timeout(
    zookeeper: ZooKeeperEnsemble, make_coordinator: MakeCoordinator
) -> None:
    """Dated by the send time of the last request answered (a read or a touch), kept while the
    session is suspended."""
    now = [100.0]
    with TcpProxy(upstream(zookeeper)) as proxy:
        changes = Changes()
        a = make_coordinator(
            "a",
            start=False,
            hosts=proxy.hosts,
            on_change=changes,
            session_timeout=2.0,
            clock=lambda: now[0],
        )
        changes.coordinator = a
        a.start()
        a.publish_member(Member("a", Role.ACTIVE))
        b = make_coordinator("b")
        assert a.view().session_deadline == 102.0
        now[0] = 200.0
        a.touch()  # answered in kazoo's thread, dated when it was sent
        now[0] = 150.0  # a read sent earlier than the touch does not move the date back
        wait_until(lambda: a.view().session_deadline == 202.0, 2, "the touch answered")
        # A read the agent stopped waiting for: the last view, suspended, with the deadline.
        unanswered = a.unanswered_view()
        assert (unanswered.session, unanswered.session_deadline) == (Session.SUSPENDED, 202.0)
        assert unanswered.members == a.view().members
        proxy.sever()
        wait_until(lambda: a.session is Session.SUSPENDED, 2, "suspended at once")
        now[0] = 300.0
        a.touch()  # not sent: nothing to date
        view = a.view()
        assert view.session is Session.SUSPENDED and view.session_deadline == 202.0
        # Cut off for longer than the session: expired on the server, lost for the client.
        wait_until(lambda: "a" not in b.view().members, 5, "the server expires the session")
        proxy.restore()
        wait_until(lambda: Session.LOST in changes.sessions, 5, "the session lost")
        wait_until(lambda: a.session is Session.CONNECTED, 5, "a new session")
        assert a.view().session_deadline == 302.0  # dated by the new session's own read


def test_the_last_takeover_that_served_is_carried_across_aborted_ones(
    make_coordinator: MakeCoordinator,
) -> None:
    """``last_served`` moves only when a takeover is marked serving (its PUBLISH); a term taken
    and abandoned before that moves ``last_failover`` only."""
    wall = [1000.0]
    a = make_coordinator("a", wall=lambda: wall[0])
    b = make_coordinator("b", wall=lambda: wall[0])
    first = a.acquire_leadership()
    assert first is not None
    # Nothing served yet (or a cluster an older agent ran): the last acquisition counts.
    assert (a.view().last_failover, a.view().last_served) == (1000.0, 1000.0)
    wall[0] = 1001.0
    assert a.mark_served(first)
    assert a.view().last_served == 1001.0
    assert a.release_leadership(first)
    wall[0] = 1010.0
    second = b.acquire_leadership()  # ... and b dies promoting: never marked serving
    assert second == first + 1
    view = a.view()
    assert (view.last_failover, view.last_served) == (1010.0, 1001.0)
    assert not a.mark_served(first)  # a term superseded is not marked
    assert a.view().last_served == 1001.0
