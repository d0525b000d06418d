"""What an operator asks of a cluster: its status, its failover history, pause, switchover.

Each command opens a short ZooKeeper session of its own (as node ``operator``, which publishes
no member), reads or writes, and closes it. Output is a table for people and ``--json`` for
scripts; errors are one clear sentence and a non-zero exit.
"""

from __future__ import annotations

import getpass
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from cluster.config import AgentConfig
from cluster.coordination import Coordinator
from cluster.coordination_layout import OPERATOR, Credentials
from cluster.decision_data import (
    ClusterView,
    Member,
    Role,
    ScheduledSwitchover,
    Session,
    Switchover,
)
from cluster.takeover import takeover_refusal


class OperatorError(Exception):
    """The command cannot be carried out; the message says why."""


class OperatorSession:
    """A short-lived coordinator session, and an event set on every change it watches."""

    def __init__(self, coordinator: Coordinator, changed: threading.Event) -> None:
        self.coordinator = coordinator
        self.changed = changed

    def wait_for_change(self, timeout: float) -> None:
        """Block until ZooKeeper reports a change or ``timeout`` passes."""
        self.changed.wait(timeout)
        self.changed.clear()


@contextmanager
def operator_session(
    config: AgentConfig, timeout: float | None = None
) -> Iterator[OperatorSession]:
    """A short-lived coordinator session with the cluster's credentials.

    ``timeout``: to reach ZooKeeper (default: ``agent.connect_timeout``).
    """
    agent = config.agent
    credentials = Credentials.from_file(agent.credentials) if agent.credentials else None
    changed = threading.Event()
    coordinator = Coordinator(
        agent.zookeeper,
        agent.cluster,
        OPERATOR,
        session_timeout=max(agent.session_timeout, 4.0),
        credentials=credentials,
        readers=(agent.fleet_reader,) if agent.fleet_reader else (),
        on_change=changed.set,
    )
    coordinator.start(agent.connect_timeout if timeout is None else timeout)
    try:
        yield OperatorSession(coordinator, changed)
    finally:
        coordinator.stop()


def _heartbeat_limit(heartbeat: float) -> float:
    """How old a member's heartbeat may be: three missed, and a second of slack."""
    return 3 * heartbeat + 1.0


def _fresh(member: Member, now: float, heartbeat: float) -> bool:
    return now - member.heartbeat <= _heartbeat_limit(heartbeat)


def fresh_view(coordinator: Coordinator) -> ClusterView:
    """The cluster as ZooKeeper says it now, or OperatorError: never a remembered view."""
    view = coordinator.view()
    if view.session is not Session.CONNECTED:
        raise OperatorError(f"lost the ZooKeeper session ({view.session.value}); try again")
    return view


def cluster_status(
    coordinator: Coordinator, config: AgentConfig, wall: Callable[[], float] = time.time
) -> dict[str, Any]:
    """The cluster as data: nodes, roles, epoch, health, who holds the virtual IP, history."""
    view = fresh_view(coordinator)
    history = coordinator.history()
    now = wall()
    leader = view.leader
    nodes = []
    for name, member in sorted(view.members.items()):
        holds = (
            leader is not None
            and leader.node == name
            and member.role is Role.ACTIVE
            and member.epoch == leader.epoch
        )
        nodes.append(
            {
                "node": name,
                "role": member.role.value,
                "epoch": member.epoch,
                "relay_running": member.relay_running,
                "relay_ready": member.relay_ready,
                "queue_depth": member.queue_depth,
                "heartbeat_age_s": round(now - member.heartbeat, 2),
                "fresh": _fresh(member, now, config.agent.heartbeat),
                "cooldown": member.cooldown,
                "vip": holds,
                "smtp": member.smtp,
                "api": member.api or None,
                "channel_silent": member.channel_silent or None,
            }
        )
    last = history[-1] if history else None
    return {
        "cluster": config.agent.cluster,
        "epoch": view.epoch,
        "leader": leader.node if leader else None,
        "leader_epoch": leader.epoch if leader else None,
        "vip": config.vip.address or None,
        "vip_holder": next((n["node"] for n in nodes if n["vip"]), None),
        "paused": (
            {"by": view.paused.by, "at": view.paused.at, "reason": view.paused.reason}
            if view.paused
            else None
        ),
        "switchover": (
            {"source": view.switchover.source, "target": view.switchover.target}
            if view.switchover
            else None
        ),
        "scheduled_switchover": _scheduled(view.scheduled_switchover, now),
        "last_failover": last,
        "since_last_failover_s": round(now - float(last["at"]), 1) if last else None,
        "outdated": sorted(view.outdated),
        "split_brain": view.split_brain,
        "nodes": nodes,
    }


def is_standby(status: dict[str, Any] | None, node: str) -> bool:
    """Whether ``status`` (:func:`cluster_status`) shows ``node`` as a fresh passive node whose
    warm relay runs: ready to take over."""
    return any(
        member.get("node") == node
        and member.get("role") == "passive"
        and member.get("fresh")
        and member.get("relay_running")
        for member in (status or {}).get("nodes", [])
    )


def format_status(status: dict[str, Any]) -> str:
    """``hamta cluster status`` as a table."""
    lines = [
        f"cluster {status['cluster']}   epoch {status['epoch']}   "
        f"leader {status['leader'] or '-'}   virtual IP {status['vip'] or '-'} "
        f"on {status['vip_holder'] or 'nobody'}"
    ]
    if status["paused"]:
        paused = status["paused"]
        lines.append(f"PAUSED by {paused['by']}: {paused['reason'] or 'no reason given'}")
    if status["switchover"]:
        lines.append(f"switchover requested to {status['switchover']['target'] or 'any peer'}")
    if scheduled := status.get("scheduled_switchover"):
        due = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(scheduled["due"]))
        when = f"in {scheduled['in_s']:.0f}s" if scheduled["in_s"] > 0 else "due now"
        lines.append(
            f"switchover scheduled at {due} ({when}) from {scheduled['source']} to "
            f"{scheduled['target'] or 'any peer'}, by {scheduled['by'] or '-'}"
        )
    if status.get("split_brain"):
        lines.append(f"SPLIT BRAIN: {status['split_brain']} (no automatic failover)")
    for node in status.get("outdated", []):
        lines.append(f"OUTDATED: {node}'s replica missed writes; it will not take over")
    since = status["since_last_failover_s"]
    lines.append(f"last failover: {f'{since:.0f}s ago' if since is not None else 'never'}")
    header = ("node", "role", "epoch", "relay", "queue", "heartbeat", "vip")
    rows = [header]
    for node in status["nodes"]:
        relay = "ready" if node["relay_ready"] else ("warm" if node["relay_running"] else "down")
        role = node["role"] + (" (cooldown)" if node["cooldown"] else "")
        age = f"{node['heartbeat_age_s']:.1f}s" + ("" if node["fresh"] else " STALE")
        rows.append(
            (
                node["node"],
                role,
                str(node["epoch"]),
                relay,
                str(node["queue_depth"]),
                age,
                "yes" if node["vip"] else "",
            )
        )
    for node in status["nodes"]:
        if node.get("channel_silent"):
            lines.append(
                f"PEER CHANNEL CUT: {node['node']} hears nothing from {node['channel_silent']} "
                "over the peer channel, yet its pulse in ZooKeeper advances (no fence; mend the "
                "channel: the fast takeover and failsafe need it)"
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    if len(rows) == 1:
        lines.append("(no agent is connected)")
    return "\n".join(line.rstrip() for line in lines)


LOCAL_STATUS = "status.json"  # in the agent's state_dir: its role and failsafe, by itself


def local_status(config: AgentConfig) -> dict[str, Any] | None:
    """What this node's agent last wrote about itself (None: no file, or not readable), for
    when ZooKeeper cannot be read: a node serving in failsafe says so there."""
    try:
        data = json.loads((Path(config.agent.state_dir) / LOCAL_STATUS).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def format_local_status(status: dict[str, Any], wall: float) -> str:
    """One line: this node's agent, as of its last decision that changed something."""
    line = f"this node ({status.get('node')}), by its agent: {status.get('role')}"
    line += f", epoch {status.get('epoch')}, session {status.get('session')}"
    since = status.get("failsafe_since")
    if isinstance(since, int | float):
        stamp = time.strftime("%H:%M:%S", time.gmtime(since))
        line += f", serving in failsafe since {stamp} UTC ({wall - since:.0f}s)"
    written = status.get("written")
    if isinstance(written, int | float):
        line += f" (written {wall - written:.0f}s ago)"
    return line


def format_history(history: list[dict[str, Any]]) -> str:
    """``hamta cluster history`` as a table, newest last, with every step's time."""
    if not history:
        return "no failover recorded"
    lines = []
    for record in history:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("at", 0))))
        steps = record.get("steps", {})
        timings = " ".join(
            f"{step}={float(seconds) * 1000:.0f}ms" for step, seconds in steps.items()
        )
        lines.append(
            f"{at}  epoch {record.get('epoch')}  {record.get('previous') or '-'} -> "
            f"{record.get('node')}  ({record.get('reason')})  total {record.get('total')}s"
        )
        lines.append(f"    {timings}")
    return "\n".join(lines)


def _scheduled(scheduled: ScheduledSwitchover | None, now: float) -> dict[str, Any] | None:
    if scheduled is None:
        return None
    return {
        "source": scheduled.source,
        "target": scheduled.target,
        "due": scheduled.due,
        "at": scheduled.at,
        "by": scheduled.by,
        "in_s": round(scheduled.due - now, 1),
    }


def parse_time(text: str, wall: float) -> float:
    """An ISO 8601 time with its zone ("2026-12-07T09:00:00Z", "...+01:00") as wall-clock
    seconds, later than ``wall``; OperatorError says what is wrong with it."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise OperatorError(
            f"{text!r} is not a time: give it in ISO 8601 with its zone, "
            "as in 2026-12-07T09:00:00Z or 2026-12-07T10:00:00+01:00"
        ) from None
    if parsed.tzinfo is None:
        raise OperatorError(f"{text!r} has no time zone: add Z (UTC) or an offset such as +01:00")
    due = parsed.timestamp()
    if due <= wall:
        raise OperatorError(f"{text!r} is in the past: a scheduled switchover is for later")
    return due


def schedule_switchover(
    coordinator: Coordinator,
    target: str | None,
    due: float,
    by: str,
    wall: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """Store a switchover from the active node to ``target`` (None: any healthy peer) at
    ``due``; the agents carry it out then (``cluster.state.scheduled_switchover_due``). Who may
    take over is checked again at that time by the active node, as for any switchover."""
    view = fresh_view(coordinator)
    leader = view.leader
    if leader is None:
        raise OperatorError("no node is active: there is nothing to switch over")
    if target == leader.node:
        raise OperatorError(f"{target} is already the active node")
    if target is not None and target not in view.known_nodes:
        raise OperatorError(f"{target} is not a node of the cluster")
    now = wall()
    request = ScheduledSwitchover(leader.node, target, due, now, by)
    existing = coordinator.schedule_switchover(request)
    if existing is not None:
        raise OperatorError(
            f"a switchover is already scheduled from {existing.source} to "
            f"{existing.target or 'any peer'} in {existing.due - now:.0f}s; cancel it first"
        )
    scheduled = _scheduled(request, now)
    assert scheduled is not None
    return scheduled


def cancel_switchover(coordinator: Coordinator) -> bool:
    """Withdraw the scheduled switchover; whether there was one."""
    return coordinator.cancel_scheduled_switchover()


def pause_failover(coordinator: Coordinator, by: str, reason: str) -> str:
    """Maintenance: no automatic failover until :func:`resume_failover`."""
    coordinator.pause(by, reason)
    return "paused: no automatic failover until 'hamta cluster resume'"


def resume_failover(coordinator: Coordinator) -> str:
    """Automatic failover on again."""
    coordinator.resume()
    return "resumed: automatic failover is on"


def who() -> str:
    """The operator, as recorded with a pause."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def in_progress(request: Switchover, wall: float) -> OperatorError:
    """The error of a switchover asked for while another one is under way."""
    return OperatorError(
        f"a switchover from {request.source} to {request.target or 'any peer'} is in progress "
        f"(requested {max(wall - request.at, 0):.0f}s ago); wait for it to finish "
        "(hamta cluster status)"
    )


def choose_switchover_target(
    view: ClusterView, target: str | None, heartbeat: float, stale_after: float, wall: float
) -> str:
    """Check a switchover request against the cluster at wall clock ``wall``; the chosen target
    or OperatorError. Who may take over is ``cluster.takeover.takeover_refusal``'s to say, the very
    rule the active node applies before it hands over and the target before it promotes."""
    if view.switchover is not None and wall - view.switchover.at <= stale_after:
        # During a hand-over nobody leads for a moment: that is not "no node is active".
        raise in_progress(view.switchover, wall)
    leader = view.leader
    if leader is None:
        raise OperatorError("no node is active: there is nothing to switch over")
    if target == leader.node:
        raise OperatorError(f"{target} is already the active node")
    fresh = _heartbeat_limit(heartbeat)

    def refusal(member: Member) -> str | None:
        return takeover_refusal(member, view, wall, stale_after=fresh)

    if target is not None:
        member = view.members.get(target)
        if member is None:
            raise OperatorError(f"{target} is not a member of the cluster (no agent connected)")
        why = refusal(member)
        if why is not None:
            raise OperatorError(f"{target} cannot take over: {why}")
        return target
    candidates = [
        name
        for name, member in sorted(view.members.items())
        if name != leader.node and refusal(member) is None
    ]
    if not candidates:
        others = [(n, m) for n, m in sorted(view.members.items()) if n != leader.node]
        details = "; ".join(f"{name}: {refusal(member)}" for name, member in others)
        raise OperatorError(
            "no healthy passive node can take over" + (f" ({details})" if details else "")
        )
    return candidates[0]


def switchover(
    session: OperatorSession,
    target: str | None,
    heartbeat: float,
    timeout: float,
    stale_after: float,
) -> dict[str, Any]:
    """Ask the active node to hand over, and wait until the target is active.

    ``stale_after``: the agents' ``switchover_timeout``, after which they ignore a request.
    """
    coordinator = session.coordinator
    view = fresh_view(coordinator)
    chosen = choose_switchover_target(view, target, heartbeat, stale_after, time.time())
    assert view.leader is not None
    source, epoch = view.leader.node, view.leader.epoch
    started = time.monotonic()
    other = coordinator.request_switchover(source, chosen, stale_after)
    if other is not None:
        raise in_progress(other, time.time())
    deadline = started + timeout
    while time.monotonic() < deadline:
        current = fresh_view(coordinator)
        member = current.members.get(chosen)
        if (
            current.leader is not None
            and current.leader.epoch > epoch
            and member is not None
            and member.role is Role.ACTIVE
            and member.epoch == current.leader.epoch
        ):
            return {
                "from": source,
                "to": current.leader.node,
                "epoch": current.leader.epoch,
                "seconds": round(time.monotonic() - started, 3),
            }
        session.wait_for_change(0.5)
    # Withdrawn, so that the old active node may take over again if nobody else did.
    coordinator.clear_switchover()
    raise OperatorError(
        f"switchover from {source} to {chosen} did not complete within {timeout:g}s; "
        "the request is withdrawn (see hamta cluster status and the agents' logs)"
    )
