"""Leadership and its epoch in ZooKeeper: taking it (fast takeover's transaction too), giving it
up, confirming it, and recording that a takeover serves.

Two rules carry the safety of the whole cluster, and both are ZooKeeper's, not ours: the leader
znode is created in the same transaction that moves the epoch on, guarded by the epoch znode's
version, so two nodes can never both lead nor share a term; and it is ephemeral, so it goes with
the session of the node that holds it. Everything else in ``cluster.coordination`` is reading and
bookkeeping.
"""

from __future__ import annotations

import msgspec
from kazoo.exceptions import BadVersionError, KazooException, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError

from cluster.coordination_layout import (
    VERSION_RETRIES,
    CoordinationError,
    EpochRecord,
    LeaderRecord,
    ServedRecord,
)
from cluster.coordination_session import CoordinatorSession
from cluster.decision_data import Session


class Leadership(CoordinatorSession):
    """Taking, releasing and checking the leader znode and the epoch."""

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
                leader = self._decode(paths.leader, held[0], LeaderRecord, problems)
                found = None if leader is None else (leader.node, leader.epoch)
                if found != stale:
                    self._report(problems)
                    self._log.info("leadership not taken", stale=stale, found=found)
                    return None
                replaced = held[1].version
            record = self._decode(paths.epoch, data, EpochRecord, problems)
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
                msgspec.json.encode(EpochRecord(epoch, self.node, now)),
                version=stat.version,
            )
            transaction.create(
                paths.leader,
                msgspec.json.encode(LeaderRecord(self.node, epoch, now)),
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
            for _ in range(VERSION_RETRIES):
                got = self._fetch(client.get_async(path))
                if got is None:
                    return True
                data, stat = got
                if stat.ephemeralOwner != self._session_id():
                    return True
                if epoch != 0:
                    problems: list[str] = []
                    record = self._decode(path, data, LeaderRecord, problems)
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
        record = self._decode(path, data, LeaderRecord, [])
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
            record = self._decode(paths.epoch, data, EpochRecord, [])
            if record is None or record.epoch != epoch:
                return False
            served = ServedRecord(epoch, self.node, self._wall())
            self._put(paths.served, msgspec.json.encode(served))
        return True
