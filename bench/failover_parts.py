"""The failover benchmark's parts: hamta in the lab, hamta on the Vagrant cluster, the baseline.

Each part brings its pair up, queues the deep queue, starts the load, measures the failovers
(and, for hamta, a switchover), stops the load and checks that every acknowledged message was
delivered, filling in its :class:`~failover_measure.PartResult`.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import time
import tomllib
from pathlib import Path

from baseline import KeepalivedPostfix
from failover_common import (
    AGENT_STOP_GRACE,
    DEAD_DOMAIN,
    DEAD_HOST,
    DRAIN_TIMEOUT,
    FIRST_ACK_TIMEOUT,
    QUIET_RETRY,
    SETTLE_MARGIN,
    SWITCHOVER_TIMEOUT,
    TAKEOVER_TIMEOUT,
    UP_TIMEOUT,
    VAGRANT_DRAIN_TIMEOUT,
    VAGRANT_STANDBY_TIMEOUT,
    VAGRANT_SWITCHOVER_TIMEOUT,
    VAGRANT_TIMEOUT,
    BenchError,
    lab_env,
    say,
)
from failover_load import Load, drain_and_check, verdict_line
from failover_measure import PartResult, measure_failovers, record_switchover
from failover_pairs import HamtaPair, VagrantPair
from relay_common import shielded
from takeovers import count_moves

from cluster.config import ConfigError, load_agent_config
from cluster.lab import probes, processes
from cluster.lab.configs import render_toml
from cluster.lab.inspection import describe
from cluster.lab.lab import Lab, LabError
from cluster.lab.topology import CLIENT, NODES
from cluster.lab.vagrant import MAIL_DOMAIN, VagrantCluster


def queue_deep(lab: Lab, count: int) -> int:
    """Send ``count`` messages for the dead domain through the VIP; the number acknowledged."""
    if count <= 0:
        return 0
    started = time.monotonic()
    result = lab.send(
        count, domain=DEAD_DOMAIN, connections=4, timeout=max(120.0, count / 20), size=1024
    )
    say(
        f"  queued for {DEAD_DOMAIN}: {result.summary()} "
        f"({time.monotonic() - started:.1f}s with the client's start)"
    )
    if result.acked < count:
        say(f"  WARNING: only {result.acked} of {count} queued: {result.error_samples}")
    return result.acked


def _admin_depth(lab: Lab, node: str) -> int | None:
    relay = tomllib.loads((lab.node_dir(node) / "relay.toml").read_text(encoding="utf-8"))
    host, _, port = str(relay["admin"]["listen"]).rpartition(":")
    answer = probes.http_json(lab.namespace(node), host, int(port), "/api/queue")
    depth = answer.get("depth") if answer else None
    return int(depth) if depth is not None else None


def _quiet_retries(lab: Lab) -> None:
    """Give both relays production-like retries, so that the deep queue waits quietly."""
    for node in NODES:
        path = lab.node_dir(node) / "relay.toml"
        sections = tomllib.loads(path.read_text(encoding="utf-8"))
        sections["retry"] = dict(QUIET_RETRY)
        path.write_text(render_toml(sections), encoding="utf-8")


def _min_failover_interval(lab: Lab) -> float:
    try:
        config = load_agent_config(lab.node_dir(NODES[0]) / "agent.toml")
    except ConfigError as exc:
        raise BenchError(f"cannot read the lab's agent configuration: {exc}") from None
    return float(config.agent.min_failover_interval)


def lab_switchover(lab: Lab, timeout: float) -> subprocess.CompletedProcess[str]:
    """``hamta cluster switchover --json`` from the lab's client namespace."""
    config = lab.node_dir(NODES[0]) / "agent.toml"
    argv = [
        lab.python,
        "-m",
        "hamtactl",
        "cluster",
        "switchover",
        "--json",
        "--config",
        str(config),
        "--timeout",
        str(timeout),
    ]
    return lab.exec(CLIENT, argv, timeout=timeout + 30, env=lab_env())


def stop_agents(lab: Lab) -> None:
    """Stop both agents cleanly (SIGTERM: each demotes first), then make sure nothing is left."""
    for node in NODES:
        agents = [pid for pid in lab.node_pids(node) if describe(processes.cmdline(pid)) == "agent"]
        processes.end(agents, AGENT_STOP_GRACE)
    for node in NODES:
        lab.kill_node(node, signal.SIGKILL)
        lab.fence(node)  # takes a VIP a crashed demotion left behind off the node


def run_hamta(lab: Lab, args: argparse.Namespace, result: PartResult) -> None:
    """Build the lab with hamta's agents, queue, load, kill, switch over, check."""
    say(f"hamta: lab {lab.prefix} ({lab.topology.subnet}) in {lab.directory}")
    started = time.monotonic()
    try:
        lab.up(wait=UP_TIMEOUT, agents=False, monitors=False)
    except LabError as exc:
        raise BenchError(
            f"{exc}\n(left by a benchmark run that was killed? hamta lab down --dir "
            f"{lab.directory} --prefix {lab.prefix}; or use --prefix and --subnet)"
        ) from None
    _quiet_retries(lab)
    fast = args.fast_takeover == "on"
    for node in NODES:
        lab.configure_agent(node, {"agent": {"fast_takeover": fast}})
    since = time.time()
    for node in NODES:
        lab.start_agent(node)
    active = lab.wait_active(UP_TIMEOUT)
    say(f"  fast takeover (fence a silent leader, then take over at once): {args.fast_takeover}")
    settle = _min_failover_interval(lab) + SETTLE_MARGIN
    not_before = time.monotonic() + settle  # the first election counts as a takeover
    say(f"  up in {time.monotonic() - started:.1f}s, {active} active")
    result.queued = queue_deep(lab, args.queued)
    result.queue_depth = _admin_depth(lab, active)
    say(f"  queue depth on {active}: {result.queue_depth}")
    load = Load(
        lab, lab.directory / "load-hamta.jsonl", rate=args.rate, connections=args.connections
    )
    try:
        load.wait_first_ack(FIRST_ACK_TIMEOUT)
        say(f"  load: {args.rate:g} attempts/s over {args.connections} sessions")
        measure_failovers(
            HamtaPair(lab),
            load,
            args.iterations,
            settle=settle,
            not_before=not_before,
            into=result.failovers,
        )
        record_switchover(
            result,
            lab.wait_active(TAKEOVER_TIMEOUT),
            lambda timeout: lab_switchover(lab, timeout),
            load,
            SWITCHOVER_TIMEOUT,
        )
    finally:
        attempts = load.stop()
    result.verdict = drain_and_check(lab, attempts, DRAIN_TIMEOUT)
    say(f"  load: {verdict_line(result.verdict)}")
    stop_agents(lab)
    moves = count_moves([lab.node_dir(node) / "agent.log" for node in NODES], since)
    # The first election, one per kill, the switchover: any other takeover nobody caused.
    caused = 1 + len(result.failovers) + (result.switchover is not None)
    result.false_failovers = max(moves.takeovers - caused, 0)
    result.silent_fences, result.fast_takeovers = moves.silent_fences, moves.fast_takeovers
    say(f"  takeovers {moves.takeovers} ({caused} caused), {moves.as_dict()}")


def run_vagrant(machines: VagrantCluster, args: argparse.Namespace, result: PartResult) -> None:
    """The Vagrant cluster: up, queue, load, power-offs, switchover, check, destroy.

    Under TCG every step is slow (an agent's restart alone imports hamta for 20-30 s, a
    powered-off machine boots in about a minute): the timeouts are minutes, not seconds.
    """
    say(f"hamta: the Vagrant cluster ({machines.driver}) from namespace {machines.namespace}")
    started = time.monotonic()
    if all(machines.running(m) for m in machines.machines):
        say("  the machines run already (--reuse): not brought up again")
    else:
        machines.up()
    active = machines.wait_active(VAGRANT_TIMEOUT)
    # The first power-off needs a peer that can take over: passive, resynced, out of cooldown.
    machines.wait_ready_for_switchover(VAGRANT_STANDBY_TIMEOUT)
    config = load_agent_config(machines.agent_config())
    settle = float(config.agent.min_failover_interval) + SETTLE_MARGIN
    not_before = time.monotonic() + settle
    say(f"  up in {time.monotonic() - started:.1f}s, {active} active")
    if args.queued > 0:
        # No DNS on the machines: mail for any domain but the sink's stays queued (retried).
        sent = machines.send(
            args.queued, domain="dead.test", connections=4, timeout=max(300.0, args.queued / 5)
        )
        result.queued = sent.acked
        say(f"  queued for dead.test: {sent.summary()}")
    load = Load(
        machines,
        machines.workdir / "load-hamta.jsonl",
        rate=args.rate,
        connections=args.connections,
        domain=MAIL_DOMAIN,
    )
    try:
        load.wait_first_ack(VAGRANT_TIMEOUT)
        say(f"  load: {args.rate:g} attempts/s over {args.connections} sessions")
        measure_failovers(
            VagrantPair(machines),
            load,
            args.iterations,
            settle=settle,
            not_before=not_before,
            into=result.failovers,
            timeout=VAGRANT_TIMEOUT,
            standby_timeout=VAGRANT_STANDBY_TIMEOUT,
        )
        record_switchover(
            result,
            machines.wait_active(VAGRANT_TIMEOUT),
            lambda timeout: machines.hamta(
                "cluster", "switchover", "--json", "--timeout", str(timeout), timeout=timeout + 30
            ),
            load,
            VAGRANT_SWITCHOVER_TIMEOUT,
            recovery_timeout=VAGRANT_TIMEOUT,
        )
    finally:
        attempts = load.stop()
    result.verdict = drain_and_check(machines, attempts, VAGRANT_DRAIN_TIMEOUT, interval=5.0)
    say(f"  load: {verdict_line(result.verdict)}")


def run_baseline(lab: Lab, args: argparse.Namespace, result: PartResult, directory: Path) -> None:
    """keepalived + Postfix on the same lab: queue, load, kill, check."""
    say("baseline: keepalived (VRRP, advert_int 1) + Postfix, notify scripts mount and start")
    pair = KeepalivedPostfix(
        lab, directory, dead_domain=DEAD_DOMAIN, dead_host=lab.address(DEAD_HOST)
    )
    settle = _min_failover_interval(lab) + SETTLE_MARGIN
    try:
        pair.prepare()
        started = time.monotonic()
        active = pair.up(UP_TIMEOUT)
        not_before = time.monotonic() + settle  # the same pace as hamta's
        say(f"  up in {time.monotonic() - started:.1f}s, {active} master")
        result.queued = queue_deep(lab, args.queued)
        counts = pair.queue_counts(active)
        result.queue_depth = sum(counts.values()) if counts else None
        say(f"  Postfix queues on {active}: {counts}")
        load = Load(
            lab,
            lab.directory / "load-baseline.jsonl",
            rate=args.rate,
            connections=args.connections,
        )
        try:
            load.wait_first_ack(FIRST_ACK_TIMEOUT)
            measure_failovers(
                pair,
                load,
                args.iterations,
                settle=settle,
                not_before=not_before,
                into=result.failovers,
            )
        finally:
            attempts = load.stop()
        result.verdict = drain_and_check(lab, attempts, DRAIN_TIMEOUT)
        say(f"  load: {verdict_line(result.verdict)}")
    finally:
        with shielded():
            pair.stop()
