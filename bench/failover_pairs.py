"""The pairs the failover benchmark kills: hamta in the lab, hamta on the Vagrant cluster.

Each tells the measurement loop which node serves, kills it, waits for the takeover and reads the
takeover's phases from the new active node's own records (the agent's ``Decision`` lines). The
keepalived + Postfix pair (bench/baseline.py) answers to the same :class:`Pair` protocol.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from failover_common import VAGRANT_STANDBY_TIMEOUT, BenchError, tail, wait_for

from cluster.lab.lab import Lab
from cluster.lab.topology import NODES
from cluster.lab.vagrant import VagrantCluster
from cluster.operator import is_standby


class Pair(Protocol):
    """Two nodes that fail over, as the measurement loop drives them."""

    name: str

    def active(self, timeout: float) -> str:
        """The node serving now."""

    def kill(self, node: str) -> None:
        """SIGKILL every process of ``node``."""

    def wait_takeover(self, old: str, timeout: float) -> str:
        """Wait until the other node serves; return it."""

    def phases(self, node: str, killed_wall: float, timeout: float) -> dict[str, float]:
        """Seconds of the takeover's parts, from the new node's own records."""

    def anomalies(self) -> list[str]:
        """What went otherwise than a plain takeover in the last one (after ``phases``)."""

    def restart(self, node: str, timeout: float) -> None:
        """Start the killed node again and wait until it is a standby."""


def _log_lines(path: Path, offset: int) -> list[dict[str, Any]]:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            data = log.read()
    except FileNotFoundError:
        return []
    lines = []
    for raw in data.splitlines():
        try:
            parsed = json.loads(raw)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            lines.append(parsed)
    return lines


def _wall(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def decisions_until_active(lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The agent's ``Decision`` lines up to its first with role "active"; None before it."""
    found = []
    for line in lines:
        if line.get("event") == "Decision":
            found.append(dict(line))
            if line.get("role") == "active":
                return found
    return None


def takeover_phases(
    lines: Sequence[dict[str, Any]], killed_wall: float
) -> tuple[dict[str, float], list[str]]:
    """Detection, promotion steps and abandoned promotions of one takeover, from its decisions.

    ``detect`` runs from the kill to the first decision to promote; ``retry`` from that
    decision to the one that succeeded, when an attempt was abandoned in between (each such
    attempt is returned with the agent's note); the steps are those of the successful promotion
    (its ``Decision`` line with role "active").
    """
    starts = [
        _wall(str(line["ts"]))
        for line in lines
        if line.get("role") == "promoting" and line.get("was") != "promoting"
    ]
    anomalies = [
        f"promotion abandoned at +{_wall(str(line['ts'])) - killed_wall:.3f}s: "
        f"{line.get('note') or line.get('trigger')}"
        for line in lines
        if line.get("was") == "promoting" and line.get("role") not in ("promoting", "active")
    ]
    phases: dict[str, float] = {}
    if starts:
        phases["detect"] = starts[0] - killed_wall
    if len(starts) > 1:
        phases["retry"] = starts[-1] - starts[0]
    steps = lines[-1].get("steps") or {}
    phases.update({str(step): float(seconds) for step, seconds in steps.items()})
    return phases, anomalies


class _AgentPair:
    """What both hamta pairs share: the takeover's phases from the new node's decisions."""

    name = "hamta"

    def __init__(self) -> None:
        self._anomalies: list[str] = []

    def _phases(
        self,
        decisions: Callable[[], list[dict[str, Any]] | None],
        where: str,
        killed_wall: float,
        timeout: float,
        interval: float,
    ) -> dict[str, float]:
        lines = wait_for(decisions, timeout, interval)
        if lines is None:
            raise BenchError(f"no 'active' decision in {where} after the kill")
        phases, self._anomalies = takeover_phases(lines, killed_wall)
        return phases

    def anomalies(self) -> list[str]:
        """The promotions abandoned during the last takeover, with the agent's reasons."""
        return list(self._anomalies)


class HamtaPair(_AgentPair):
    """The lab's two hamta agents."""

    def __init__(self, lab: Lab) -> None:
        super().__init__()
        self.lab = lab
        self._offsets: dict[str, int] = dict.fromkeys(NODES, 0)

    def _log(self, node: str) -> Path:
        return self.lab.node_dir(node) / "agent.log"

    def active(self, timeout: float) -> str:
        """The node holding the VIP alone and answering SMTP on it."""
        return self.lab.wait_active(timeout)

    def kill(self, node: str) -> None:
        """Remember where every agent log ends, then SIGKILL the node's agent and relay."""
        for each in NODES:
            with contextlib.suppress(FileNotFoundError):
                self._offsets[each] = self._log(each).stat().st_size
        self.lab.kill_node(node, signal.SIGKILL)

    def wait_takeover(self, old: str, timeout: float) -> str:
        """Wait until another node holds the VIP alone and answers SMTP."""
        return self.lab.wait_active(timeout, other_than=old)

    def phases(self, node: str, killed_wall: float, timeout: float) -> dict[str, float]:
        """Detection, promotion steps and abandoned promotions, from the agent's log file."""
        return self._phases(
            lambda: decisions_until_active(_log_lines(self._log(node), self._offsets[node])),
            str(self._log(node)),
            killed_wall,
            timeout,
            0.1,
        )

    def restart(self, node: str, timeout: float) -> None:
        """Start the node's agent again; wait until ZooKeeper shows it passive and fresh."""
        self.lab.start_agent(node)

        def passive() -> bool | None:
            if not self.lab.node_pids(node):
                out = self.lab.node_dir(node) / "agent.out"
                raise BenchError(f"the agent of {node} exited; {out}:\n{tail(out)}")
            return True if is_standby(self.lab.cluster_status(), node) else None

        if wait_for(passive, timeout, 0.3) is None:
            raise BenchError(f"{node} was not passive within {timeout:g}s of its restart")


class VagrantPair(_AgentPair):
    """The Vagrant cluster's two machines; a kill is ``virsh destroy`` (the power is cut)."""

    def __init__(self, machines: VagrantCluster) -> None:
        super().__init__()
        self.machines = machines

    def active(self, timeout: float) -> str:
        """The node ZooKeeper shows active, once its peer is a resynced standby.

        Never the last node standing: on an overloaded host an active node may give up (its
        relay unhealthy), take over again and fence its peer meanwhile; cutting its power then
        would measure an outage, not a failover (seen once beside a CI run).
        """
        self.machines.wait_ready_for_switchover(VAGRANT_STANDBY_TIMEOUT)
        return self.machines.wait_active(timeout)

    def kill(self, node: str) -> None:
        """Cut the machine's power."""
        self.machines.power_off(node)

    def wait_takeover(self, old: str, timeout: float) -> str:
        """Wait until the other node is active with the VIP and a ready relay."""
        return self.machines.wait_active(timeout, other_than=old)

    def phases(self, node: str, killed_wall: float, timeout: float) -> dict[str, float]:
        """Detection, promotion steps and abandoned promotions, from the agent's journal."""
        return self._phases(
            lambda: decisions_until_active(self.machines.agent_log(node, killed_wall)),
            f"{node}'s journal",
            killed_wall,
            timeout,
            2.0,
        )

    def restart(self, node: str, timeout: float) -> None:
        """Power the machine on; wait until it is back as the passive node, resynced.

        A node that was powered off is marked outdated until DRBD has resynced its disk: the
        next power-off of its peer must find it able to take over.
        """
        self.machines.power_on(node)
        self.machines.wait_passive(node, timeout)
        self.machines.wait_ready_for_switchover(timeout)
