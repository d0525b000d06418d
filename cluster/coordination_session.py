"""A coordinator's session with ZooKeeper: connecting, the cluster's znodes and their ACLs, the
watches, and the time-limited calls every read and write of ``cluster.coordination`` goes
through.

kazoo's calls block, and a call made while the connection is down waits for the next one (or
forever, if the session is lost meanwhile); so every call here waits with a time limit, and fails
with CoordinationError. A call that timed out may still run after a reconnection in the same
session: an acquisition that timed out can leave this session holding the leader znode, which
the next ``view()`` shows as ``ours`` and the agent releases (``release_leadership(0)``).

Watches call ``on_change`` from kazoo's threads on every change of the leader, epoch, paused and
switchover znodes, of the set of members, and of the session state. Members' heartbeats do not
wake the agent (they change every few seconds); they are read by each ``view()``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Final, TypeVar

import msgspec
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NoAuthError, NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
from kazoo.protocol.connection import _CONNECTION_DROP
from kazoo.protocol.states import ZnodeStat
from kazoo.recipe.watchers import ChildrenWatch, DataWatch
from kazoo.retry import KazooRetry
from kazoo.security import ACL, OPEN_ACL_UNSAFE

from cluster.coordination_layout import (
    OPERATOR,
    ROOT,
    CoordinationError,
    Credentials,
    EpochRecord,
    Paths,
    check_name,
)
from cluster.decision_data import ClusterView, Session
from cluster.zk_acl import AclError, parents, secure, split_chroot
from fencing.zk_session import ZkSession, parse_servers
from hamta.eventlog import get_logger

# The client reconnects quickly after an outage, never waiting more than this between tries.
_RECONNECT_MAX_DELAY: Final = 1.0
# ... and tries often at first: a restarted ZooKeeper server (its ensemble electing a leader)
# serves again within a few hundred milliseconds, and an active node whose connection dropped
# serves on only until its session deadline less the drain (cluster.state.session_doomed).
# 0.05 s growing by 1.3: eight rounds of tries within the first 1.2 s.
_RECONNECT_DELAY: Final = 0.05
_RECONNECT_BACKOFF: Final = 1.3

T = TypeVar("T")


class _BoundedConnect(SequentialThreadingHandler):  # type: ignore[misc]
    """kazoo's threading handler, its TCP connect bounded by ``limit``.

    kazoo gives a TCP connect the whole session, and a server whose host is switched off answers
    no SYN: on the Vagrant cluster the passive agent spent 8 s, twice, on its dead peer's
    server while the other two elected a leader and waited; its session ran out meanwhile and
    the takeover came 19.9 s after the power-off instead of by the fast path. The limit is what
    ZooKeeper's own Java client gives a connect, the session over the number of servers (kazoo
    gives the connect request that much already); a live server on a LAN accepts in
    milliseconds.
    """

    def __init__(self, limit: float) -> None:
        super().__init__()
        self._limit = limit

    def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.get("timeout")
        kwargs["timeout"] = self._limit if timeout is None else min(timeout, self._limit)
        return super().create_connection(*args, **kwargs)


_SESSIONS: Final = {
    KazooState.CONNECTED: Session.CONNECTED,
    KazooState.SUSPENDED: Session.SUSPENDED,
    KazooState.LOST: Session.LOST,
}


class CoordinatorSession:
    """The session and the calls every part of ``cluster.coordination.Coordinator`` builds on."""

    def __init__(
        self,
        hosts: str,
        cluster: str,
        node: str,
        *,
        session_timeout: float = 2.0,
        credentials: Credentials | None = None,
        readers: Sequence[str] = (),
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] = lambda: None,
        client: KazooClient | None = None,
    ) -> None:
        check_name("cluster", cluster)
        check_name("node", node)
        self.hosts = hosts
        self.cluster = cluster
        self.node = node
        self.session_timeout = session_timeout
        self._credentials = credentials
        self._wall = wall
        self._clock = clock
        self._on_change = on_change
        # A chroot is a prefix of our paths, not kazoo's: the agent creates its components too.
        servers, chroot = split_chroot(hosts)
        try:  # for the watchdog, which ends the session should the agent die
            self._servers = parse_servers(servers)
        except ValueError as exc:
            raise CoordinationError(f"ZooKeeper hosts {hosts!r}: {exc}") from None
        self._paths = Paths(f"{chroot}{ROOT}/{cluster}")
        self._acl: list[ACL] = credentials.acl(readers) if credentials else list(OPEN_ACL_UNSAFE)
        # Replies can only come while the session lives; waiting longer is waiting for nothing.
        self._io_timeout = max(session_timeout, 1.0)
        self._client = client or KazooClient(
            hosts=servers,
            timeout=session_timeout,
            handler=_BoundedConnect(session_timeout / max(len(self._servers), 1)),
            auth_data=[credentials.auth] if credentials else None,
            default_acl=self._acl,
            connection_retry=KazooRetry(
                max_tries=-1,
                delay=_RECONNECT_DELAY,
                backoff=_RECONNECT_BACKOFF,
                max_delay=_RECONNECT_MAX_DELAY,
            ),
        )
        self._lock = threading.Lock()
        self._session = Session.LOST
        self._watches: list[DataWatch | ChildrenWatch] = []
        self._last = ClusterView(session=Session.LOST)
        # When this coordinator first saw each other node without a member znode: its session
        # had ended on the server by then (the lease the fencing policy may rely on).
        self._absent_since: dict[str, float] = {}
        # The send time of the last read a server answered in this session: the server heard
        # from the session then or later (the base of ``session_deadline``).
        self._contact: float | None = None
        # The send time of the last sync the ensemble answered: its leader heard from this
        # session then, so the ensemble could commit (the base of ``confirmed_age``).
        self._confirmed: float | None = None
        # When kazoo last (re)connected, and whether this connection was already told to go.
        self._connected_at: float | None = None
        self._leaving = False
        self._problems: tuple[str, ...] = ()
        self._log = get_logger(component="coordination", cluster=cluster, node=node)

    # ------------------------------------------------------------------ session

    @property
    def client(self) -> KazooClient:
        """The kazoo client (for tests and diagnostics)."""
        return self._client

    @property
    def session(self) -> Session:
        """The session state as kazoo last reported it."""
        with self._lock:
            return self._session

    @property
    def problems(self) -> tuple[str, ...]:
        """The znodes whose content could not be read at the last ``view()`` or ``history()``."""
        return self._problems

    def start(self, timeout: float = 10.0) -> None:
        """Connect, create the cluster's znodes if needed, and install the watches."""
        self._client.add_listener(self._session_changed)
        try:
            self._client.start(timeout=timeout)
        except (KazooTimeoutError, KazooException) as exc:
            self._client.remove_listener(self._session_changed)
            raise CoordinationError(
                f"ZooKeeper at {self.hosts} unreachable: no session within {timeout:g}s ({exc})"
            ) from exc
        with self._lock:
            # kazoo returns from start() before it tells its listeners; a change reported by
            # then (a drop already) is newer than this, so only the initial state is replaced.
            if self._session is Session.LOST and self._client.connected:
                self._session = Session.CONNECTED
                self._connected_at = self._clock()
        paths = self._paths
        try:
            self._ensure_paths()
            watched = (
                paths.leader,
                paths.epoch,
                paths.paused,
                paths.switchover,
                paths.scheduled_switchover,
            )
            for path in watched:
                self._watches.append(DataWatch(self._client, path, self._data_changed))
            self._watches.append(ChildrenWatch(self._client, paths.members, self._members_changed))
        except CoordinationError:
            self.stop()
            raise
        except NoAuthError as exc:
            self.stop()
            raise CoordinationError(
                f"ZooKeeper at {self.hosts} denies {self._who()} access to {paths.root}: "
                "wrong credentials, or its znodes belong to another user"
            ) from exc
        except (KazooTimeoutError, KazooException) as exc:
            self.stop()
            raise CoordinationError(
                f"ZooKeeper at {self.hosts}: cannot set up {paths.root}: {exc!r}"
            ) from exc

    def stop(self) -> None:
        """Close the session: ephemeral znodes (member, leader) disappear at once."""
        try:
            self._client.stop()
            self._client.close()
        finally:
            with self._lock:
                self._session = Session.LOST

    def _session_changed(self, state: KazooState) -> None:
        with self._lock:
            self._session = _SESSIONS[state]
            self._leaving = False  # a new connection, or none: either way, not this one
            self._connected_at = self._clock() if self._session is Session.CONNECTED else None
            if self._session is not Session.CONNECTED:
                # Absences seen before a gap prove nothing about what happened during it: a node
                # may have come and gone. They are timed afresh from the next read.
                self._absent_since.clear()
            if self._session is Session.LOST:  # a new session starts without any contact
                self._contact = self._confirmed = None
        self._notify()

    def _data_changed(self, data: bytes | None, stat: ZnodeStat | None, event: object) -> None:
        self._notify()

    def _members_changed(self, children: list[str]) -> None:
        self._notify()

    def _notify(self) -> None:
        # Runs in kazoo's threads: a failing callback must not kill a watch.
        try:
            self._on_change()
        except Exception as exc:
            self._log.error("on_change failed", error=repr(exc))

    def session_handle(self) -> ZkSession | None:
        """This session as the watchdog needs it to end it when the agent dies: the servers, the
        id and password (kazoo's ``client_id``) and the credentials; None without a session."""
        client_id = self._client.client_id
        if client_id is None or not self._client.connected:
            return None
        session_id, password = client_id
        auth = (self._credentials.auth,) if self._credentials is not None else ()
        return ZkSession(self._servers, int(session_id), bytes(password), auth)

    def _session_id(self) -> int | None:
        client_id = self._client.client_id
        return None if client_id is None else int(client_id[0])

    def _ensure_paths(self) -> None:
        client, paths = self._client, self._paths
        if self.node == OPERATOR:
            # An operator's command looks at a cluster; it never creates one (a typo in the
            # cluster's name must be an error, not a new empty cluster).
            if self._wait(client.exists_async(paths.epoch)) is None:
                raise CoordinationError(
                    f"no cluster {self.cluster!r} in ZooKeeper at {self.hosts} "
                    "(no agent of that cluster has ever connected)"
                )
            self._wait(client.get_children_async(paths.root))
            return
        # Every path above the root too: a parent open to anyone lets anyone squat a cluster's
        # name and later delete what its agents write there (cluster/zk_acl.py).
        initial = {parent: (b"", self._acl) for parent in parents(paths.root)}
        initial |= {
            paths.root: (b"", self._acl),
            paths.members: (b"", self._acl),
            paths.epoch: (msgspec.json.encode(EpochRecord()), self._acl),
            paths.history: (b"[]", self._acl),
            paths.nodes: (b"", self._acl),
            paths.outdated: (b"", self._acl),
            paths.pulses: (b"", self._acl),
        }
        if self.node != OPERATOR:
            # Persistent: a node that ever joined stays known (and fenced before a takeover when
            # it is not connected and passive) until an operator forgets it.
            initial[paths.known(self.node)] = (b"", self._acl)
        for path, (data, acl) in initial.items():
            if self._wait(client.exists_async(path)) is None:
                try:
                    self._wait(client.create_async(path, data, acl=acl))
                except NodeExistsError:
                    pass  # another agent or command created it meanwhile
                except NoAuthError:
                    parent = path.rpartition("/")[0] or "/"
                    raise CoordinationError(
                        f"ZooKeeper at {self.hosts} denies {self._who()} access to create {path}: "
                        f"{parent} belongs to another user (wrong credentials, another cluster's, "
                        "or the administrator's); check agent.credentials, or give this cluster "
                        'a chroot of its own (agent.zookeeper = "host:2181,.../NAME")'
                    ) from None
        # Creating nothing proves nothing about access: read the cluster's root once.
        self._wait(client.get_children_async(paths.root))
        if self._credentials is None:
            self._log.warning(
                "ZooKeeperOpen",
                root=paths.root,
                why="no agent.credentials: any client of the ensemble may change "
                "or delete the cluster's znodes",
            )
            return
        try:
            fixes = secure(client, self._wait, paths.root, self._acl)
        except AclError as exc:
            raise CoordinationError(f"ZooKeeper at {self.hosts}: {exc}") from None
        for fix in fixes:
            if fix.fixed:
                self._log.warning("AclFixed", path=fix.path, before=fix.before)
            else:
                why = "anybody may create or delete under it; ask the ensemble's administrator"
                self._log.warning("AclOpen", path=fix.path, acl=fix.before, why=why)

    def _who(self) -> str:
        return f"user {self._credentials.user!r}" if self._credentials else "anonymous clients"

    # ------------------------------------------------------------------ reading

    def _wait(self, result: Any) -> Any:
        return result.get(timeout=self._io_timeout)

    def _fetch(self, result: Any) -> tuple[bytes, ZnodeStat] | None:
        try:
            data, stat = self._wait(result)
        except NoNodeError:
            return None
        return data, stat

    def _decode(self, path: str, data: bytes, kind: type[T], problems: list[str]) -> T | None:
        try:
            return msgspec.json.decode(data, type=kind)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            problems.append(f"{path}: {exc}")
            return None

    def _report(self, problems: list[str]) -> None:
        found = tuple(problems)
        if found and found != self._problems:
            self._log.warning("malformed znodes treated as absent", problems=list(found))
        self._problems = found

    @contextmanager
    def _kazoo(self, what: str) -> Iterator[None]:
        try:
            yield
        except NoAuthError as exc:
            raise CoordinationError(
                f"{what}: ZooKeeper denied access to {self._paths.root}"
            ) from exc
        except (KazooTimeoutError, KazooException) as exc:
            raise CoordinationError(f"{what}: {type(exc).__name__} {exc}".rstrip()) from exc

    def _require_connected(self, what: str) -> None:
        session = self.session
        if session is not Session.CONNECTED:
            raise CoordinationError(f"{what}: ZooKeeper session {session.value}")

    def touch(self) -> None:
        """Ask the ensemble's leader to confirm this session, without waiting for the answer: it
        dates the session's last contact (``session_deadline``) more finely than the reads of
        the cluster do, and the ensemble's (``confirmed_age``). A sync, not a read: a follower
        answers reads from memory while its leader is stopped, though nothing can be committed;
        a sync only once its leader has. The agent calls it often; a request lost with its
        connection dates nothing."""
        if self.session is not Session.CONNECTED:
            return
        sent = self._clock()
        try:
            pending = self._client.sync_async(self._paths.root)
        except KazooException:  # closed meanwhile: nothing to date
            return
        pending.rawlink(
            lambda done: self._heard(sent, confirmed=True) if done.successful() else None
        )

    def _heard(self, sent: float, *, confirmed: bool = False) -> None:
        """A server answered a request sent at ``sent``: it heard from this session then (and,
        ``confirmed``, so did the ensemble's leader)."""
        with self._lock:
            # Not over a session that ended meanwhile (an answer may come after its end).
            if self._session is not Session.CONNECTED:
                return
            if self._contact is None or self._contact <= sent:
                self._contact = sent
            if confirmed and (self._confirmed is None or self._confirmed <= sent):
                self._confirmed = sent

    def confirmed_age(self) -> float | None:
        """Seconds since the ensemble's leader last confirmed this session (a sync of ``touch``
        answered): what ``cluster.failsafe.cut_off`` goes by, since only a leader can commit a
        takeover. None before the first confirmation of a session."""
        with self._lock:
            confirmed = self._confirmed
        return None if confirmed is None else self._clock() - confirmed

    def silence(self) -> float | None:
        """Seconds this connection's server has answered nothing: since its last answer, or
        since the connection was made if later (an answer from a server left behind does not
        count for the next one). None while not connected."""
        with self._lock:
            since = self._connected_at
            if since is None or self._session is not Session.CONNECTED:
                return None
            if self._contact is not None:
                since = max(since, self._contact)
        return self._clock() - since

    def server(self) -> str:
        """The server this session is connected through (``address:port``), or "" if none."""
        sock = getattr(self._client._connection, "_socket", None)  # kazoo names it nowhere else
        try:
            address, port = sock.getpeername()[:2] if sock is not None else ("", 0)
        except OSError:  # closed meanwhile
            return ""
        return f"{address}:{port}" if address else ""

    def leave_server(self) -> bool:
        """Drop the connection to the current server; kazoo reconnects at once to the next one,
        in the same session (``cluster.failsafe.leave_server`` says when). False when this
        connection was already told to go, or none is up.

        kazoo has no public call for this: the request used is the one its own test harness
        sends (``KazooTestHarness.lose_connection``). kazoo's connection thread takes it in turn
        with the other requests, raises ConnectionDropped, fails what was pending with
        ConnectionLoss (as any drop does) and connects to the next server.
        tests/test_agent_zk_restart.py (a stopped server) fails should a kazoo release change it.
        """
        with self._lock:
            if self._leaving or self._session is not Session.CONNECTED:
                return False
            self._leaving = True
        try:
            # False: kazoo refused it (closed, expired): nothing to leave.
            queued = self._client._call(_CONNECTION_DROP, self._client.handler.async_result())
        except KazooException:  # closed meanwhile: nothing to leave
            return False
        return queued is not False

    def _session_deadline(self) -> float | None:
        """The last moment this session is surely alive on the server (monotonic), or None.

        The server expires a session when it has heard nothing from it for the session timeout
        (rounded up to its tick, never down). kazoo's own pings also count on the server, but
        kazoo does not say when they were answered, so only this coordinator's reads are used:
        a conservative deadline. The agent's session timeout is assumed to be what the server
        granted (ZooKeeper grants at most its maxSessionTimeout, 20 ticks by default).
        """
        with self._lock:
            contact = self._contact
        return None if contact is None else contact + self.session_timeout

    # ------------------------------------------------------------------ writing

    def _put(self, path: str, data: bytes) -> None:
        """Create or overwrite a persistent znode."""
        client = self._client
        try:
            self._wait(client.set_async(path, data))
        except NoNodeError:
            try:
                self._wait(client.create_async(path, data, acl=self._acl))
            except NodeExistsError:
                self._wait(client.set_async(path, data))

    def _delete(self, path: str) -> None:
        with suppress(NoNodeError):
            self._wait(self._client.delete_async(path))
