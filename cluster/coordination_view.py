"""What a coordinator reads of the cluster (its view, for the agent's decisions) and what each
process publishes for the others to read: agents' members, monitors' verdicts."""

from __future__ import annotations

from contextlib import suppress
from dataclasses import replace

import msgspec
from kazoo.exceptions import KazooException, NodeExistsError, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError

from cluster.coordination_layout import EpochRecord, LeaderRecord, ServedRecord, check_name
from cluster.coordination_session import CoordinatorSession
from cluster.decision_data import (
    ClusterView,
    Leader,
    Member,
    Pause,
    ScheduledSwitchover,
    Session,
    Switchover,
)


class ClusterReads(CoordinatorSession):
    """The cluster's view, members and monitors."""

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
            record = self._decode(paths.leader, got[0], LeaderRecord, problems)
            if record is not None:
                ours = session_id is not None and got[1].ephemeralOwner == session_id
                leader = Leader(record.node, record.epoch, record.since, ours=ours)
        epoch = EpochRecord()
        if (got := found[paths.epoch]) is not None:
            epoch = self._decode(paths.epoch, got[0], EpochRecord, problems) or epoch
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
            served = self._decode(paths.served, got[0], ServedRecord, problems)
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
        check_name("location", location)
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
