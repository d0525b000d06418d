#!/usr/bin/env python3
"""Failover benchmark: hamta's cluster agent against keepalived + Postfix, under load, in the lab.

What is measured
    A lab of its own (prefix ``hbf``, subnet 198.18.8.0/24 unless told otherwise, in a temporary
    directory) is built: three ZooKeeper servers, two nodes, a shared ext4 loop device, a client,
    DNS and a recording sink (``cluster/lab``). Then, for hamta:

    1. ``--queued`` messages (10,000) are queued on the active node for ``client.lab.test``, a
       name the lab's DNS resolves (no MX: its address is the implicit MX) to the client host,
       where nothing listens on port 25: every delivery attempt is refused, the mail stays in the
       spool on the shared disk, and every new active node must recover it;
    2. a continuous load (``cluster.lab.load``: 20 attempts/s over 8 sessions, one message each,
       to ``a.lab.test``, i.e. the sink) runs through the virtual IP for the rest of the part.
       Eight sessions, not two: each session waits for its attempt to end, and a connect sent
       while the virtual IP moves (hamta's fence has taken it off the dead node, the new node's
       gratuitous ARP has not arrived yet) is lost and waits out the client's 1 s connect
       timeout; with two sessions both may be stuck so, and the RTO would grow by a second that
       says more about the client than about the failover. With eight, the others keep trying
       at their pace;
    3. ``--iterations`` times: the active node is killed (SIGKILL to every process of its
       namespace: agent and relay), ``t`` being when the kill has ended (every process gone);
       the **RTO** is the time from ``t`` to the end of the first attempt, started after ``t``,
       that got 250 (``cluster.lab.history.recovery_time``).
       The new active node's agent log gives the detection time (kill to the decision to
       promote), the time lost to promotions that were abandoned ("retry", each one printed
       with the agent's reason and counted as an anomaly) and every step's seconds of the one
       that succeeded (its ``Decision`` line with role "active").
       The killed node's agent is started again, and the next kill waits until it is passive
       and ``agent.min_failover_interval`` has passed since the takeover (automatic takeovers
       closer than that are delayed by design, which would be measured instead);
    4. a planned switchover (``hamta cluster switchover``) under the same load, measured as the
       clients' unavailability (first failed attempt to the next 250) and as the command's time;
    5. the load stops, its acknowledged messages must all reach the sink (``check``: lost is
       acknowledged and never delivered).

    Then the baseline (bench/baseline.py), on the same lab after hamta's agents are stopped:
    keepalived (VRRP, advert_int 1, nopreempt) on both nodes with notify scripts that fsck and
    mount the shared device and start a private Postfix (queue on the device, listening on the
    virtual IP, relaying to the sink) on MASTER, and stop and unmount on anything else. The same
    deep queue, the same load, the same kills (every process of the node: keepalived, Postfix, a
    notify script under way), the same RTO measure and the same pace between kills.

    Both relays keep their deep queue quiet for the run: hamta's ``retry.first_delay`` is set to
    30 minutes in the lab's relay.toml (with the lab's own 1-10 s retries the relay would retry
    10,000 messages about a thousand times a second, on the same two cores as the measurement)
    and Postfix's ``minimal_backoff_time`` likewise. Runs longer than 30 minutes
    see both retry their queues once.

On the Vagrant cluster (``--cluster vagrant``)
    The same measurement on real machines: the Vagrant cluster (``vagrant/``: mx1 and mx2 with
    real DRBD, the arbiter with the third ZooKeeper server and the MX sink) is brought up from a
    network namespace with a libvirtd of its own (``cluster.lab.vagrant``), provisioned by
    ``ansible/site.yml``. ``--queued`` messages (200) for a domain nobody resolves stay queued;
    the load runs from the host through the virtual IP to ``example.test`` (the arbiter's sink);
    a kill is ``virsh destroy`` of the active machine (its power cut, the peer's STONITH is
    libvirt's too); phases come from the new active node's journal; the killed machine is booted
    again and waited for as the passive node. No baseline. The cluster is destroyed at the end
    and everything libvirt made is removed. Under plain qemu (TCG, the default here: KVM guests
    may hang when nested) expect about half an hour for 5 iterations.

Output
    Every failover as it happens, then a table (RTO min / median / p95 / max for hamta and the
    baseline, mean time of each promotion step, switchover, acknowledged and lost), and last one
    JSON line with the figures. The lab is always taken down (on error and Ctrl-C too).

Usage (as root)
    .venv/bin/python bench/failover.py [--iterations 20] [--queued 10000] [--no-baseline]
        [--rate 20] [--connections 8] [--keep] [--workdir DIR] [--prefix hbf]
        [--subnet 198.18.8.0/24] [--cluster lab]
    .venv/bin/python bench/failover.py --cluster vagrant [--iterations 5] [--driver qemu|kvm]
        [--namespace hvg0] [--queued 200] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final, Protocol, TypeVar

from baseline import BaselineError, KeepalivedPostfix
from relay import shielded

import cluster
from cluster.config import ConfigError, load_agent_config
from cluster.lab import probes, processes
from cluster.lab.configs import render_toml
from cluster.lab.history import (
    Attempt,
    LoadHost,
    LoadRun,
    Verdict,
    check,
    recovery_time,
    unavailability,
)
from cluster.lab.lab import Lab, LabError, describe
from cluster.lab.topology import CLIENT, DOMAIN, NODES
from cluster.lab.vagrant import ARBITER, MAIL_DOMAIN, MAIL_NODES, VagrantCluster, VagrantError
from cluster.lab.vagrant import NAMESPACE as VAGRANT_NAMESPACE
from cluster.operator import is_standby

T = TypeVar("T")

DEFAULT_PREFIX: Final = "hbf"
DEFAULT_SUBNET: Final = "198.18.8.0/24"
# The client host answers no SMTP: mail for it is refused at connect and stays queued.
DEAD_HOST: Final = CLIENT
DEAD_DOMAIN: Final = f"{DEAD_HOST}.{DOMAIN}"
QUIET_RETRY: Final = {"first_delay": "30m", "max_delay": "4h"}
UP_TIMEOUT: Final = 120.0
TAKEOVER_TIMEOUT: Final = 60.0
STANDBY_TIMEOUT: Final = 60.0
FIRST_ACK_TIMEOUT: Final = 30.0
DRAIN_TIMEOUT: Final = 90.0
SWITCHOVER_TIMEOUT: Final = 30.0
SETTLE_MARGIN: Final = 1.0  # beyond min_failover_interval, for the takeover's own publishing
AGENT_STOP_GRACE: Final = 20.0
POLL: Final = 0.05
# The Vagrant cluster under TCG: an agent's restart imports hamta for 20-30 s, a machine boots
# in about a minute, one ssh round trip takes a second or more.
VAGRANT_TIMEOUT: Final = 300.0
VAGRANT_STANDBY_TIMEOUT: Final = 900.0
VAGRANT_SWITCHOVER_TIMEOUT: Final = 120.0
VAGRANT_DRAIN_TIMEOUT: Final = 600.0
VAGRANT_QUEUED: Final = 200
# Phases that are waits, not steps: shown apart and kept out of the step means.
_WAITS: Final = ("detect", "retry")
STEP_ORDER: Final = ("acquire", "fence", "storage", "epoch", "vip", "relay", "probe", "publish")
BASELINE_STEP_ORDER: Final = ("fsck", "mount", "postfix")


class BenchError(Exception):
    """The benchmark could not run or produced no valid measurement."""


def say(text: str = "") -> None:
    """Print one human-readable line (stdout, flushed)."""
    print(text, flush=True)


def _wait_for(check: Callable[[], T | None], timeout: float, interval: float = POLL) -> T | None:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(interval)


def _env() -> dict[str, str]:
    """The environment of the Python commands run inside the lab (the project importable)."""
    env = dict(os.environ)
    root = str(Path(cluster.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("LD_PRELOAD", None)  # no fsync-eaters: both relays must be durable
    return env


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------- the load


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

        if _wait_for(acked, timeout, 0.2) is None:
            samples = {a.detail for a in self.attempts()[-5:]}
            raise BenchError(f"the load got no 250 within {timeout:g}s: {samples}")

    def wait_recovery(self, since: float, timeout: float) -> float:
        """Seconds from ``since`` to the first 250 on an attempt started after it."""

        def recovered() -> float | None:
            self.require_running()
            return recovery_time(self.attempts(), since)

        found = _wait_for(recovered, timeout, 0.1)
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
    _wait_for(lambda: True if acked <= set(delivered_ids(lab, runs)) else None, timeout, interval)
    return check(attempts, delivered_ids(lab, runs))


# ---------------------------------------------------------------------------- pairs


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
        lines = _wait_for(decisions, timeout, interval)
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
                raise BenchError(f"the agent of {node} exited; {out}:\n{_tail(out)}")
            return True if is_standby(self.lab.cluster_status(), node) else None

        if _wait_for(passive, timeout, 0.3) is None:
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


# ---------------------------------------------------------------------------- measuring


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
    for phase in _WAITS:
        if phase in failover.phases:
            parts.append(f"{phase} {failover.phases[phase]:.3f}s")
    steps = {k: v for k, v in failover.phases.items() if k not in _WAITS}
    if steps:
        parts.append(" ".join(f"{k}={v * 1000:.0f}ms" for k, v in steps.items()))
    return "  ".join(parts)


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
    return lab.exec(CLIENT, argv, timeout=timeout + 30, env=_env())


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


def stop_agents(lab: Lab) -> None:
    """Stop both agents cleanly (SIGTERM: each demotes first), then make sure nothing is left."""
    for node in NODES:
        agents = [pid for pid in lab.node_pids(node) if describe(processes.cmdline(pid)) == "agent"]
        processes.end(agents, AGENT_STOP_GRACE)
    for node in NODES:
        lab.kill_node(node, signal.SIGKILL)
        lab.fence(node)  # takes a VIP a crashed demotion left behind off the node


# ---------------------------------------------------------------------------- the parts


def run_hamta(lab: Lab, args: argparse.Namespace, result: PartResult) -> None:
    """Build the lab with hamta's agents, queue, load, kill, switch over, check."""
    say(f"hamta: lab {lab.prefix} ({lab.topology.subnet}) in {lab.directory}")
    started = time.monotonic()
    try:
        lab.up(wait=UP_TIMEOUT, agents=False)
    except LabError as exc:
        raise BenchError(
            f"{exc}\n(left by a benchmark run that was killed? hamta lab down --dir "
            f"{lab.directory} --prefix {lab.prefix}; or use --prefix and --subnet)"
        ) from None
    _quiet_retries(lab)
    for node in NODES:
        lab.start_agent(node)
    active = lab.wait_active(UP_TIMEOUT)
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
    say(f"  load: {_verdict_line(result.verdict)}")
    stop_agents(lab)


def run_vagrant(machines: VagrantCluster, args: argparse.Namespace, result: PartResult) -> None:
    """The Vagrant cluster: up, queue, load, power-offs, switchover, check, destroy.

    Under TCG every step is slow (an agent's restart alone imports hamta for 20-30 s, a
    powered-off machine boots in about a minute): the timeouts are minutes, not seconds.
    """
    say(f"hamta: the Vagrant cluster ({machines.driver}) from namespace {machines.namespace}")
    started = time.monotonic()
    if all(machines.running(m) for m in (*MAIL_NODES, ARBITER)):
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
    say(f"  load: {_verdict_line(result.verdict)}")


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
        say(f"  load: {_verdict_line(result.verdict)}")
    finally:
        with shielded():
            pair.stop()


def _verdict_line(verdict: Verdict) -> str:
    figures = verdict.as_dict()
    refusals = ", ".join(f"{code}: {n}" for code, n in sorted(verdict.refusals.items()))
    return (
        f"sent {figures['sent']}, acked {figures['acked']}, refused {figures['refused']}"
        f"{f' ({refusals})' if refusals else ''}, unknown {figures['unknown']}, delivered "
        f"{figures['delivered']}, lost {figures['lost']}, duplicated {figures['duplicated']}, "
        f"unexpected {figures['unexpected']}"
    )


# ---------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile, linear between the closest ranks (inclusive method)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """min, median, p95 and max, rounded to the millisecond (None without values)."""
    if not values:
        return {"min": None, "median": None, "p95": None, "max": None}
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "p95": round(percentile(values, 0.95), 3),
        "max": round(max(values), 3),
    }


def phase_means(failovers: Sequence[Failover], order: Sequence[str]) -> dict[str, float]:
    """The mean seconds of each phase seen (``detect`` apart), in ``order`` then as found."""
    names: list[str] = [name for name in order if any(name in f.phases for f in failovers)]
    for failover in failovers:
        names += [n for n in failover.phases if n not in names and n not in _WAITS]
    return {
        name: round(statistics.fmean(f.phases[name] for f in failovers if name in f.phases), 4)
        for name in names
    }


def detect_mean(failovers: Sequence[Failover]) -> float | None:
    """The mean detection time, if the pair reported one."""
    found = [f.phases["detect"] for f in failovers if "detect" in f.phases]
    return round(statistics.fmean(found), 3) if found else None


def figures(
    args: argparse.Namespace,
    hamta: PartResult,
    baseline: PartResult | None,
    baseline_missing: str | None,
    ok: bool,
    seconds: float,
) -> dict[str, Any]:
    """The JSON line."""
    ours = distribution(hamta.rtos)
    theirs = distribution(baseline.rtos if baseline else [])
    ratio = None
    if ours["median"] and theirs["median"]:
        ratio = round(ours["median"] / theirs["median"], 3)
    verdict = hamta.verdict
    base_verdict = baseline.verdict if baseline else None
    return {
        "iterations": len(hamta.failovers),
        "rto_min_s": ours["min"],
        "rto_median_s": ours["median"],
        "rto_p95_s": ours["p95"],
        "rto_max_s": ours["max"],
        "switchover_s": None if hamta.switchover is None else round(hamta.switchover, 3),
        "acked": verdict.acked if verdict else None,
        "lost": len(verdict.lost) if verdict else None,
        "baseline_rto_median_s": theirs["median"],
        "baseline_rto_min_s": theirs["min"],
        "baseline_rto_p95_s": theirs["p95"],
        "baseline_rto_max_s": theirs["max"],
        "ratio_median": ratio,
        "detect_mean_s": detect_mean(hamta.failovers),
        "steps_mean_s": phase_means(hamta.failovers, STEP_ORDER),
        "anomalies": sum(len(f.anomalies) for f in hamta.failovers),
        "rto_clean_median_s": distribution([f.rto for f in hamta.failovers if not f.anomalies])[
            "median"
        ],
        "baseline_detect_mean_s": detect_mean(baseline.failovers) if baseline else None,
        "baseline_steps_mean_s": (
            phase_means(baseline.failovers, BASELINE_STEP_ORDER) if baseline else None
        ),
        "switchover_command_s": (
            None if hamta.switchover_command is None else round(hamta.switchover_command, 3)
        ),
        "queued": hamta.queued,
        "queue_depth": hamta.queue_depth,
        "unknown": verdict.unknown if verdict else None,
        "duplicated": verdict.duplicated if verdict else None,
        "unexpected": len(verdict.unexpected) if verdict else None,
        "baseline_iterations": len(baseline.failovers) if baseline else 0,
        "baseline_queued": baseline.queued if baseline else None,
        "baseline_acked": base_verdict.acked if base_verdict else None,
        "baseline_lost": len(base_verdict.lost) if base_verdict else None,
        "baseline_missing": baseline_missing,
        "rate": args.rate,
        "connections": args.connections,
        "ok": ok,
        "seconds": round(seconds, 1),
    }


def _cell(value: float | None, unit: str = "s") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


def report(hamta: PartResult, baseline: PartResult | None, data: dict[str, Any]) -> None:
    """The table for people."""
    say()
    say(f"{'RTO (end of kill to 250)':<28}{'min':>10}{'median':>10}{'p95':>10}{'max':>10}  n")
    for part in (hamta, baseline):
        if part is None:
            continue
        dist = distribution(part.rtos)
        say(
            f"{part.name:<28}{_cell(dist['min']):>10}{_cell(dist['median']):>10}"
            f"{_cell(dist['p95']):>10}{_cell(dist['max']):>10}  {len(part.rtos)}"
        )
    if data["ratio_median"] is not None:
        say(
            f"median RTO hamta/baseline: {data['ratio_median']:.3f} "
            f"(baseline/hamta {1 / data['ratio_median']:.2f})"
        )
    for part, order in ((hamta, STEP_ORDER), (baseline, BASELINE_STEP_ORDER)):
        if part is None or not part.failovers:
            continue
        detect = detect_mean(part.failovers)
        means = phase_means(part.failovers, order)
        say(
            f"{part.name} mean: detect {_cell(detect)}; "
            + " ".join(f"{name} {seconds * 1000:.1f}ms" for name, seconds in means.items())
            + f" (sum {sum(means.values()) * 1000:.0f}ms)"
        )
        troubled = [f for f in part.failovers if f.anomalies]
        if troubled:
            lost = statistics.fmean(f.phases.get("retry", 0.0) for f in troubled)
            clean = distribution([f.rto for f in part.failovers if not f.anomalies])["median"]
            say(
                f"{part.name}: {len(troubled)} of {len(part.failovers)} takeovers went wrong "
                f"first (mean {lost:.3f}s lost to it; median RTO of the others "
                f"{_cell(clean)}): {troubled[0].anomalies[0]}"
            )
    say(
        f"hamta switchover: clients unavailable {_cell(data['switchover_s'])}, "
        f"command {_cell(data['switchover_command_s'])}"
    )
    for part in (hamta, baseline):
        if part is not None and part.verdict is not None:
            say(f"{part.name} load: {_verdict_line(part.verdict)}")
        if part is not None and part.error:
            say(f"{part.name} FAILED: {part.error}")
    if data["baseline_missing"]:
        say(f"baseline missing: {data['baseline_missing']}")


# ---------------------------------------------------------------------------- lifecycle


def take_down(lab: Lab, attempts: int = 3) -> None:
    """``lab.down()``, again after a pause if a process was still exiting (a notify script's
    umount ends with its mount namespace)."""
    for attempt in range(attempts):
        try:
            lab.down()
            return
        except LabError as exc:
            if attempt + 1 == attempts:
                raise
            say(f"  lab down: {exc}; trying again")
            time.sleep(1.0)


_forked = False  # set in a fork of this process by the hook below, never in the benchmark


def _interrupt(signum: int, frame: FrameType | None) -> None:
    if _forked:
        # A fork of this process (pyroute2 forks to enter namespaces, and ends its forks with
        # SIGTERM) must exit, never unwind through the benchmark's finally blocks.
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _in_fork() -> None:
    global _forked  # noqa: PLW0603 - a flag only a fork's own memory ever sees set
    _forked = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def run(args: argparse.Namespace, out: IO[str]) -> int:
    """The whole benchmark; prints the JSON line to ``out``; the exit status."""
    started = time.monotonic()
    if os.geteuid() != 0:
        raise BenchError("needs root: network namespaces, a loop device, mounts")
    base = Path(tempfile.mkdtemp(prefix="hamta-bench-failover-", dir=args.workdir))
    base.chmod(0o755)  # Postfix's unprivileged daemons reach their queue below it
    if args.cluster == "vagrant":
        return run_on_vagrant(args, out, base, started)
    lab = Lab(base / "lab", prefix=args.prefix, subnet=args.subnet)
    say(f"lab directory: {lab.directory}")
    say(f"load average before the run: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    hamta = PartResult("hamta")
    baseline: PartResult | None = None
    missing: str | None = "--no-baseline" if args.no_baseline else None
    ok = True
    try:
        try:
            run_hamta(lab, args, hamta)
        except (BenchError, LabError, OSError, subprocess.SubprocessError) as exc:
            hamta.error = str(exc)
            ok = False
            say(f"hamta: FAILED: {exc}")
        if not args.no_baseline and hamta.error is not None:
            missing = "not run: hamta's part failed"
        elif not args.no_baseline:
            baseline = PartResult("baseline")
            try:
                run_baseline(lab, args, baseline, base / "baseline")
            except (BaselineError, BenchError, LabError, OSError, subprocess.SubprocessError) as e:
                baseline.error = str(e)
                missing = f"failed: {e}"
                ok = False
                say(f"baseline: FAILED: {e}")
    except KeyboardInterrupt:
        say("interrupted; taking the lab down")
        ok = False
        missing = missing or "interrupted"
    finally:
        with shielded():
            try:
                take_down(lab)
            except LabError as exc:
                say(f"lab down FAILED: {exc}")
                ok = False
            if args.keep:
                say(f"kept {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)
    for part in (hamta, baseline):
        if part is not None and part.verdict is not None and not part.verdict.ok:
            ok = False
    data = figures(args, hamta, baseline, missing, ok, time.monotonic() - started)
    report(hamta, baseline, data)
    print(json.dumps(data), file=out, flush=True)
    return 0 if ok else 1


def run_on_vagrant(args: argparse.Namespace, out: IO[str], base: Path, started: float) -> int:
    """The benchmark on the Vagrant cluster; always destroyed afterwards, like the lab."""
    checkout = Path(cluster.__file__).resolve().parent.parent
    workdir = args.reuse or base / "vagrant"
    machines = VagrantCluster(checkout, workdir, namespace=args.namespace, driver=args.driver)
    say(f"work directory: {machines.workdir}")
    say(f"load average before the run: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    hamta = PartResult("hamta")
    missing = "not on the Vagrant cluster (the baseline runs in the lab)"
    ok = True
    try:
        if args.reuse is None or not machines.attach():
            machines.start_host()
        run_vagrant(machines, args, hamta)
    except (BenchError, VagrantError, ConfigError, OSError, subprocess.SubprocessError) as exc:
        hamta.error = str(exc)
        ok = False
        say(f"hamta: FAILED: {exc}")
    except KeyboardInterrupt:
        say("interrupted; destroying the cluster")
        ok = False
    finally:
        with shielded():
            if args.keep_cluster:
                say(
                    f"cluster kept up; reuse it with HAMTA_VAGRANT_WORKDIR={machines.workdir} "
                    "pytest -m vagrant, which destroys it at the end"
                )
            else:
                with contextlib.suppress(VagrantError):
                    machines.destroy()
                problems = machines.stop_host()
                if problems:
                    say(f"cluster down: left {problems}")
                    ok = False
            if args.keep or args.keep_cluster:
                say(f"kept {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)
    if hamta.verdict is not None and not hamta.verdict.ok:
        ok = False
    data = figures(args, hamta, None, missing, ok, time.monotonic() - started)
    data["cluster"] = "vagrant"
    data["driver"] = machines.driver
    report(hamta, None, data)
    print(json.dumps(data), file=out, flush=True)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``bench/failover.py``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20, help="kills per pair")
    parser.add_argument(
        "--queued",
        type=int,
        default=None,
        help=f"messages in the deep queue (10000 in the lab, {VAGRANT_QUEUED} on vagrant)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="hamta only")
    parser.add_argument("--rate", type=float, default=20.0, help="load: attempts per second")
    parser.add_argument("--connections", type=int, default=8, help="load: sessions")
    parser.add_argument("--keep", action="store_true", help="keep the lab directory")
    parser.add_argument("--workdir", type=Path, default=None, help="where the lab directory goes")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="the lab's namespace prefix")
    parser.add_argument("--subnet", default=DEFAULT_SUBNET, help="the lab's subnet")
    parser.add_argument(
        "--cluster",
        choices=("lab", "vagrant"),
        default="lab",
        help="where to run: the namespace lab, or the Vagrant cluster (vagrant/, real DRBD)",
    )
    parser.add_argument(
        "--driver",
        choices=("qemu", "kvm"),
        default=os.environ.get("HAMTA_VAGRANT_DRIVER") or "qemu",
        help="vagrant: libvirt's domain type (qemu is TCG; KVM guests may hang when nested)",
    )
    parser.add_argument(
        "--namespace", default=VAGRANT_NAMESPACE, help="vagrant: the network namespace to use"
    )
    parser.add_argument(
        "--keep-cluster",
        action="store_true",
        help="vagrant: leave the cluster up (and its work directory) for pytest -m vagrant",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="vagrant: the work directory of a cluster left up by --keep-cluster",
    )
    args = parser.parse_args(argv)
    if args.queued is None:
        args.queued = VAGRANT_QUEUED if args.cluster == "vagrant" else 10_000
    if args.iterations <= 0 or args.queued < 0 or args.rate <= 0 or args.connections <= 0:
        parser.error("--iterations, --rate and --connections must be positive, --queued >= 0")
    # ^C and SIGTERM unwind through the finally blocks that take the lab down; SIGINT may
    # arrive ignored (started with & from a non-interactive shell), so it is set explicitly.
    # Forks (pyroute2's, into namespaces) get the default handlers back.
    os.register_at_fork(after_in_child=_in_fork)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args, sys.stdout)
    except BenchError as exc:
        say(f"FAILED: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
