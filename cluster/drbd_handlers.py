"""DRBD's handlers, backed by the cluster's ZooKeeper: resource-level fencing without Pacemaker.

DRBD calls its ``fence-peer`` handler (``disk { fencing resource-only; }``, or
``resource-and-stonith`` to freeze I/O until the handler answers) when a Primary loses its
replication link, or when a node is promoted without knowing its peer's disk. A peer that is
still connected to ZooKeeper but not to DRBD keeps a disk that looks ``UpToDate`` to itself
while the Primary goes on writing: promoted later, it would serve a spool without the mail
acknowledged since. So the handler of the node that leads the cluster marks the peer outdated
in ZooKeeper (``/hamta/<cluster>/outdated/<peer>``), which the peer's agent honours: it never
takes over while marked. DRBD's ``after-resync-target`` handler, run on the peer once a resync
made its disk current again, clears the mark.

Exit codes follow DRBD's fence-peer convention: 4 the peer is fenced (marked outdated), 6 this
node should outdate itself (it does not lead: the peer is, or may become, the Primary with the
better data), 1 the handler could not decide (ZooKeeper unreachable; DRBD keeps I/O frozen with
``resource-and-stonith``, which is the safe outcome).

A split brain that DRBD detects on reconnection is reported (``split-brain`` handler) and stops
automatic failover until an operator has chosen the survivor, resynced, and run
``hamta drbd clear-split-brain``: hamta never resolves one by discarding data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cluster.coordination import Coordinator
from cluster.coordination_layout import CoordinationError
from cluster.decision_data import ClusterView, Session

EXIT_FAILED = 1
EXIT_PEER_OUTDATED = 4  # "peer has been successfully fenced"
EXIT_OUTDATE_YOURSELF = 6  # "please outdate yourself, the peer is (or may be) primary"


@dataclass(frozen=True)
class Verdict:
    """What a handler did: DRBD's exit code and a line for its log."""

    code: int
    message: str


def _connected_view(coordinator: Coordinator) -> ClusterView:
    view = coordinator.view()
    if view.session is not Session.CONNECTED:
        raise CoordinationError(f"not connected to ZooKeeper ({view.session.value})")
    return view


def peer_of(view: ClusterView, node: str, named: str | None) -> str:
    """The peer DRBD means: the one named (``DRBD_PEER``), else the only other known node."""
    others = sorted((view.known_nodes | set(view.members)) - {node})
    if named:
        if named not in others:
            # DRBD's host name is not a node name of this cluster: marking it would outdate
            # nobody while DRBD believes the peer fenced.
            raise CoordinationError(f"{named} is not a node of this cluster ({others or 'none'})")
        return named
    if len(others) != 1:
        raise CoordinationError(
            f"cannot tell which node is the peer among {others or 'none'}: pass --peer"
        )
    return others[0]


def fence_peer(
    coordinator: Coordinator,
    node: str,
    resource: str,
    peer: str | None = None,
    wall: Callable[[], float] = time.time,
) -> Verdict:
    """DRBD's ``fence-peer``: mark the peer outdated if this node leads, else outdate ourself."""
    try:
        view = _connected_view(coordinator)
        target = peer_of(view, node, peer)
        leader = view.leader
        if leader is None or leader.node != node:
            holder = leader.node if leader is not None else "nobody"
            return Verdict(
                EXIT_OUTDATE_YOURSELF,
                f"{node} does not lead the cluster ({holder} does): {node} outdates itself",
            )
        epoch = coordinator.mark_outdated(
            target, {"by": node, "resource": resource, "at": wall()}, leader=node
        )
    except CoordinationError as exc:
        return Verdict(EXIT_FAILED, f"cannot fence the peer of {resource}: {exc}")
    if epoch is None:  # leadership changed hands while we decided
        return Verdict(
            EXIT_OUTDATE_YOURSELF, f"{node} lost leadership before marking {target}: outdate itself"
        )
    return Verdict(
        EXIT_PEER_OUTDATED,
        f"{target} marked outdated for {resource} by {node}, leader in epoch {epoch}",
    )


def unfence(coordinator: Coordinator, node: str, resource: str) -> Verdict:
    """DRBD's ``after-resync-target`` on ``node``: its disk is current again; clear its mark."""
    try:
        _connected_view(coordinator)
        cleared = coordinator.clear_outdated(node)
    except CoordinationError as exc:
        return Verdict(EXIT_FAILED, f"cannot clear the outdated mark of {node}: {exc}")
    what = "cleared" if cleared else "was not set"
    return Verdict(0, f"{resource} resynced on {node}: its outdated mark {what}")


def report_split_brain(
    coordinator: Coordinator, node: str, resource: str, wall: Callable[[], float] = time.time
) -> Verdict:
    """DRBD's ``split-brain``: record it; automatic failover stops until an operator clears it."""
    text = f"DRBD reported a split brain of {resource} on {node} at {time.ctime(wall())}"
    try:
        coordinator.report_split_brain(text)
    except CoordinationError as exc:
        return Verdict(EXIT_FAILED, f"cannot record the split brain of {resource}: {exc}")
    return Verdict(0, text + "; automatic failover stopped until 'hamta drbd clear-split-brain'")


def resource_of(environ: Mapping[str, str], named: str | None) -> str:
    """The DRBD resource: ``--resource``, else ``DRBD_RESOURCE`` as drbdadm exports it."""
    resource = named or environ.get("DRBD_RESOURCE", "")
    if not resource:
        raise ValueError("no DRBD resource: pass --resource or set DRBD_RESOURCE")
    return resource
