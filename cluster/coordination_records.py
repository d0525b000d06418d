"""The operator's and the agents' bookkeeping records in ZooKeeper: the failover history, pause,
switchover requested now or scheduled, DRBD's outdated marks and split brain, known nodes."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from typing import Any

import msgspec
from kazoo.exceptions import BadVersionError, NodeExistsError, NoNodeError

from cluster.coordination_layout import (
    HISTORY_LIMIT,
    VERSION_RETRIES,
    CoordinationError,
    EpochRecord,
    LeaderRecord,
    check_name,
)
from cluster.coordination_session import CoordinatorSession
from cluster.decision_data import Pause, ScheduledSwitchover, Switchover


class OperatorRecords(CoordinatorSession):
    """History, pause, switchovers, outdated marks, split brain and known nodes."""

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

    def record_failover(self, record: Mapping[str, Any]) -> None:
        """Append a record to the history, keeping the last 50."""
        client, path = self._client, self._paths.history
        entry = msgspec.to_builtins(dict(record))
        with self._kazoo("recording failover"):
            for _ in range(VERSION_RETRIES):
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
            for _ in range(VERSION_RETRIES):
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
        check_name("node", node)
        client, paths = self._client, self._paths
        with self._kazoo(f"marking {node} outdated"):
            self._require_connected(f"marking {node} outdated")
            with suppress(NodeExistsError):  # a cluster from before the marks existed
                self._wait(client.create_async(paths.outdated, b"", acl=self._acl))
            data, stat = self._wait(client.get_async(paths.epoch))
            problems: list[str] = []
            epoch = self._decode(paths.epoch, data, EpochRecord, problems)
            self._report(problems)
            got = self._fetch(client.get_async(paths.leader))
            holder = self._decode(paths.leader, got[0], LeaderRecord, problems) if got else None
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
        check_name("node", node)
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
        check_name("node", node)
        with self._kazoo(f"forgetting {node}"):
            self._require_connected(f"forgetting {node}")
            if self._wait(self._client.exists_async(self._paths.member(node))) is not None:
                raise CoordinationError(f"{node} is connected: stop its agent first")
            with suppress(NoNodeError):
                self._wait(self._client.delete_async(self._paths.known(node)))
