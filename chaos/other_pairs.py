"""The pairs a fault is not aimed at (``hamta chaos run --pair NAME``): load on each, judged.

In a lab of several pairs on one ensemble (``hamta lab up --pairs N``) the runner injects the
fault into one pair and runs this module's load against the virtual IP of every other pair
meanwhile. A fault in one pair must cause no failover, no refusal and no loss in the others:
each other pair's history is checked against the sink (lost mail), its attempts that did not
get 250 are counted (refusals and cut-off sessions), and its agents' logs are read for any
change of role within the iteration (a failover, or a node giving up its role). Any of these
fails the iteration, named per pair.

Faults on the ensemble itself (a ZooKeeper server killed, quorum lost) reach every pair by
nature: what the others then see is reported as for any fault, and counts.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path

from chaos.faults import FaultError, wait_until
from chaos.holds import read_log
from cluster.lab.history import LoadRun, check
from cluster.lab.lab import Lab


@dataclass(frozen=True, slots=True)
class PairOutcome:
    """What one pair the fault was not aimed at saw during the iteration."""

    pair: str
    sent: int
    acked: int
    refused: int  # attempts that got an SMTP refusal
    failed: int  # attempts that got no answer (a session cut off or not accepted)
    lost: int  # acknowledged and never delivered
    role_changes: tuple[str, ...]  # "node1: active -> demoting (trigger)", from its agents' logs

    @property
    def problems(self) -> list[str]:
        """Why this pair fails the iteration (empty: it saw nothing of the fault)."""
        found = []
        if self.role_changes:
            found.append(f"pair {self.pair}: role changed: {'; '.join(self.role_changes[:4])}")
        if self.refused or self.failed:
            found.append(
                f"pair {self.pair}: {self.refused} attempt(s) refused, {self.failed} cut off"
            )
        if self.lost:
            found.append(f"pair {self.pair}: {self.lost} acknowledged message(s) lost")
        if not self.sent:
            found.append(f"pair {self.pair}: its load sent nothing")
        return found

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {**asdict(self), "role_changes": list(self.role_changes), "ok": not self.problems}


class OtherPairsLoad:
    """A load client against every pair of ``lab`` but ``lab.pair``, for one iteration."""

    def __init__(self, lab: Lab) -> None:
        self._views = [lab.for_pair(pair) for pair in lab.pair_names if pair != lab.pair]
        self._loads: dict[str, LoadRun] = {}

    def restore(self, timeout: float = 60.0) -> None:
        """Wait until every other pair has an active node (a former iteration may have hurt it)."""
        for view in self._views:
            for node in view.nodes:
                if not view.node_pids(node):
                    view.start_agent(node)
            view.wait_active(timeout)

    def start(self, directory: Path, stem: str, rate: float, connections: int) -> None:
        """Start the load on each other pair, its history in ``directory/<stem>-<pair>.jsonl``."""
        self._loads = {
            view.pair: LoadRun(
                view, directory / f"{stem}-{view.pair}.jsonl", rate=rate, connections=connections
            )
            for view in self._views
        }

    def judge(
        self, started: float, ended: float, wall_offset: float, drain: float
    ) -> list[PairOutcome]:
        """Stop each load, wait for its acknowledged mail, and judge each pair."""
        return [
            _judge(view, self._loads[view.pair], started, ended, wall_offset, drain)
            for view in self._views
            if view.pair in self._loads
        ]


def _judge(
    view: Lab, load: LoadRun, started: float, ended: float, wall_offset: float, drain: float
) -> PairOutcome:
    attempts = load.stop()
    acked = {a.id for a in attempts if a.outcome == "acked"}
    with contextlib.suppress(FaultError):  # the verdict names what is missing
        wait_until(lambda: acked <= set(load.delivered_ids()), drain, "the deliveries")
    verdict = check(attempts, load.delivered_ids())
    return PairOutcome(
        pair=view.pair,
        sent=verdict.sent,
        acked=verdict.acked,
        refused=verdict.refused,
        failed=verdict.unknown,
        lost=len(verdict.lost),
        role_changes=tuple(role_changes_logged(view, started, ended, wall_offset)),
    )


def role_changes_logged(view: Lab, started: float, ended: float, wall_offset: float) -> list[str]:
    """Every change of role the pair's agents logged within [started, ended]."""
    changes = []
    for node in view.nodes:
        for event in read_log(view.node_dir(node) / "agent.log", node, wall_offset):
            fields = event.fields
            if (
                event.name == "Decision"
                and started <= event.at <= ended
                and fields.get("role") != fields.get("was")
            ):
                changes.append(
                    f"{node}: {fields.get('was')} -> {fields.get('role')} ({fields.get('trigger')})"
                )
    return changes
