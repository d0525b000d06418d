"""The chaos runner: scenarios under load in a lab of its own, each iteration judged whole.

For every iteration the runner makes sure the pair is whole (both agents up, one active, all
ZooKeeper servers serving), starts a continuous client through the virtual IP, lets it run,
injects the fault, waits for the service to come back, undoes the fault, lets the client run a
little longer, stops it, waits until every acknowledged message had time to arrive, and judges:

- the client's history against the sink's deliveries (lost, unexpected, duplicated, recovered);
- split brain, seen from outside by the sampler (two holders of the VIP, of the spool's mount or
  of port 25 at one instant) and from the nodes' own logs (``chaos.holds``: two nodes holding the
  VIP or the spool in overlapping intervals, a relay acknowledging in an epoch already
  superseded);
- the recovery time, from the fault to the first 250 after it.

Scenarios run in the order given, or shuffled with ``seed`` for a random schedule.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from chaos.alerts import iteration_alerts
from chaos.faults import (
    FAULTS,
    Fault,
    FaultContext,
    FaultError,
    agent_pid,
    skewed_processes,
    wait_until,
)
from chaos.holds import Event, read_log, split_brain
from chaos.other_pairs import OtherPairsLoad
from chaos.results import IterationResult, Mark
from cluster.lab import partitions
from cluster.lab.history import Attempt, LoadRun, check, recovery_time, unavailability
from cluster.lab.lab import Lab, LabError
from cluster.lab.netns import NetnsError
from cluster.lab.sampler import Sampler
from cluster.lab.topology import NODES
from cluster.zookeeper import ZooKeeperError

SHORT: tuple[str, ...] = tuple(FAULTS)  # every scenario once
# What a fault that went wrong raises: the iteration fails with it, the run goes on.
FAULT_ERRORS = (
    FaultError,
    LabError,
    NetnsError,
    ZooKeeperError,
    OSError,
    subprocess.SubprocessError,
)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    """How hard and how long to push."""

    rate: float = 20.0  # client attempts per second through the VIP
    connections: int = 4
    before: float = 2.0  # seconds of load before the fault
    after: float = 2.0  # seconds of load after recovery
    drain: float = 90.0  # at most this long for acknowledged mail to arrive
    # The lab runs its monitors: each iteration collects their alerts (chaos.alerts).
    monitors: bool = False
    alert_window: float = 5.0  # with monitors: alerts arriving this long after the load count


def _roles(lab: Lab) -> dict[str, str]:
    status = lab.cluster_status()
    return {n["node"]: n["role"] for n in status["nodes"]} if status else {}


def _skewed(lab: Lab, node: str) -> bool:
    try:
        environ = Path(f"/proc/{agent_pid(lab, node)}/environ").read_bytes()
    except (OSError, FaultError):
        return False
    return b"FAKETIME=" in environ


def restore_pair(lab: Lab, timeout: float = 90.0) -> str:
    """Make the pair whole again: every ZooKeeper server up, both agents up; the active node."""
    for server in lab.ensemble.servers:
        if server.pid is None:
            server.start()
    for server in lab.ensemble.servers:
        server.wait_serving(60)
    for node in lab.nodes:
        partitions.lift(lab, node)  # a partition a failed heal left behind
        if _skewed(lab, node):  # the clock-skew scenario's agent: back to the true clock
            lab.fence(node)
    for node in lab.nodes:
        if not lab.node_pids(node):
            wait_until(lambda n=node: n not in _roles(lab), 30, f"{node}'s former session to end")  # type: ignore[misc]
            lab.start_agent(node)
    pair = wait_until(
        lambda: sorted(_roles(lab).values()) == ["active", "passive"] and lab.active_node(),
        timeout,
        "an active and a passive node",
    )
    # A passive node cooling down (it gave up or rolled back lately) would not take over yet:
    # a fault then would measure the cooldown, not the failover.
    wait_until(lambda: not _cooling(lab), timeout, "the passive node's cooldown to end")
    return str(pair)


def _cooling(lab: Lab) -> bool:
    status = lab.cluster_status()
    return status is None or any(node.get("cooldown") for node in status["nodes"])


def node_events(
    lab: Lab, source: str, wall_offset: float, skews: Mapping[int, float]
) -> list[Event]:
    """The ``agent`` or ``relay`` log lines of both nodes, each node's in file order."""
    return [
        event
        for node in lab.nodes
        for event in read_log(lab.node_dir(node) / f"{source}.log", node, wall_offset, skews)
    ]


def timeline(
    agent_events: Iterable[Event], start: float, end: float, nodes: Sequence[str] = NODES
) -> list[Mark]:
    """Role changes, fences and watchdog firings from the agents' logs (of ``nodes``), within
    [start, end]."""
    marks = []
    for event in agent_events:
        at, node, fields = event.at, event.node, event.fields
        if not start <= at <= end:
            continue
        if event.name == "Decision" and fields.get("role") != fields.get("was"):
            text = f"{fields.get('role')} (was {fields.get('was')}: {fields.get('trigger')})"
            marks.append(Mark(at, "role", node, text))
        elif event.name == "StepDone" and fields.get("step") == "fence":
            detail = str(fields.get("detail", ""))
            marks.append(Mark(at, "fenced", node, detail))
            for victim in nodes:  # the fenced node holds nothing from now on
                if victim != node and f"fenced {victim}" in detail:
                    marks.append(Mark(at, "role", victim, f"down (fenced by {node})"))
        elif event.name == "WatchdogFired":
            marks.append(Mark(at, "watchdog", node, f"watchdog fired: {fields.get('reason')}"))
    return sorted(marks, key=lambda mark: mark.at)


def run_iteration(
    lab: Lab,
    fault: Fault,
    iteration: int,
    seed: int,
    directory: Path,
    settings: Settings,
    skews: dict[int, float] | None = None,
) -> IterationResult:
    """One fault under load, judged.

    ``skews`` collects the pids that ran with a skewed clock, over the whole run: the logs are
    read whole, and a skewed process's lines stay in them after it is gone.
    """
    skews = {} if skews is None else skews
    active = restore_pair(lab)
    peer = next(node for node in lab.nodes if node != active)
    ctx = FaultContext(lab, active, peer, random.Random(seed))
    history = directory / f"{fault.name}-{iteration}.jsonl"
    wall_offset = time.time() - time.monotonic()
    sampler = Sampler(lab)
    # --pair: the load runs against every other pair of the lab too (chaos.other_pairs).
    others = OtherPairsLoad(lab)
    others.restore()
    others.start(directory, f"{fault.name}-{iteration}", settings.rate, settings.connections)
    started = time.monotonic()
    load = LoadRun(lab, history, rate=settings.rate, connections=settings.connections)
    problems: list[str] = []
    sampler.start()
    try:
        wait_until(lambda: len(load.attempts()) >= 5, 30, "the client's first attempts")
        time.sleep(settings.before)  # load before the fault: the baseline of the timeline
        ctx.fault_at = injected = time.monotonic()  # a fault may move fault_at later
        try:
            fault.inject(ctx)
            wait_until(lambda: fault.recovered(ctx, load.attempts()), fault.patience, "recovery")
        except FAULT_ERRORS as exc:
            problems.append(str(exc))
        finally:
            try:
                fault.heal(ctx)
            except FAULT_ERRORS as exc:
                problems.append(f"heal: {exc}")
            if ctx.heal_at is None and any(m.kind == "heal" for m in ctx.marks):
                ctx.heal_at = max(m.at for m in ctx.marks if m.kind == "heal")
        time.sleep(settings.after)
    finally:
        attempts = load.stop()
        sampler.stop()
    ended = time.monotonic()
    failures = [a.start for a in attempts if a.start >= ctx.fault_at and a.outcome != "acked"]
    ctx.outage_from = min(failures) if failures else None
    problems += fault.judge(ctx, attempts)
    acked = {a.id for a in attempts if a.outcome == "acked"}
    with contextlib.suppress(FaultError):  # the verdict below names what is missing
        wait_until(lambda: acked <= set(load.delivered_ids()), settings.drain, "the deliveries")
    verdict = check(attempts, load.delivered_ids())
    other_pairs = others.judge(started, ended, wall_offset, settings.drain)
    problems += [problem for outcome in other_pairs for problem in outcome.problems]
    rto_from = _recovery_from(fault, ctx)
    skews.update(ctx.skews)  # the skewed node may be dead by now: its pids were kept
    skews.update(skewed_processes(lab))
    agents = node_events(lab, "agent", wall_offset, skews)
    agents += read_log(lab.power_log, None, wall_offset)
    relays = node_events(lab, "relay", wall_offset, skews)
    split = [f"sampler: {v}" for v in sampler.violations[:20]]
    split += [f"logs: {v}" for v in split_brain(agents, relays, started, ended)[:20]]
    marks = sorted([*ctx.marks, *timeline(agents, started, ended, lab.nodes)], key=lambda m: m.at)
    demoted = demotions(agents, ctx.fault_at, ended)
    alerts = None
    if settings.monitors:
        # Alerts come after their checks' thresholds: they are given a while after the load
        # (and the drain) to arrive; what comes later is not counted as this fault's.
        time.sleep(max(0.0, ended + settings.alert_window - time.monotonic()))
        # Counted from the fault's injection, not from fault_at: a monitor may notify while
        # the kill still goes through the node's processes (CI: the inet monitor's triggers
        # arrived before kill_node returned, and were not counted).
        alerts = iteration_alerts(lab.alerts(), injected + wall_offset, time.time())
    if fault.steady:
        problems += steady_problems(demoted, attempts, ctx.fault_at)
    if sampler.samples < 10:
        problems.append(f"the split-brain sampler ran only {sampler.samples} times")
    return IterationResult(
        scenario=fault.name,
        iteration=iteration,
        seed=seed,
        started=started,
        fault_at=ctx.fault_at,
        heal_at=ctx.heal_at,
        ended=ended,
        wall_offset=wall_offset,
        verdict=verdict,
        rto_s=recovery_time(attempts, rto_from),
        rto_from=rto_from,
        refused_s=unavailability(attempts, ctx.fault_at),
        split_brain=split,
        problems=problems,
        marks=marks,
        attempts=list(attempts),
        demotions=demoted,
        alerts=alerts,
        false_failovers=demoted if fault.steady else 0,
        other_pairs=[outcome.as_dict() for outcome in other_pairs],
    )


def demotions(agent_events: Iterable[Event], start: float, end: float) -> int:
    """How many times an active node began to demote within [start, end] (agents' logs)."""
    return sum(
        1
        for event in agent_events
        if event.name == "Decision"
        and start <= event.at <= end
        and event.fields.get("was") == "active"
        and event.fields.get("role") == "demoting"
    )


def steady_problems(demoted: int, attempts: Sequence[Attempt], since: float) -> list[str]:
    """What a fault the active node must ride out (``Fault.steady``) broke: a demotion of it,
    a client refused or cut off after the fault."""
    problems = [f"{demoted} demotion(s) of the active node"] if demoted else []
    failed = [a for a in attempts if a.start >= since and a.outcome != "acked"]
    if failed:
        problems.append(f"{len(failed)} client attempt(s) not acknowledged after the fault")
    return problems


# Faults after which the active node serves on for a while (until it demotes itself, hands
# over, or its session moves): their recovery time is the outage, from its first failure.
SERVES_ON = (
    "partition-zk",
    "kill-zk-leader",
    "zk-rolling-restart",
    "zk-server-stopped",
    "switchover",
)


def _outage_start(ctx: FaultContext) -> float:
    return ctx.outage_from if ctx.outage_from is not None else ctx.fault_at


def _recovery_from(fault: Fault, ctx: FaultContext) -> float:
    """Where the recovery time starts: the fault, or for the faults that stop the service by
    design until they are undone (no ZooKeeper quorum, a full disk), their end; for flapping
    the last of its kills."""
    if fault.name in ("zk-quorum-loss", "disk-full") and ctx.heal_at is not None:
        return ctx.heal_at
    if fault.name in SERVES_ON:
        return _outage_start(ctx)
    faults = [mark.at for mark in ctx.marks if mark.kind == "fault"]
    if fault.name == "flapping" and faults:
        return faults[-1]
    return ctx.fault_at


def schedule(
    scenarios: Sequence[str], iterations: int, seed: int | None
) -> list[tuple[str, int, int]]:
    """(scenario, iteration, seed) in order, or shuffled with ``seed`` (a random schedule)."""
    runs = [(name, i + 1) for name in scenarios for i in range(iterations)]
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(runs)
    return [(name, i, rng.randrange(2**31)) for name, i in runs]


def run(
    lab: Lab,
    plan: Iterable[tuple[str, int, int]],
    directory: Path,
    settings: Settings = Settings(),
    progress: Progress = print,
) -> list[IterationResult]:
    """Run every (scenario, iteration, seed) of ``plan`` on ``lab``; the results in order."""
    directory.mkdir(parents=True, exist_ok=True)
    results = []
    skews: dict[int, float] = {}
    for name, iteration, seed in plan:
        fault = FAULTS[name]()
        progress(f"{name} {iteration}: {fault.summary}")
        result = run_iteration(lab, fault, iteration, seed, directory, settings, skews)
        results.append(result)
        verdict = result.verdict
        rto = f"{result.rto_s:.3f}s" if result.rto_s is not None else "none"
        progress(
            f"  {'ok' if result.ok else 'FAIL'}  RTO {rto}  refused {result.refused_s:.2f}s  "
            f"sent {verdict.sent} acked {verdict.acked} delivered {verdict.delivered} "
            f"lost {len(verdict.lost)} duplicated {verdict.duplicated} "
            f"demotions {result.demotions}"
            + (f" alerts {len(result.alerts)}" if result.alerts is not None else "")
            + "".join(
                f"\n  pair {o['pair']}: sent {o['sent']} acked {o['acked']} refused "
                f"{o['refused']} cut off {o['failed']} lost {o['lost']} "
                f"role changes {len(o['role_changes'])}"
                for o in result.other_pairs
            )
            + "".join(f"\n  ! {p}" for p in [*result.split_brain, *result.problems][:6])
        )
    return results
