"""Measuring failovers and a switchover under load: what each kill and the switchover gave."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from failover_common import STANDBY_TIMEOUT, TAKEOVER_TIMEOUT, BenchError, say
from failover_load import Load
from failover_pairs import Pair

from cluster.lab.history import (
    Verdict,
    unavailability,
)

# Phases that are waits, not steps: shown apart and kept out of the step means.
WAITS: Final = ("detect", "retry")


@dataclass(frozen=True, slots=True)
class Failover:
    """One kill and what followed."""

    source: str
    target: str
    rto: float
    phases: dict[str, float]
    anomalies: tuple[str, ...] = ()


@dataclass(slots=True)
class PartResult:
    """What one pair's part of the run measured."""

    name: str
    queued: int = 0
    queue_depth: int | None = None
    failovers: list[Failover] = field(default_factory=list)
    switchover: float | None = None
    switchover_command: float | None = None
    verdict: Verdict | None = None
    error: str | None = None
    # From the agents' logs (bench/takeovers.py): takeovers nobody caused, and the fast path.
    false_failovers: int | None = None
    silent_fences: int | None = None
    fast_takeovers: int | None = None

    @property
    def rtos(self) -> list[float]:
        """Every failover's RTO, in order."""
        return [f.rto for f in self.failovers]


def measure_failovers(
    pair: Pair,
    load: Load,
    iterations: int,
    *,
    settle: float,
    not_before: float,
    into: list[Failover],
    timeout: float = TAKEOVER_TIMEOUT,
    standby_timeout: float = STANDBY_TIMEOUT,
) -> None:
    """Kill the active node ``iterations`` times, appending each failover to ``into``.

    The first kill waits until ``not_before`` (monotonic), each further one until ``settle``
    seconds after the previous takeover: automatic takeovers closer than the agent's
    min_failover_interval are delayed by design, and that delay is not what is measured.
    """
    for index in range(iterations):
        time.sleep(max(0.0, not_before - time.monotonic()))
        source = pair.active(timeout)
        load.require_running()
        pair.kill(source)
        # From the kill's end: until then the node may still answer (a lab node's processes
        # die one by one; virsh destroy takes a moment), and an attempt begun meanwhile got its
        # 250 from the old node (measured once under load: an "RTO" of 0.033 s).
        killed_wall = time.time()
        killed = time.monotonic()
        target = pair.wait_takeover(source, timeout)
        took_over = time.monotonic()
        rto = load.wait_recovery(killed, timeout)
        phases = pair.phases(target, killed_wall, timeout)
        # Recorded before the restart: a node that fails to come back ends the run, not the
        # figures of the takeover already measured.
        failover = Failover(source, target, rto, phases, tuple(pair.anomalies()))
        into.append(failover)
        say(f"  {pair.name} {index + 1}/{iterations}: {source} -> {target}  {_describe(failover)}")
        for anomaly in failover.anomalies:
            say(f"      {anomaly}")
        restarted = time.monotonic()
        pair.restart(source, standby_timeout)
        say(f"      {source} standby again {time.monotonic() - restarted:.1f}s after its restart")
        not_before = took_over + settle


def _describe(failover: Failover) -> str:
    parts = [f"RTO {failover.rto:.3f}s"]
    for phase in WAITS:
        if phase in failover.phases:
            parts.append(f"{phase} {failover.phases[phase]:.3f}s")
    steps = {k: v for k, v in failover.phases.items() if k not in WAITS}
    if steps:
        parts.append(" ".join(f"{k}={v * 1000:.0f}ms" for k, v in steps.items()))
    return "  ".join(parts)


def switchover(
    command: Callable[[float], subprocess.CompletedProcess[str]],
    load: Load,
    timeout: float,
    recovery_timeout: float = TAKEOVER_TIMEOUT,
) -> tuple[float, float, dict[str, Any]]:
    """``hamta cluster switchover`` under load: (unavailability, command seconds, its answer)."""
    load.require_running()
    since = time.monotonic()
    try:
        done = command(timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"hamta cluster switchover did not return in {timeout + 30:g}s") from None
    seconds = time.monotonic() - since
    if done.returncode != 0:
        raise BenchError(f"hamta cluster switchover failed: {done.stderr.strip()}")
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"hamta cluster switchover printed no JSON: {done.stdout!r}") from None
    # The clients' view is complete once an attempt started after the command got its 250.
    load.wait_recovery(since + seconds, recovery_timeout)
    return unavailability(load.attempts(), since), seconds, answer


def record_switchover(
    result: PartResult,
    source: str,
    command: Callable[[float], subprocess.CompletedProcess[str]],
    load: Load,
    timeout: float,
    recovery_timeout: float = TAKEOVER_TIMEOUT,
) -> None:
    """Switch over from ``source`` under load; keep and print the clients' and command's times."""
    gone, seconds, answer = switchover(command, load, timeout, recovery_timeout)
    result.switchover, result.switchover_command = gone, seconds
    say(
        f"  switchover {source} -> {answer.get('to')}: clients unavailable {gone:.3f}s, "
        f"command {seconds:.3f}s (its own measure {answer.get('seconds')}s)"
    )
