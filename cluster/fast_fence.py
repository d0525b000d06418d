"""The agent's half of DRBD's fast fence-peer path: the mark and the marker, before ``primary``.

``cluster.fence_marker`` (DRBD's handler) answers "peer fenced" from a local marker; this module
writes it, in this order, on the promoting node: the node's term when it takes leadership; then,
in the storage step and only if DRBD does not know the peer's disk (the case where
``drbdadm primary`` calls the handler), the peer's outdated mark in ZooKeeper, guarded by the
epoch, and after it the marker, both durable before ``drbdadm primary`` runs. The marker is removed
when the storage step ends, whatever its outcome. Any failure here costs only speed: without a
marker, DRBD's handler falls back to the full one.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cluster.coordination import Coordinator
from cluster.coordination_layout import CoordinationError
from cluster.fence_marker import TERM_FILE, Marker, marker_name
from hamta.durable_files import fsync_directory, write_durably


class FastFence:
    """Writes the term and the marker DRBD's fast handler reads (``cluster.fence_marker``)."""

    def __init__(
        self,
        *,
        coordinator: Coordinator,
        node: str,
        resource: str,
        directory: Path,
        valid: float,
        fence_expected: Callable[[], bool],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.coordinator = coordinator
        self.node = node
        self.resource = resource
        self.directory = directory
        self.valid = valid
        # `drbdadm primary` would call fence-peer: local disk UpToDate, the peer's DUnknown.
        self.fence_expected = fence_expected
        self.wall = wall

    @property
    def marker(self) -> Path:
        """Where the marker of this resource is written."""
        return self.directory / marker_name(self.resource)

    def enter_term(self, epoch: int) -> None:
        """Record durably that this node now leads in ``epoch`` (markers of others are stale)."""
        write_durably(self.directory, TERM_FILE, json.dumps({"term": epoch}).encode())

    def arm(self, epoch: int, peers: Sequence[str]) -> str:
        """Mark the fenced peer outdated in ZooKeeper, then write the marker; what was done.

        Nothing is written (and the full handler will answer) unless exactly one peer was fenced,
        DRBD does not know its disk and ours is UpToDate: a peer DRBD still reaches receives
        every write, and a promotion refused for our own disk must not leave the peer marked
        too; either way it could never take over again (only a resync clears the mark).
        """
        if len(peers) != 1:
            return "fast fence-peer path unused: no single fenced peer"
        peer = peers[0]
        if not self.fence_expected():
            return f"fast fence-peer path unused: DRBD knows {peer}'s disk, or ours is not current"
        record = {"by": self.node, "resource": self.resource, "at": self.wall()}
        try:
            marked = self.coordinator.mark_outdated(peer, record, leader=self.node)
        except CoordinationError as exc:
            return f"fast fence-peer path unused: {exc}"
        if marked != epoch:
            return f"fast fence-peer path unused: leadership of epoch {epoch} lost"
        marker = Marker(epoch, self.resource, peer, self.wall(), self.valid)
        write_durably(self.directory, marker_name(self.resource), marker.encode())
        return f"{peer} marked outdated in epoch {epoch}, marker written"

    def disarm(self) -> None:
        """Remove the marker (the promotion that wrote it is over); idempotent."""
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()
            fsync_directory(self.directory)
