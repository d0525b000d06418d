"""The failover benchmark's load: the continuous client through the virtual IP, and its verdict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from failover_common import BenchError, wait_for

from cluster.lab.history import (
    Attempt,
    LoadHost,
    LoadRun,
    Verdict,
    check,
    recovery_time,
)


class Load:
    """The continuous client (``cluster.lab.load``) through the virtual IP."""

    def __init__(
        self,
        lab: LoadHost,
        history: Path,
        *,
        rate: float,
        connections: int,
        domain: str | None = None,
    ) -> None:
        self.history = history
        self.run = LoadRun(lab, history, rate=rate, connections=connections, domain=domain)
        self.final: list[Attempt] | None = None

    def attempts(self) -> list[Attempt]:
        """Every attempt recorded so far."""
        return self.final if self.final is not None else self.run.attempts()

    def require_running(self) -> None:
        """BenchError if the load process has exited."""
        process = self.run.process
        if self.final is None and process.poll() is not None:
            error = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise BenchError(f"the load exited with status {process.returncode}: {error[-500:]}")

    def wait_first_ack(self, timeout: float) -> None:
        """Wait until some attempt got 250 (the load reaches the active node)."""

        def acked() -> bool | None:
            self.require_running()
            return True if any(a.outcome == "acked" for a in self.attempts()) else None

        if wait_for(acked, timeout, 0.2) is None:
            samples = {a.detail for a in self.attempts()[-5:]}
            raise BenchError(f"the load got no 250 within {timeout:g}s: {samples}")

    def wait_recovery(self, since: float, timeout: float) -> float:
        """Seconds from ``since`` to the first 250 on an attempt started after it."""

        def recovered() -> float | None:
            self.require_running()
            return recovery_time(self.attempts(), since)

        found = wait_for(recovered, timeout, 0.1)
        if found is None:
            raise BenchError(f"the load got no 250 within {timeout:g}s after the fault")
        return found

    def stop(self) -> list[Attempt]:
        """Stop sending (attempts under way finish); the whole history. Idempotent."""
        if self.final is None:
            self.final = self.run.stop()
            if self.run.process.stderr is not None:
                self.run.process.stderr.close()
        return self.final


def _run_ids(attempts: Sequence[Attempt]) -> set[str]:
    # Load ids are "<run>-<number>": the run part tells this load's deliveries from the rest.
    return {a.id.rsplit("-", 1)[0] for a in attempts}


def delivered_ids(lab: LoadHost, runs: set[str]) -> list[str]:
    """Every delivery of the given load runs, duplicates included."""
    found = []
    for delivery in lab.deliveries():
        lab_id = delivery.get("x_lab_id")
        if lab_id and str(lab_id).rsplit("-", 1)[0] in runs:
            found.append(str(lab_id))
    return found


def drain_and_check(
    lab: LoadHost, attempts: Sequence[Attempt], timeout: float, interval: float = 0.5
) -> Verdict:
    """Wait until every acknowledged message reached the sink (or ``timeout``); judge."""
    runs = _run_ids(attempts)
    acked = {a.id for a in attempts if a.outcome == "acked"}
    wait_for(lambda: True if acked <= set(delivered_ids(lab, runs)) else None, timeout, interval)
    return check(attempts, delivered_ids(lab, runs))


def verdict_line(verdict: Verdict) -> str:
    """The load's verdict in one line: sent, acked, refused, unknown, delivered, lost."""
    figures = verdict.as_dict()
    refusals = ", ".join(f"{code}: {n}" for code, n in sorted(verdict.refusals.items()))
    return (
        f"sent {figures['sent']}, acked {figures['acked']}, refused {figures['refused']}"
        f"{f' ({refusals})' if refusals else ''}, unknown {figures['unknown']}, delivered "
        f"{figures['delivered']}, lost {figures['lost']}, duplicated {figures['duplicated']}, "
        f"unexpected {figures['unexpected']}"
    )
