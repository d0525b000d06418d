"""The leader's pulse in ZooKeeper: a second witness of its life besides the peer channel.

A node that may hold the leader znode rewrites its ephemeral ``pulses/<node>`` every
``peer_timeout / 4`` (``pulse``: one write, not waited for). Its peer watches that znode
(``watch_pulses``) and notes, on its own monotonic clock, when each advance arrived; the agent
puts the ages in the snapshot (``pulse_ages``), and ``cluster.takeover.silent_leader`` fences a
leader only when its heartbeats over the channel and its pulse have both stopped. So a cut of
the channel alone, with both nodes still reaching ZooKeeper, fences nobody.

No two machines' clocks are compared: an advance is a change of the znode's ``mzxid`` seen by
the watcher, dated when it arrived. An age counts only while this session is connected: from
the later of the last advance seen and the moment the connection was (re)established, since
advances missed while cut off prove nothing either way (kazoo's watch reads the znode again on
every reconnection; an unchanged ``mzxid`` is no advance).

Cost per pair (one node pulsing): ``4 / peer_timeout`` writes per second, as many watch events
at the peer, and as many reads (kazoo's watch reads the data with each event).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Any

import msgspec
from kazoo.client import KazooState
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.protocol.states import ZnodeStat
from kazoo.recipe.watchers import DataWatch

from cluster.coordination_layout import PulseRecord, check_name
from cluster.coordination_session import CoordinatorSession
from cluster.decision_data import Session

PulseWatcher = Callable[[bytes | None, ZnodeStat | None, object], None]


class Pulses(CoordinatorSession):
    """This node's pulse written, and its peers' pulses watched."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pulse_lock = threading.Lock()
        self._pulse_seen: dict[str, tuple[int, float]] = {}  # node: (mzxid, arrived at)
        self._pulse_connected = self._clock()  # when this connection was (re)established

    def watch_pulses(self, peers: Iterable[str]) -> None:
        """Watch each peer's pulse from now on (after ``start``; kazoo keeps the watches across
        reconnections and sessions)."""
        with self._pulse_lock:
            self._pulse_connected = self._clock()
        self._client.add_listener(self._pulse_session)
        for peer in sorted(set(peers) - {self.node}):
            check_name("node", peer)
            watcher = self._pulse_watcher(peer)
            self._watches.append(DataWatch(self._client, self._paths.pulse(peer), watcher))

    def _pulse_session(self, state: KazooState) -> None:
        if state == KazooState.CONNECTED:
            with self._pulse_lock:
                self._pulse_connected = self._clock()

    def _pulse_watcher(self, peer: str) -> PulseWatcher:
        def changed(data: bytes | None, stat: ZnodeStat | None, event: object) -> None:
            arrived = self._clock()
            with self._pulse_lock:
                if stat is None:  # gone with its session, or never written
                    self._pulse_seen.pop(peer, None)
                    return
                seen = self._pulse_seen.get(peer)
                if seen is None or seen[0] != stat.mzxid:
                    self._pulse_seen[peer] = (stat.mzxid, arrived)

        return changed

    def pulse_ages(self) -> tuple[tuple[str, float], ...]:
        """For each watched peer whose pulse znode exists: seconds since it last advanced, as
        seen while connected (``Snapshot.pulse_ages``); nothing while not connected."""
        if self.session is not Session.CONNECTED:
            return ()
        now = self._clock()
        with self._pulse_lock:
            since = self._pulse_connected
            return tuple(
                (node, round(now - max(at, since), 6))
                for node, (_, at) in sorted(self._pulse_seen.items())
            )

    def pulse(self, epoch: int, beat: int) -> None:
        """Advance this node's pulse: one write, not waited for (a pulse that fails is followed
        by the next; a missing znode is created, ephemeral, in this session)."""
        if self.session is not Session.CONNECTED:
            return
        path = self._paths.pulse(self.node)
        data = msgspec.json.encode(PulseRecord(self.node, epoch, beat))
        client = self._client

        def written(pending: Any) -> None:
            try:
                pending.get_nowait()
            except NoNodeError:  # the first pulse of this session
                # Closed meanwhile: the next pulse tries again.
                with suppress(KazooException):
                    client.create_async(path, data, acl=self._acl, ephemeral=True)
            except Exception as exc:  # the next pulse tries again
                self._log.debug("PulseFailed", error=repr(exc))

        try:
            client.set_async(path, data).rawlink(written)
        except KazooException:  # closed meanwhile
            return
