"""Ending a ZooKeeper session from outside its client (``fencing.zk_session``), on a real server.

A kazoo client opens a session and creates an ephemeral znode; the code under test closes that
session with the client's id and password, as the watchdog does after the agent's death.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
from kazoo.client import KazooClient, KazooState

from cluster.zookeeper import ZooKeeperEnsemble
from fencing.zk_session import PER_SERVER, ZkSession, close_session, parse_servers

ZNODE = "/zk-session-test"


@pytest.fixture
def client(zookeeper: ZooKeeperEnsemble) -> Iterator[KazooClient]:
    """A session (10 s: it would outlive the test on its own) holding an ephemeral znode."""
    kazoo = KazooClient(hosts=zookeeper.hosts, timeout=10)
    kazoo.start(10)
    kazoo.create(ZNODE, ephemeral=True)
    yield kazoo
    kazoo.stop()
    kazoo.close()


@pytest.fixture
def observer(zookeeper: ZooKeeperEnsemble) -> Iterator[KazooClient]:
    kazoo = KazooClient(hosts=zookeeper.hosts, timeout=10)
    kazoo.start(10)
    yield kazoo
    kazoo.stop()
    kazoo.close()


def session_of(client: KazooClient, servers: str) -> ZkSession:
    session_id, password = client.client_id
    return ZkSession(parse_servers(servers), session_id, password)


def gone_within(observer: KazooClient, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if observer.exists(ZNODE) is None:
            return True
        time.sleep(0.01)
    return False


def test_closing_the_session_removes_its_ephemeral_znode_at_once(
    zookeeper: ZooKeeperEnsemble, client: KazooClient, observer: KazooClient
) -> None:
    states: list[KazooState] = []
    client.add_listener(states.append)
    session = session_of(client, zookeeper.hosts)
    started = time.monotonic()
    closed = close_session(session)
    assert closed.outcome == "closed", closed
    assert closed.server == zookeeper.hosts
    # Gone for everybody, far sooner than the session's 10 s timeout would have allowed.
    assert gone_within(observer, 0.5)
    assert time.monotonic() - started < 1.0
    # A session closed is a session ended: doing it again finds nothing to close.
    again = close_session(session)
    assert again.outcome == "not_open", again
    # The client learns it too when it reconnects: the session is over for it.
    end = time.monotonic() + 5
    while KazooState.LOST not in states and time.monotonic() < end:
        time.sleep(0.02)
    assert KazooState.LOST in states


def test_a_wrong_password_is_refused_and_breaks_nothing(
    zookeeper: ZooKeeperEnsemble, client: KazooClient, observer: KazooClient
) -> None:
    session_id, password = client.client_id
    wrong = bytes(byte ^ 0xFF for byte in password)
    session = ZkSession(parse_servers(zookeeper.hosts), session_id, wrong)
    closed = close_session(session)
    assert closed.outcome == "not_open", closed
    assert "password" in closed.detail
    assert wrong.hex() not in repr(session) + repr(closed)
    time.sleep(0.3)  # whatever the server would do to the session, it does it by now
    assert client.connected
    assert observer.exists(ZNODE) is not None
    client.set(ZNODE, b"still mine")  # the owner's session still works


def test_servers_are_tried_in_turn(
    zookeeper: ZooKeeperEnsemble, client: KazooClient, observer: KazooClient
) -> None:
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
        dead = f"127.0.0.1:{closed_port.getsockname()[1]}"
        closed = close_session(session_of(client, f"{dead},{zookeeper.hosts}"))
    assert closed.outcome == "closed", closed
    assert closed.server == zookeeper.hosts
    assert gone_within(observer, 0.5)


def test_with_credentials_the_connection_authenticates_first(
    zookeeper: ZooKeeperEnsemble, observer: KazooClient
) -> None:
    auth = ("digest", "hamta:zk-session-secret")
    kazoo = KazooClient(hosts=zookeeper.hosts, timeout=10, auth_data=[auth])
    kazoo.start(10)
    try:
        kazoo.create(ZNODE, ephemeral=True)
        session_id, password = kazoo.client_id
        session = ZkSession(parse_servers(zookeeper.hosts), session_id, password, (auth,))
        assert "secret" not in repr(session)
        closed = close_session(session)
        assert closed.outcome == "closed", closed
        assert gone_within(observer, 0.5)
    finally:
        kazoo.stop()
        kazoo.close()


def test_no_server_answering_is_reported_within_the_limit() -> None:
    # One refuses connections, two accept them (the kernel's backlog) and never answer.
    with socket.socket() as refusing, socket.socket() as silent1, socket.socket() as silent2:
        refusing.bind(("127.0.0.1", 0))
        for silent in (silent1, silent2):
            silent.bind(("127.0.0.1", 0))
            silent.listen(1)
        ports = [s.getsockname()[1] for s in (refusing, silent1, silent2)]
        servers = ",".join(f"127.0.0.1:{port}" for port in ports)
        limit = 1.5
        started = time.monotonic()
        closed = close_session(ZkSession(parse_servers(servers), 0x1234, b"p" * 16), limit)
        took = time.monotonic() - started
    assert closed.outcome == "unreachable", closed
    assert took < limit + 0.3
    # The first silent server had its share, the second what was left of the limit.
    assert took >= min(limit, PER_SERVER) - 0.05
    detail = closed.detail
    assert f"127.0.0.1:{ports[0]}: Connection refused" in detail
    assert f"127.0.0.1:{ports[1]}: " in detail and f"127.0.0.1:{ports[2]}: " in detail


@pytest.mark.parametrize(
    ("text", "servers"),
    [
        ("10.0.0.1:2181,zk2:2182", (("10.0.0.1", 2181), ("zk2", 2182))),
        ("zk1", (("zk1", 2181),)),
        ("[::1]:2183, [fd00::2]", (("::1", 2183), ("fd00::2", 2181))),
    ],
)
def test_servers_are_read_as_kazoo_takes_them(
    text: str, servers: tuple[tuple[str, int], ...]
) -> None:
    assert parse_servers(text) == servers


@pytest.mark.parametrize("text", ["", "zk1:0", "zk1:x", "zk1:70000", "[::1", "zk1,,zk2", "a b:1"])
def test_bad_servers_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="servers"):
        parse_servers(text)


@pytest.mark.parametrize(
    ("session_id", "password", "auth"),
    [
        (0, b"p" * 16, ()),
        (1 << 63, b"p" * 16, ()),
        (1, b"", ()),
        (1, b"p" * 65, ()),
        (1, b"p" * 16, (("digest", ""),)),
    ],
)
def test_a_session_that_cannot_be_one_is_refused(
    session_id: int, password: bytes, auth: tuple[tuple[str, str], ...]
) -> None:
    with pytest.raises(ValueError):
        ZkSession((("zk1", 2181),), session_id, password, auth)
