"""The agent's view of ZooKeeper and its writes there, through kazoo.

Znodes, all under ``/hamta/<cluster>``, all JSON:

- ``members/<node>`` (ephemeral): each agent's heartbeat, a ``cluster.decision_data.Member``.
- ``leader`` (ephemeral): ``{"node", "epoch", "since"}``; its owner session is the leader.
- ``epoch`` (persistent): ``{"epoch", "node", "at"}``, the highest term ever taken and by whom.
- ``history`` (persistent): the last 50 failover records.
- ``served`` (persistent): ``{"epoch", "node", "at"}``, the last takeover that served (published).
- ``paused`` (persistent, present while paused): ``{"by", "at", "reason"}``.
- ``switchover`` (persistent, present while requested): ``{"source", "target", "at"}``.
- ``monitors/<location>`` (ephemeral): each monitor's current verdicts (``monitor.cluster_link``).

Two rules carry the safety of the whole cluster, and both are ZooKeeper's, not ours: the leader
znode is created in the same transaction that moves the epoch on, guarded by the epoch znode's
version, so two nodes can never both lead nor share a term; and it is ephemeral, so it goes with
the session of the node that holds it. Everything else here is reading and bookkeeping.

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

import stat as stat_module
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    KazooException,
    NoAuthError,
    NodeExistsError,
    NoNodeError,
)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import ZnodeStat
from kazoo.recipe.watchers import ChildrenWatch, DataWatch
from kazoo.retry import KazooRetry
from kazoo.security import (
    ACL,
    OPEN_ACL_UNSAFE,
    Id,
    Permissions,
    make_digest_acl,
    make_digest_acl_credential,
)

from cluster.decision_data import (
    ClusterView,
    Leader,
    Member,
    Pause,
    ScheduledSwitchover,
    Session,
    Switchover,
)
from cluster.zk_acl import AclError, parents, secure, split_chroot
from fencing.zk_session import ZkSession, parse_servers
from hamta.eventlog import get_logger

ROOT: Final = "/hamta"
#: The node name of operator commands' sessions: they publish no member and are never fenced.
OPERATOR: Final = "operator"
HISTORY_LIMIT: Final = 50
# Writes guarded by a version are retried this many times against concurrent writers.
_VERSION_RETRIES: Final = 20
# The client reconnects quickly after an outage, never waiting more than this between tries.
_RECONNECT_MAX_DELAY: Final = 1.0
# ... and tries often at first: a restarted ZooKeeper server (its ensemble electing a leader)
# serves again within a few hundred milliseconds, and an active node whose connection dropped
# serves on only until its session deadline less the drain (cluster.state.session_doomed).
# 0.05 s growing by 1.3: eight rounds of tries within the first 1.2 s.
_RECONNECT_DELAY: Final = 0.05
_RECONNECT_BACKOFF: Final = 1.3

T = TypeVar("T")


class CoordinationError(Exception):
    """ZooKeeper could not be reached, refused access, or did not answer in time."""


@dataclass(frozen=True)
class Credentials:
    """The cluster's ZooKeeper digest user: the only identity allowed on its znodes."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def from_file(cls, path: Path) -> Credentials:
        """Read ``user:password`` (one line) from a file only its owner can read."""
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise CoordinationError(f"ZooKeeper credentials file {path} does not exist") from None
        except OSError as exc:
            raise CoordinationError(f"ZooKeeper credentials file {path}: {exc}") from exc
        if mode & 0o077:
            raise CoordinationError(
                f"ZooKeeper credentials file {path} is accessible to group or others "
                f"(mode {stat_module.S_IMODE(mode):04o}); make it private: chmod 600 {path}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CoordinationError(f"ZooKeeper credentials file {path}: {exc}") from exc
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        user, colon, password = lines[0].partition(":") if len(lines) == 1 else ("", "", "")
        if not (user and colon and password):
            # Never echo the content: it may hold a password.
            raise CoordinationError(
                f"ZooKeeper credentials file {path} must hold exactly one line 'user:password'"
            )
        return cls(user, password)

    @property
    def auth(self) -> tuple[str, str]:
        """The (scheme, credential) pair kazoo sends at every connection."""
        return ("digest", f"{self.user}:{self.password}")

    @property
    def digest_id(self) -> str:
        """``user:hash``, as an ACL names this user (no secret: the hash of the password)."""
        return str(make_digest_acl_credential(self.user, self.password))

    def acl(self, readers: Sequence[str] = ()) -> list[ACL]:
        """Every permission for this user, READ for each reader (``user:hash``), none for others.

        The readers are the fleet's (``agent.fleet_reader``): they may read every pair of the
        ensemble and change none (docs/fleet.md).
        """
        return [make_digest_acl(self.user, self.password, all=True), *reader_acl(readers)]


def reader_acl(readers: Sequence[str]) -> list[ACL]:
    """READ, and nothing else, for each digest identity ``user:hash`` of ``readers``."""
    return [ACL(Permissions.READ, Id("digest", reader)) for reader in readers]


class _LeaderRecord(msgspec.Struct):
    node: str
    epoch: int
    since: float


class _EpochRecord(msgspec.Struct):
    epoch: int = 0
    node: str | None = None
    at: float | None = None  # when the term was taken (wall clock of the taker)


class _ServedRecord(msgspec.Struct):
    """The last takeover that served (its promotion published: ACTIVE), whichever term it was."""

    epoch: int
    node: str
    at: float


_SESSIONS: Final = {
    KazooState.CONNECTED: Session.CONNECTED,
    KazooState.SUSPENDED: Session.SUSPENDED,
    KazooState.LOST: Session.LOST,
}


@dataclass(frozen=True)
class _Paths:
    root: str

    @property
    def members(self) -> str:
        return f"{self.root}/members"

    @property
    def leader(self) -> str:
        return f"{self.root}/leader"

    @property
    def epoch(self) -> str:
        return f"{self.root}/epoch"

    @property
    def history(self) -> str:
        return f"{self.root}/history"

    @property
    def paused(self) -> str:
        return f"{self.root}/paused"

    @property
    def switchover(self) -> str:
        return f"{self.root}/switchover"

    @property
    def nodes(self) -> str:
        return f"{self.root}/nodes"

    @property
    def scheduled_switchover(self) -> str:
        return f"{self.root}/scheduled-switchover"

    @property
    def outdated(self) -> str:
        return f"{self.root}/outdated"

    @property
    def split_brain(self) -> str:
        return f"{self.root}/split-brain"

    @property
    def served(self) -> str:
        return f"{self.root}/served"

    def outdated_node(self, node: str) -> str:
        return f"{self.outdated}/{node}"

    def member(self, node: str) -> str:
        return f"{self.members}/{node}"

    def known(self, node: str) -> str:
        return f"{self.nodes}/{node}"

    @property
    def monitors(self) -> str:
        return f"{self.root}/monitors"

    def monitor(self, location: str) -> str:
        return f"{self.monitors}/{location}"


def _check_name(kind: str, name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"invalid {kind} name for a znode: {name!r}")


class Coordinator:
    """One agent's (or one operator command's) session with ZooKeeper for one cluster."""

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
        _check_name("cluster", cluster)
        _check_name("node", node)
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
        self._paths = _Paths(f"{chroot}{ROOT}/{cluster}")
        self._acl: list[ACL] = credentials.acl(readers) if credentials else list(OPEN_ACL_UNSAFE)
        # Replies can only come while the session lives; waiting longer is waiting for nothing.
        self._io_timeout = max(session_timeout, 1.0)
        self._client = client or KazooClient(
            hosts=servers,
            timeout=session_timeout,
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
            if self._session is not Session.CONNECTED:
                # Absences seen before a gap prove nothing about what happened during it: a node
                # may have come and gone. They are timed afresh from the next read.
                self._absent_since.clear()
            if self._session is Session.LOST:  # a new session starts without any contact
                self._contact = None
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
            paths.epoch: (msgspec.json.encode(_EpochRecord()), self._acl),
            paths.history: (b"[]", self._acl),
            paths.nodes: (b"", self._acl),
            paths.outdated: (b"", self._acl),
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

    def view(self) -> ClusterView:
        """Read leader, epoch, members, pause and switchover now.

        Without a connected session (or when the read fails) the last view read is returned with
        the current session state; once the session is lost, a leadership it held is dropped.
        """
        if self.session is Session.CONNECTED:
            try:
                view = self._read()
            except (KazooTimeoutError, KazooException) as exc:
                self._log.warning("reading the cluster failed", error=repr(exc))
                with self._lock:
                    self._absent_since.clear()
            else:
                self._last = view
                return view
        return self.unanswered_view()

    def unanswered_view(self) -> ClusterView:
        """The last view read, with the current session state, without asking ZooKeeper: for a
        read that failed, or that the agent stopped waiting for (its session deadline is near
        and a silent server holds the read up)."""
        session = self.session
        if session is Session.CONNECTED:  # no answer, yet kazoo has not noticed yet
            session = Session.SUSPENDED
        leader = self._last.leader
        if session is Session.LOST and leader is not None and leader.ours:
            leader = None  # the session that owned the ephemeral znode is gone, and so is it
        deadline = self._session_deadline() if session is Session.SUSPENDED else None
        return replace(self._last, session=session, leader=leader, session_deadline=deadline)

    def touch(self) -> None:
        """Ask a server something trivial, without waiting for the answer: the answer dates the
        session's last contact (``session_deadline``) more finely than the reads of the cluster
        do. The agent calls it often; a request lost with its connection dates nothing."""
        if self.session is not Session.CONNECTED:
            return
        sent = self._clock()
        try:
            pending = self._client.exists_async(self._paths.root)
        except KazooException:  # closed meanwhile: nothing to date
            return
        pending.rawlink(lambda done: self._heard(sent) if done.successful() else None)

    def _heard(self, sent: float) -> None:
        """A server answered a request sent at ``sent``: it heard from this session then."""
        with self._lock:
            # Not over a session that ended meanwhile (an answer may come after its end).
            if self._session is Session.CONNECTED and (
                self._contact is None or self._contact <= sent
            ):
                self._contact = sent

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

    def _read(self) -> ClusterView:
        client, paths = self._client, self._paths
        session_id = self._session_id()
        sent = self._clock()
        # Pipelined: one round trip for the singletons, one for the members.
        pending = {
            path: client.get_async(path)
            for path in (paths.leader, paths.epoch, paths.paused, paths.switchover)
        }
        known_result = client.get_children_async(paths.nodes)
        outdated_result = client.get_children_async(paths.outdated)
        split_result = client.get_async(paths.split_brain)
        scheduled_result = client.get_async(paths.scheduled_switchover)
        served_result = client.get_async(paths.served)
        names = self._wait(client.get_children_async(paths.members))
        member_results = {name: client.get_async(paths.member(name)) for name in sorted(names)}
        found = {path: self._fetch(result) for path, result in pending.items()}
        problems: list[str] = []

        leader = None
        if (got := found[paths.leader]) is not None:
            record = self._decode(paths.leader, got[0], _LeaderRecord, problems)
            if record is not None:
                ours = session_id is not None and got[1].ephemeralOwner == session_id
                leader = Leader(record.node, record.epoch, record.since, ours=ours)
        epoch = _EpochRecord()
        if (got := found[paths.epoch]) is not None:
            epoch = self._decode(paths.epoch, got[0], _EpochRecord, problems) or epoch
        paused = None
        if (got := found[paths.paused]) is not None:
            paused = self._decode(paths.paused, got[0], Pause, problems)
        switchover = None
        if (got := found[paths.switchover]) is not None:
            switchover = self._decode(paths.switchover, got[0], Switchover, problems)
        # Absent until a takeover served (or in a cluster an older agent ran): then, as before,
        # the last acquisition counts.
        served = None
        if (got := self._fetch(served_result)) is not None:
            served = self._decode(paths.served, got[0], _ServedRecord, problems)
        scheduled = None
        if (got := self._fetch(scheduled_result)) is not None:
            scheduled = self._decode(
                paths.scheduled_switchover, got[0], ScheduledSwitchover, problems
            )
        members: dict[str, Member] = {}
        for name, result in member_results.items():
            got = self._fetch(result)
            if got is not None:
                member = self._decode(paths.member(name), got[0], Member, problems)
                if member is not None:
                    members[name] = member
        self._report(problems)
        try:
            known = frozenset(self._wait(known_result))
        except NoNodeError:
            known = frozenset()
        try:
            outdated = frozenset(self._wait(outdated_result))
        except NoNodeError:
            outdated = frozenset()
        split_brain = None
        if (got := self._fetch(split_result)) is not None:
            split_brain = got[0].decode(errors="replace") or "reported"
        others = (known | ({epoch.node} if epoch.node else set())) - {self.node}
        now = self._clock()
        # Absence is judged on the children list, not on records that could be decoded.
        with self._lock:
            for name in list(self._absent_since):
                if name in names or name not in others:
                    del self._absent_since[name]
            for name in others - set(names):
                self._absent_since.setdefault(name, now)
            absent_since = dict(self._absent_since)
        self._heard(sent)
        return ClusterView(
            session=Session.CONNECTED,
            session_deadline=self._session_deadline(),
            known_nodes=known,
            absent_since=absent_since,
            outdated=outdated,
            split_brain=split_brain,
            leader=leader,
            epoch=epoch.epoch,
            epoch_node=epoch.node,
            members=members,
            paused=paused,
            switchover=switchover,
            scheduled_switchover=scheduled,
            last_failover=epoch.at,
            last_served=served.at if served is not None else epoch.at,
        )

    def history(self) -> list[dict[str, Any]]:
        """The failover records, oldest first (empty when absent or unreadable)."""
        with self._kazoo("reading history"):
            got = self._fetch(self._client.get_async(self._paths.history))
        if got is None:
            return []
        problems: list[str] = []
        records = self._decode(self._paths.history, got[0], list[dict[str, Any]], problems)
        self._report(problems)
        return records or []

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

    def publish_member(self, member: Member) -> None:
        """Create or update this session's ephemeral member znode."""
        path = self._paths.member(member.node)
        data = msgspec.json.encode(member)
        client = self._client
        with self._kazoo("publishing member"):
            self._require_connected("publishing member")
            stat = self._wait(client.exists_async(path))
            if stat is not None and stat.ephemeralOwner == self._session_id():
                self._wait(client.set_async(path, data, version=stat.version))
                return
            if stat is not None:
                # Left by a previous session of this node that has not expired yet: updating it
                # would lose the heartbeat when that session goes.
                with suppress(NoNodeError):
                    self._wait(client.delete_async(path, version=stat.version))
            self._wait(client.create_async(path, data, acl=self._acl, ephemeral=True))

    # ------------------------------------------------------------------ monitors

    def publish_monitor(self, location: str, data: bytes) -> None:
        """Create or update this session's ephemeral znode of a check location's verdicts.

        The monitor's session is an operator's: it creates no cluster, only ``monitors`` (which
        an agent of an older version never made) and its own location's znode in it.
        """
        _check_name("location", location)
        path = self._paths.monitor(location)
        client = self._client
        with self._kazoo("publishing a monitor's verdicts"):
            self._require_connected("publishing a monitor's verdicts")
            if self._wait(client.exists_async(self._paths.monitors)) is None:
                with suppress(NodeExistsError):
                    self._wait(client.create_async(self._paths.monitors, b"", acl=self._acl))
            stat = self._wait(client.exists_async(path))
            if stat is not None and stat.ephemeralOwner == self._session_id():
                self._wait(client.set_async(path, data, version=stat.version))
                return
            if stat is not None:  # a previous session of this location's, not yet expired
                with suppress(NoNodeError):
                    self._wait(client.delete_async(path, version=stat.version))
            self._wait(client.create_async(path, data, acl=self._acl, ephemeral=True))

    def monitor_states(self) -> dict[str, bytes]:
        """Every check location's published verdicts (raw JSON), by location."""
        client, paths = self._client, self._paths
        with self._kazoo("reading the monitors' verdicts"):
            try:
                names = self._wait(client.get_children_async(paths.monitors))
            except NoNodeError:
                return {}
            pending = {name: client.get_async(paths.monitor(name)) for name in sorted(names)}
            found = {name: self._fetch(result) for name, result in pending.items()}
        return {name: got[0] for name, got in found.items() if got is not None}

    def acquire_leadership(self, stale: tuple[str, int] | None = None) -> int | None:
        """Take leadership and a new epoch in one transaction; None when another node won.

        The epoch znode's version guards the transaction, so of two racing nodes one wins and
        the other's transaction fails as a whole: never two leaders, never one epoch twice.

        ``stale`` (node, epoch): a leader znode the agent has fenced the holder of (its session
        may live on until it expires). If the leader znode is still that one, the same
        transaction deletes it, guarded by its version (a rewrite) and by the epoch znode's,
        read before it: a leader znode deleted and created again since has the same version
        (0), but every acquisition moved the epoch on, so the whole transaction fails.
        """
        client, paths = self._client, self._paths
        with self._kazoo("acquiring leadership"):
            self._require_connected("acquiring leadership")
            started = self._clock()
            replaced: int | None = None  # the stale leader znode's version
            problems: list[str] = []
            # The epoch first: see above (a replaced znode read after it is still the stale one).
            data, stat = self._wait(client.get_async(paths.epoch))
            if stale is None:
                if self._wait(client.exists_async(paths.leader)) is not None:
                    return None
            elif (held := self._fetch(client.get_async(paths.leader))) is not None:
                leader = self._decode(paths.leader, held[0], _LeaderRecord, problems)
                found = None if leader is None else (leader.node, leader.epoch)
                if found != stale:
                    self._report(problems)
                    self._log.info("leadership not taken", stale=stale, found=found)
                    return None
                replaced = held[1].version
            record = self._decode(paths.epoch, data, _EpochRecord, problems)
            self._report(problems)
            # Every write of the epoch znode bumps its version, so the version is a floor for any
            # epoch ever taken, even if the record were damaged or overwritten by hand.
            epoch: int = max(record.epoch if record else 0, stat.version) + 1
            now = self._wall()
            transaction = client.transaction()
            transaction.check(paths.epoch, stat.version)
            if replaced is not None:
                transaction.delete(paths.leader, version=replaced)
            transaction.set_data(
                paths.epoch,
                msgspec.json.encode(_EpochRecord(epoch, self.node, now)),
                version=stat.version,
            )
            transaction.create(
                paths.leader,
                msgspec.json.encode(_LeaderRecord(self.node, epoch, now)),
                acl=self._acl,
                ephemeral=True,
            )
            results = self._wait(transaction.commit_async())
        failures = [result for result in results if isinstance(result, Exception)]
        if failures:
            why = ", ".join(sorted({type(f).__name__ for f in failures}))
            self._log.info("leadership not taken", epoch=epoch, why=why)
            return None
        seconds = round(self._clock() - started, 4)
        self._log.info(
            "leadership taken",
            epoch=epoch,
            seconds=seconds,
            replaced=stale if replaced is not None else None,
        )
        return epoch

    def release_leadership(self, epoch: int) -> bool:
        """Delete the leader znode if this session holds it in ``epoch``.

        True when this session no longer leads in that term: deleted now, gone already, or held
        by another session. False when this session leads in another term. Epoch 0 releases
        whatever term this session holds (a stray leadership whose number the agent never learnt).
        """
        client, path = self._client, self._paths.leader
        with self._kazoo("releasing leadership"):
            for _ in range(_VERSION_RETRIES):
                got = self._fetch(client.get_async(path))
                if got is None:
                    return True
                data, stat = got
                if stat.ephemeralOwner != self._session_id():
                    return True
                if epoch != 0:
                    problems: list[str] = []
                    record = self._decode(path, data, _LeaderRecord, problems)
                    if record is None or record.epoch != epoch:
                        return False
                try:
                    self._wait(client.delete_async(path, version=stat.version))
                except NoNodeError:
                    return True
                except BadVersionError:
                    continue
                self._log.info("leadership released", epoch=epoch)
                return True
        raise CoordinationError("releasing leadership: the leader znode keeps changing")

    def still_leader(self, epoch: int) -> bool:
        """Whether this session holds the leader znode in ``epoch``, read fresh from the leader.

        False whenever that cannot be confirmed, including when ZooKeeper does not answer.
        """
        client, path = self._client, self._paths.leader
        if self.session is not Session.CONNECTED:
            return False
        try:
            # sync: the server we read from has caught up with the ZooKeeper leader.
            self._wait(client.sync_async(path))
            got = self._fetch(client.get_async(path))
        except (KazooTimeoutError, KazooException):
            return False
        if got is None:
            return False
        data, stat = got
        record = self._decode(path, data, _LeaderRecord, [])
        session_id = self._session_id()
        return (
            record is not None
            and record.epoch == epoch
            and session_id is not None
            and stat.ephemeralOwner == session_id
        )

    def mark_served(self, epoch: int) -> bool:
        """Record that the takeover of ``epoch`` serves (published), now: the anti-flapping
        interval counts from it (``ClusterView.last_served``).

        False when ``epoch`` is no longer the cluster's: a newer term was taken meanwhile.
        """
        client, paths = self._client, self._paths
        with self._kazoo("recording the takeover as serving"):
            data, _stat = self._wait(client.get_async(paths.epoch))
            record = self._decode(paths.epoch, data, _EpochRecord, [])
            if record is None or record.epoch != epoch:
                return False
            served = _ServedRecord(epoch, self.node, self._wall())
            self._put(paths.served, msgspec.json.encode(served))
        return True

    def record_failover(self, record: Mapping[str, Any]) -> None:
        """Append a record to the history, keeping the last 50."""
        client, path = self._client, self._paths.history
        entry = msgspec.to_builtins(dict(record))
        with self._kazoo("recording failover"):
            for _ in range(_VERSION_RETRIES):
                got = self._fetch(client.get_async(path))
                if got is None:
                    try:
                        self._wait(
                            client.create_async(path, msgspec.json.encode([entry]), acl=self._acl)
                        )
                    except NodeExistsError:
                        continue
                    return
                data, stat = got
                problems: list[str] = []
                entries = self._decode(path, data, list[Any], problems) or []
                self._report(problems)
                entries = [*entries, entry][-HISTORY_LIMIT:]
                try:
                    self._wait(
                        client.set_async(path, msgspec.json.encode(entries), version=stat.version)
                    )
                except BadVersionError:
                    continue  # another writer appended meanwhile: read again
                return
        raise CoordinationError("recording failover: the history keeps changing")

    def pause(self, by: str, reason: str = "") -> None:
        """Stop automatic failover until ``resume()``."""
        data = msgspec.json.encode(Pause(by, self._wall(), reason))
        with self._kazoo("pausing"):
            self._put(self._paths.paused, data)

    def resume(self) -> None:
        """Allow automatic failover again."""
        with self._kazoo("resuming"):
            self._delete(self._paths.paused)

    def request_switchover(
        self, source: str, target: str | None, stale_after: float
    ) -> Switchover | None:
        """Ask the active node ``source`` to hand over (to ``target``, or to any healthy peer).

        None when the request is made; else the request already in progress, left as it is: of
        two operators asking at once, one creates the znode and the other is told. A request
        older than ``stale_after`` seconds (the agents ignore it by then) is replaced.
        """
        data = msgspec.json.encode(Switchover(source, target, self._wall()))
        client, path = self._client, self._paths.switchover
        with self._kazoo("requesting switchover"):
            self._require_connected("requesting switchover")
            for _ in range(_VERSION_RETRIES):
                try:
                    self._wait(client.create_async(path, data, acl=self._acl))
                except NodeExistsError:
                    pass
                else:
                    return None
                got = self._fetch(client.get_async(path))
                if got is None:
                    continue  # done or withdrawn meanwhile: ask again
                existing = self._decode(path, got[0], Switchover, [])
                if existing is not None and self._wall() - existing.at <= stale_after:
                    return existing
                with suppress(NoNodeError, BadVersionError):
                    self._wait(client.delete_async(path, version=got[1].version))
        raise CoordinationError("requesting switchover: the request znode keeps changing")

    def clear_switchover(self) -> None:
        """Withdraw a switchover request (done or abandoned)."""
        with self._kazoo("clearing switchover"):
            self._delete(self._paths.switchover)

    def schedule_switchover(self, request: ScheduledSwitchover) -> ScheduledSwitchover | None:
        """Store a switchover to begin at ``request.due``: None when stored, else the one
        already scheduled, left as it is (cancel it first). Stored, not kept by the process
        that asked: the agents act on it when it is due (``cluster.state``), restarts or not."""
        data = msgspec.json.encode(request)
        client, path = self._client, self._paths.scheduled_switchover
        with self._kazoo("scheduling switchover"):
            self._require_connected("scheduling switchover")
            try:
                self._wait(client.create_async(path, data, acl=self._acl))
            except NodeExistsError:
                got = self._fetch(client.get_async(path))
                existing = (
                    None if got is None else self._decode(path, got[0], ScheduledSwitchover, [])
                )
                if existing is not None:
                    return existing
                raise CoordinationError(
                    "scheduling switchover: the schedule changed meanwhile; try again"
                ) from None
        return None

    def cancel_scheduled_switchover(self) -> bool:
        """Withdraw a scheduled switchover (done, or cancelled); whether there was one."""
        client, path = self._client, self._paths.scheduled_switchover
        with self._kazoo("cancelling the scheduled switchover"):
            try:
                self._wait(client.delete_async(path))
            except NoNodeError:
                return False
        return True

    # ------------------------------------------------------- DRBD resource-level fencing

    def mark_outdated(self, node: str, record: dict[str, Any], *, leader: str) -> int | None:
        """Record that ``node``'s replica missed writes, if ``leader`` still leads; its epoch.

        The epoch znode's version guards the write, as it guards a takeover: if leadership
        changed hands since it was read, the transaction fails and None says so (the mark of a
        node that just lost leadership must not outdate its successor).
        """
        _check_name("node", node)
        client, paths = self._client, self._paths
        with self._kazoo(f"marking {node} outdated"):
            self._require_connected(f"marking {node} outdated")
            with suppress(NodeExistsError):  # a cluster from before the marks existed
                self._wait(client.create_async(paths.outdated, b"", acl=self._acl))
            data, stat = self._wait(client.get_async(paths.epoch))
            problems: list[str] = []
            epoch = self._decode(paths.epoch, data, _EpochRecord, problems)
            self._report(problems)
            got = self._fetch(client.get_async(paths.leader))
            holder = self._decode(paths.leader, got[0], _LeaderRecord, problems) if got else None
            if epoch is None or holder is None or holder.node != leader:
                return None
            if holder.epoch != epoch.epoch:
                return None
            path = paths.outdated_node(node)
            exists = self._wait(client.exists_async(path)) is not None
            transaction = client.transaction()
            transaction.check(paths.epoch, stat.version)
            encoded = msgspec.json.encode({**record, "epoch": epoch.epoch})
            if exists:
                transaction.set_data(path, encoded)
            else:
                transaction.create(path, encoded, acl=self._acl)
            results = self._wait(transaction.commit_async())
        if any(isinstance(result, Exception) for result in results):
            return None
        return epoch.epoch

    def clear_outdated(self, node: str) -> bool:
        """``node``'s replica is up to date again; False when it was not marked."""
        _check_name("node", node)
        with self._kazoo(f"clearing the outdated mark of {node}"):
            self._require_connected(f"clearing the outdated mark of {node}")
            try:
                self._wait(self._client.delete_async(self._paths.outdated_node(node)))
            except NoNodeError:
                return False
        return True

    def report_split_brain(self, text: str) -> None:
        """DRBD found the replicas diverged: no automatic failover until an operator clears it."""
        with self._kazoo("reporting a split brain"):
            self._require_connected("reporting a split brain")
            self._put(self._paths.split_brain, text.encode())

    def clear_split_brain(self) -> bool:
        """An operator resolved the split brain; False when none was reported."""
        with self._kazoo("clearing the split brain"):
            self._require_connected("clearing the split brain")
            try:
                self._wait(self._client.delete_async(self._paths.split_brain))
            except NoNodeError:
                return False
        return True

    def forget(self, node: str) -> None:
        """Remove a decommissioned node from the known nodes, so that it is no longer fenced."""
        _check_name("node", node)
        with self._kazoo(f"forgetting {node}"):
            self._require_connected(f"forgetting {node}")
            if self._wait(self._client.exists_async(self._paths.member(node))) is not None:
                raise CoordinationError(f"{node} is connected: stop its agent first")
            with suppress(NoNodeError):
                self._wait(self._client.delete_async(self._paths.known(node)))
