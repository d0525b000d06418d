"""Judging a load's history against what the sink received, and timing recoveries.

Per message id, as in Jepsen's queue checker: **lost** (acknowledged, never delivered) and
**unexpected** (delivered, never sent) are failures; **duplicated** (delivered more than once)
and **recovered** (outcome unknown, delivered all the same) are counted. The recovery time after
a fault is seen from the client: from the fault to the end of the first attempt, started after
it, that got 250.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Attempt:
    """One line of a load history."""

    id: str
    start: float
    end: float
    outcome: str  # acked, refused, unknown
    code: int = 0
    detail: str = ""


def read_history(path: Path) -> list[Attempt]:
    """The attempts recorded in ``path`` (a line being written is skipped)."""
    attempts = []
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
            attempts.append(Attempt(**record))
        except (ValueError, TypeError):
            continue
    return sorted(attempts, key=lambda a: a.start)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a history and the deliveries say together."""

    sent: int
    acked: int
    refused: int
    unknown: int
    delivered: int
    lost: tuple[str, ...]
    unexpected: tuple[str, ...]
    duplicated: int
    recovered: int
    refusals: dict[int, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Nothing acknowledged was lost and nothing unsent appeared."""
        return not self.lost and not self.unexpected

    def as_dict(self) -> dict[str, Any]:
        """For JSON lines and reports."""
        return {
            "sent": self.sent,
            "acked": self.acked,
            "refused": self.refused,
            "unknown": self.unknown,
            "delivered": self.delivered,
            "lost": len(self.lost),
            "unexpected": len(self.unexpected),
            "duplicated": self.duplicated,
            "recovered": self.recovered,
        }


def check(attempts: Sequence[Attempt], delivered_ids: Iterable[str]) -> Verdict:
    """Compare what the client was told with what the sink received."""
    deliveries = Counter(delivered_ids)
    sent = {a.id: a for a in attempts}
    acked = {a.id for a in attempts if a.outcome == "acked"}
    unknown = {a.id for a in attempts if a.outcome == "unknown"}
    refused = [a for a in attempts if a.outcome == "refused"]
    return Verdict(
        sent=len(sent),
        acked=len(acked),
        refused=len(refused),
        unknown=len(unknown),
        delivered=sum(1 for i in deliveries if i in sent),
        lost=tuple(sorted(acked - deliveries.keys())),
        unexpected=tuple(sorted(i for i in deliveries if i not in sent)),
        duplicated=sum(1 for i, n in deliveries.items() if n > 1 and i in sent),
        recovered=len(unknown & deliveries.keys()),
        refusals=dict(Counter(a.code for a in refused)),
    )


def recovery_time(attempts: Sequence[Attempt], fault: float) -> float | None:
    """Seconds from ``fault`` to the first 250 on an attempt started after it (None: never)."""
    after = [a.end for a in attempts if a.start >= fault and a.outcome == "acked"]
    return min(after) - fault if after else None


def unavailability(attempts: Sequence[Attempt], since: float) -> float:
    """Seconds between the first failed attempt after ``since`` and the next 250 after it."""
    later = [a for a in attempts if a.start >= since]
    first_failure = next((a for a in later if a.outcome != "acked"), None)
    if first_failure is None:
        return 0.0
    recovered = next(
        (a.end for a in later if a.start >= first_failure.start and a.outcome == "acked"), None
    )
    return (recovered or later[-1].end) - first_failure.start


class LoadHost(Protocol):
    """Where a load runs and is delivered: the namespace lab, or the Vagrant cluster's host."""

    @property
    def python(self) -> str:
        """The interpreter that runs the load."""

    @property
    def vip(self) -> str:
        """The address the load sends to."""

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` on ``host`` ("client")."""

    def deliveries(self) -> list[dict[str, Any]]:
        """Every message the sink received, each with its ``x_lab_id``."""


class LoadRun:
    """``python -m cluster.lab.load`` on the client host, writing ``history``."""

    def __init__(
        self,
        lab: LoadHost,
        history: Path,
        *,
        rate: float = 20.0,
        connections: int = 2,
        domain: str | None = None,
    ) -> None:
        self.lab = lab
        self.history = history
        self.run_id = f"load{secrets.token_hex(3)}"
        argv = [
            lab.python,
            "-m",
            "cluster.lab.load",
            "--to",
            f"{lab.vip}:25",
            "--history",
            str(history),
            "--rate",
            str(rate),
            "--connections",
            str(connections),
            "--run-id",
            self.run_id,
        ]
        if domain is not None:
            argv += ["--domain", domain]
        # Its complaints go beside its history: a pipe nobody reads would block it.
        with open(history.with_suffix(".err"), "ab") as errors:
            self.process: subprocess.Popen[bytes] = lab.popen(
                "client", argv, stdout=subprocess.DEVNULL, stderr=errors
            )

    def attempts(self) -> list[Attempt]:
        """What has been recorded so far."""
        return read_history(self.history)

    def delivered_ids(self) -> list[str]:
        """The ids of this run that the lab's sink received, once per delivery."""
        prefix = f"{self.run_id}-"
        return [
            str(d["x_lab_id"])
            for d in self.lab.deliveries()
            if str(d.get("x_lab_id", "")).startswith(prefix)
        ]

    def verdict(self, attempts: Sequence[Attempt]) -> Verdict:
        """``check`` of ``attempts`` against this run's deliveries."""
        return check(attempts, self.delivered_ids())

    def stop(self, timeout: float = 20.0) -> list[Attempt]:
        """Stop sending (attempts under way finish) and return the whole history."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.attempts()
