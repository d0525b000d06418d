"""The nemeses: each fault the chaos suite injects into the lab's pair, and how it is undone.

A fault acts on the pair as the runner found it (``FaultContext.active`` serves, ``peer`` waits)
and records what it did as marks on the iteration's timeline. ``inject`` breaks something;
``recovered`` says when the runner may stop waiting (by default: a client got a 250 after the
fault); ``heal`` undoes what can be undone (a partition lifted, ZooKeeper servers restarted).
Nodes that a fault or a STONITH powered off are started again by the runner before the next
iteration, as an operator (or systemd) would.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, TypeVar

from chaos.gray_views import VERDICTS_TIMEOUT, gray_decisions, service_up_everywhere, vip_state
from chaos.results import Mark
from cluster.config import AgentSection
from cluster.lab import partitions, probes
from cluster.lab.history import Attempt, recovery_time
from cluster.lab.lab import Lab
from cluster.lab.topology import CLIENT, INTERNET, MAIL_DOMAINS
from cluster.zookeeper import ZooKeeperServer

T = TypeVar("T")
SKEW = "+45s"  # the clock-skew scenario's offset of one node's wall clock
# The agents' default anti-flapping interval (the lab does not change it).
MIN_FAILOVER_INTERVAL: float = AgentSection.model_fields["min_failover_interval"].default


class FaultError(Exception):
    """A fault could not be injected or undone (the lab is not as it should be)."""


@dataclass
class FaultContext:
    """The pair a fault acts on, and the iteration's timeline."""

    lab: Lab
    active: str
    peer: str
    rng: random.Random
    marks: list[Mark] = field(default_factory=list)
    fault_at: float = 0.0
    heal_at: float | None = None
    outage_from: float | None = None  # the first failed attempt after the fault
    skews: dict[int, float] = field(default_factory=dict)  # pid: seconds its clock ran ahead

    def mark(self, kind: str, node: str, text: str) -> None:
        """Add an instant to the timeline, now."""
        self.marks.append(Mark(time.monotonic(), kind, node, text))


def process_pids(lab: Lab, node: str, *words: bytes) -> list[int]:
    """The pids of ``node`` whose command line holds every one of ``words``."""
    found = []
    for pid in lab.node_pids(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(word in argv for word in words):
            found.append(pid)
    return found


def agent_pid(lab: Lab, node: str) -> int:
    """The pid of ``node``'s agent; FaultError when it does not run."""
    pids = process_pids(lab, node, b"hamtactl", b"agent")
    if not pids:
        raise FaultError(f"no agent runs on {node}")
    return pids[0]


def relay_pid(lab: Lab, node: str) -> int:
    """The pid of ``node``'s main relay process (its workers are its children)."""
    pids = [p for p in process_pids(lab, node, b"hamtactl", b"serve") if not _is_worker(p)]
    if not pids:
        raise FaultError(f"no relay runs on {node}")
    return pids[0]


def _is_worker(pid: int) -> bool:
    try:
        return b"--worker" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def _signal(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Fault:
    """One kind of fault; the subclasses are the scenarios."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Does the active role move to the peer? (For the report; the checker judges anyway.)
    fails_over: ClassVar[bool] = True
    # How long the runner waits for ``recovered`` before it calls the iteration a failure.
    patience: ClassVar[float] = 45.0
    # The active node must ride the fault out: the runner fails the iteration on any demotion
    # of it or any refused client after the fault.
    steady: ClassVar[bool] = False
    # Why the profiles leave the scenario out (run it by name with --scenario), when its goal is
    # not met in the lab yet: a profile is what operators put in their CI, and it must pass.
    pending: ClassVar[str | None] = None

    def inject(self, ctx: FaultContext) -> None:
        """Break something."""
        raise NotImplementedError

    def recovered(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> bool:
        """Whether the runner may stop waiting: by default, a 250 after the fault."""
        return recovery_time(attempts, ctx.fault_at) is not None

    def heal(self, ctx: FaultContext) -> None:
        """Undo what can be undone; by default nothing."""

    def judge(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> list[str]:
        """What this scenario promises beyond the checker's rules; the broken promises."""
        return []


class KillRelay(Fault):
    name = "kill-relay"
    summary = "kill -9 of the active relay: its agent restarts it in place"
    fails_over = False

    def inject(self, ctx: FaultContext) -> None:
        pid = relay_pid(ctx.lab, ctx.active)
        _signal([pid], signal.SIGKILL)
        ctx.mark("fault", ctx.active, f"kill -9 relay (pid {pid})")


class KillAgent(Fault):
    name = "kill-agent"
    summary = "kill -9 of the active agent: its relay dies with it, its watchdog drops the VIP"

    def inject(self, ctx: FaultContext) -> None:
        pid = agent_pid(ctx.lab, ctx.active)
        _signal([pid], signal.SIGKILL)
        ctx.mark("fault", ctx.active, f"kill -9 agent (pid {pid})")
        ctx.mark("role", ctx.active, "down (agent killed)")


class KillNode(Fault):
    name = "kill-node"
    summary = "kill -9 of every process of the active node"

    def inject(self, ctx: FaultContext) -> None:
        ctx.lab.kill_node(ctx.active)
        # The node is down once its last process is: an attempt begun while the kill went
        # through its processes could still get its 250 (an RTO of 0.04 s was measured).
        ctx.fault_at = time.monotonic()
        ctx.mark("fault", ctx.active, "kill -9 of the whole node")
        ctx.mark("role", ctx.active, "down (killed)")


class FreezeNode(Fault):
    name = "freeze-node"
    summary = "SIGSTOP of the active node past its session timeout, then SIGCONT"

    def inject(self, ctx: FaultContext) -> None:
        ctx.lab.kill_node(ctx.active, signal.SIGSTOP)
        ctx.mark("fault", ctx.active, "SIGSTOP of the whole node")
        ctx.mark("role", ctx.active, "frozen")

    def heal(self, ctx: FaultContext) -> None:
        # Usually nothing is left: the peer's STONITH powered the frozen node off.
        _signal(ctx.lab.node_pids(ctx.active), signal.SIGCONT)
        ctx.mark("heal", ctx.active, "SIGCONT")


class _Partition(Fault):
    """A partition of the active node: over once the peer serves, lifted by ``heal``."""

    took_over: float | None = None

    def recovered(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> bool:
        # A 250 from the cut-off node proves nothing (it may serve on until it demotes
        # itself, or answer an attempt begun before the rules applied): wait for the peer's.
        if self.took_over is None and ctx.lab.active_node() == ctx.peer:
            self.took_over = time.monotonic()
        return self.took_over is not None and recovery_time(attempts, self.took_over) is not None

    def heal(self, ctx: FaultContext) -> None:
        partitions.lift(ctx.lab, ctx.active)
        ctx.mark("heal", ctx.active, "partition lifted")


class PartitionZookeeper(_Partition):
    name = "partition-zk"
    summary = "the active node cut off from ZooKeeper only (nftables); clients still reach it"

    def inject(self, ctx: FaultContext) -> None:
        partitions.cut_from_zookeeper(ctx.lab, ctx.active)
        ctx.mark("fault", ctx.active, "cut off from ZooKeeper")


class PartitionNode(_Partition):
    name = "partition-node"
    summary = "the active node cut off from everything (nftables drops all on its eth0)"

    def inject(self, ctx: FaultContext) -> None:
        partitions.cut_off(ctx.lab, ctx.active)
        # The outage begins when the rules apply: an attempt begun before may still get its 250.
        ctx.fault_at = time.monotonic()
        ctx.mark("fault", ctx.active, "cut off from everything")


class KillZookeeperLeader(Fault):
    name = "kill-zk-leader"
    summary = "kill -9 of the ZooKeeper leader: the ensemble elects another"
    fails_over = False
    killed: ZooKeeperServer | None = None

    def inject(self, ctx: FaultContext) -> None:
        leader = ctx.lab.ensemble.leader()
        if leader is None:
            raise FaultError("the ensemble has no leader to kill")
        self.killed = leader
        leader.kill()
        ctx.mark("fault", "zookeeper", f"kill -9 of ZooKeeper server {leader.spec.id} (leader)")

    def heal(self, ctx: FaultContext) -> None:
        if self.killed is None:  # nothing was killed: the runner's restore starts any server down
            return
        self.killed.start()
        self.killed.wait_serving(60)
        ctx.mark("heal", "zookeeper", f"ZooKeeper server {self.killed.spec.id} back")


class ZookeeperQuorumLoss(Fault):
    """Two of three servers down for ``outage`` seconds.

    By design the pair stops serving: without a quorum no node can hold a session, and a node
    that cannot prove its leadership demotes itself (safety over availability). The recovery
    time is counted from the fault, so it includes the outage; the report shows it as such.
    """

    name = "zk-quorum-loss"
    summary = "two of three ZooKeeper servers down for 6 s: the pair stops serving, never two"
    fails_over = False
    outage = 6.0

    def inject(self, ctx: FaultContext) -> None:
        servers = ctx.lab.ensemble.servers
        self.killed = ctx.rng.sample(list(servers), 2)
        for server in self.killed:
            server.kill()
        ids = ", ".join(str(s.spec.id) for s in self.killed)
        ctx.mark("fault", "zookeeper", f"ZooKeeper servers {ids} killed: no quorum")
        time.sleep(self.outage)  # the outage itself: what the pair does meanwhile is the test
        for server in self.killed:
            server.start()
        for server in self.killed:
            server.wait_serving(60)
        ctx.heal_at = time.monotonic()
        ctx.mark("heal", "zookeeper", f"ZooKeeper servers {ids} back: quorum")

    def recovered(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> bool:
        return ctx.heal_at is not None and recovery_time(attempts, ctx.heal_at) is not None


class ZookeeperRollingRestart(Fault):
    """Every ZooKeeper server restarted in turn (SIGTERM, started again), ``pause`` apart.

    The quorum never goes: at most one server is down at a time. The active agent's connection
    drops when its server stops, and kazoo reconnects to another within milliseconds, long
    before the session could expire on the server: the node has no reason to demote.
    """

    name = "zk-rolling-restart"
    summary = "every ZooKeeper server restarted in turn, 5 s apart: no demotion, no refusal"
    fails_over = False
    steady = True
    pause = 5.0
    patience = 120.0
    # Restarting the ensemble's leader leaves ~1.3 s without any answer, and the lab's 2 s
    # session only 1.25 s before the node must demote: without failsafe, 5 demotions in 8
    # iterations. With the peer's failsafe lease the node serves on past its session's
    # deadline: 0 demotions and 0 refusals in 7 iterations (docs/chaos.md).

    def inject(self, ctx: FaultContext) -> None:
        for server in ctx.lab.ensemble.servers:
            server.stop()
            ctx.mark("fault", "zookeeper", f"ZooKeeper server {server.spec.id} stopped (SIGTERM)")
            server.start()
            server.wait_serving(60)
            ctx.mark("heal", "zookeeper", f"ZooKeeper server {server.spec.id} back")
            time.sleep(self.pause)  # the operator's pace between two servers: part of the fault
        ctx.heal_at = time.monotonic()

    def heal(self, ctx: FaultContext) -> None:
        for server in ctx.lab.ensemble.servers:  # a restart that failed half-way
            if server.pid is None:
                server.start()
                server.wait_serving(60)


def _stop_ensemble(ctx: FaultContext) -> None:
    for server in ctx.lab.ensemble.servers:
        server.kill()
    ctx.mark("fault", "zookeeper", "every ZooKeeper server killed: no ensemble at all")


def _start_ensemble(ctx: FaultContext, *, missing_only: bool = False) -> None:
    """Every server started again (``missing_only``: those an error left down)."""
    servers = [s for s in ctx.lab.ensemble.servers if not missing_only or s.pid is None]
    for server in servers:
        server.start()
    for server in servers:
        server.wait_serving(60)


class StopZookeeperServer(Fault):
    """SIGSTOP of the ZooKeeper server the active agent is connected to, ``outage`` s long.

    A stopped server keeps its connections open and answers nothing; kazoo pings only in a
    pause of the requests, and the agent's requests never pause, so kazoo never notices. The
    agent leaves the server itself after a quarter of its session (``ZooKeeperServerLeft``,
    docs/fencing.md) and its session goes on through another server. When that server is the
    ensemble's leader, the others elect another meanwhile, as for ``kill-zk-leader``.
    Goal: no demotion, no refusal, and the move in the active agent's log.
    """

    name = "zk-server-stopped"
    summary = "SIGSTOP of the active node's ZooKeeper server for 10 s: the session moves"
    fails_over = False
    steady = True
    outage = 10.0
    stopped: ZooKeeperServer | None = None

    def inject(self, ctx: FaultContext) -> None:
        pid = agent_pid(ctx.lab, ctx.active)
        server = ctx.lab.ensemble.server_of(pid)
        if server is None:
            raise FaultError(f"{ctx.active}'s agent is connected to no ZooKeeper server")
        mode = server.mode() or "not serving"
        self.stopped = server
        server.freeze()
        ctx.mark("fault", "zookeeper", f"ZooKeeper server {server.spec.id} ({mode}) SIGSTOP")
        time.sleep(self.outage)  # what the pair does meanwhile is the test
        server.thaw()
        ctx.heal_at = time.monotonic()
        ctx.mark("heal", "zookeeper", f"ZooKeeper server {server.spec.id} SIGCONT")

    def recovered(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> bool:
        return ctx.heal_at is not None and recovery_time(attempts, ctx.heal_at) is not None

    def heal(self, ctx: FaultContext) -> None:
        if self.stopped is not None and self.stopped.pid is not None:  # cut short by an error
            self.stopped.thaw()

    def judge(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> list[str]:
        if self.stopped is None:
            return []
        log = ctx.lab.node_dir(ctx.active) / "agent.log"
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        server = self.stopped.spec.hosts
        if not any(
            e.get("event") == "ZooKeeperServerLeft" and e.get("server") == server for e in lines
        ):
            return [f"the active node did not say it left the stopped server {server}"]
        return []


class ZookeeperOutage(Fault):
    """Every ZooKeeper server stopped (kill -9) for ``outage`` seconds, then started again.

    Both nodes stay healthy: the active node serves on in failsafe, on its peer's leases over
    the peer channel (docs/fencing.md, "Failsafe"). Goal: no demotion, no refusal at all.
    """

    name = "zk-outage"
    summary = "all three ZooKeeper servers down for 60 s: failsafe, no refusal"
    fails_over = False
    steady = True
    outage = 60.0
    patience = 150.0

    def inject(self, ctx: FaultContext) -> None:
        self.cut(ctx)
        _stop_ensemble(ctx)
        time.sleep(self.outage)  # the outage itself: what the pair does meanwhile is the test
        _start_ensemble(ctx)
        ctx.heal_at = time.monotonic()
        ctx.mark("heal", "zookeeper", "every ZooKeeper server back")

    def cut(self, ctx: FaultContext) -> None:
        """What else is cut for the outage (the variant with the peer channel)."""

    def recovered(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> bool:
        return ctx.heal_at is not None and recovery_time(attempts, ctx.heal_at) is not None

    def heal(self, ctx: FaultContext) -> None:
        _start_ensemble(ctx, missing_only=True)  # an outage cut short by an error


class ZookeeperOutageChannelCut(ZookeeperOutage):
    """The same outage with the active node's peer channel cut too: nothing to confirm with,
    so it demotes by its session deadline, as without failsafe; nobody serves until the
    ensemble is back."""

    name = "zk-outage-cut"
    summary = "ZooKeeper down and the peer channel cut: the active node demotes, never two"
    steady = False
    outage = 20.0

    def cut(self, ctx: FaultContext) -> None:
        partitions.cut_peer_channel(ctx.lab, ctx.active)
        ctx.mark("fault", ctx.active, "peer channel cut (nftables)")

    def heal(self, ctx: FaultContext) -> None:
        partitions.lift(ctx.lab, ctx.active)
        ctx.mark("heal", ctx.active, "peer channel back")
        super().heal(ctx)

    def judge(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> list[str]:
        log = ctx.lab.node_dir(ctx.active) / "agent.log"
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        lost = [d for d in lines if d.get("event") == "Decision" and d.get("was") == "active"]
        if not any(d.get("trigger") == "session_lost" for d in lost):
            return ["the active node did not demote with ZooKeeper down and the channel cut"]
        return []


class ZookeeperRegainOneSide(_Partition):
    """Every ZooKeeper server down; the active node serves in failsafe; the ensemble comes back
    for the passive node only (the active node cut off from it by nftables). The failsafe node
    must stop serving before the passive node serves: the sampler and the logs judge it."""

    name = "zk-regain-one-side"
    summary = "ZooKeeper down, then back for the passive node only: failover, never two"
    outage = 10.0
    patience = 90.0

    def inject(self, ctx: FaultContext) -> None:
        _stop_ensemble(ctx)
        time.sleep(self.outage)  # the active node serves in failsafe meanwhile
        partitions.cut_from_zookeeper(ctx.lab, ctx.active)
        ctx.mark("fault", ctx.active, "cut off from ZooKeeper")
        _start_ensemble(ctx)
        ctx.mark("heal", "zookeeper", f"every ZooKeeper server back, for {ctx.peer} only")

    def heal(self, ctx: FaultContext) -> None:
        super().heal(ctx)
        _start_ensemble(ctx, missing_only=True)


class Switchover(Fault):
    name = "switchover"
    summary = "a planned switchover under load (hamta cluster switchover --to PEER)"

    def inject(self, ctx: FaultContext) -> None:
        config = ctx.lab.node_dir(ctx.active) / "agent.toml"
        command = [
            ctx.lab.python,
            "-m",
            "hamtactl",
            "cluster",
            "switchover",
            "--to",
            ctx.peer,
            "--config",
            str(config),
        ]
        ctx.mark("fault", ctx.active, f"switchover to {ctx.peer} requested")
        done = ctx.lab.exec("client", command, timeout=90)
        if done.returncode != 0:
            raise FaultError(f"switchover: {done.stderr.strip()}")
        ctx.mark("note", ctx.peer, done.stdout.strip())


class Flapping(Fault):
    """Three kill -9 failovers in a row, each node started again as soon as the peer serves."""

    name = "flapping"
    summary = "three failovers in a row (kill -9 of the active node, restart, again)"
    rounds = 3
    patience = 150.0

    def inject(self, ctx: FaultContext) -> None:
        lab, active = ctx.lab, ctx.active
        for round_ in range(self.rounds):
            lab.kill_node(active)
            ctx.mark("fault", active, f"kill -9 of the whole node ({round_ + 1}/{self.rounds})")
            ctx.mark("role", active, "down (killed)")
            if round_ == self.rounds - 1:
                return
            killed = active
            active = wait_until(functools.partial(_serving_other, lab, killed), 60, "a takeover")
            lab.start_agent(killed)
            wait_until(lambda: _pair(lab), 60, "the pair again")

    def recovered(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> bool:
        last = [m.at for m in ctx.marks if m.kind == "fault"][-1]
        return recovery_time(attempts, last) is not None


class DiskFull(Fault):
    """The spool's file system filled up on the active node for 5 s, then freed."""

    name = "disk-full"
    summary = "the spool's disk full (ENOSPC): 452 4.3.1 refusals, nothing lost"
    fails_over = False
    full_for = 5.0

    def inject(self, ctx: FaultContext) -> None:
        lab, node = ctx.lab, ctx.active
        pid = agent_pid(lab, node)  # the mount lives in the agent's mount namespace
        self.filler = lab.node_dir(node) / "mnt" / "chaos-filler"
        enter = ["nsenter", "-t", str(pid), "-m", "--"]
        df = subprocess.run(
            [*enter, "df", "-B1", "--output=avail", str(self.filler.parent)],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
        if df.returncode != 0:
            raise FaultError(f"df of the spool on {node}: {df.stderr.strip()}")
        avail = int(df.stdout.split()[-1])
        size = max(avail - 4 * 1024 * 1024, 1)
        done = subprocess.run(
            [*enter, "fallocate", "-l", str(size), str(self.filler)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if done.returncode != 0:
            raise FaultError(f"filling the spool on {node}: {done.stderr.strip()}")
        self.enter = enter
        ctx.mark("fault", node, f"spool disk filled ({size // 1_000_000} MB)")
        time.sleep(self.full_for)  # the relay refuses with 452 meanwhile: that is the test
        subprocess.run([*enter, "rm", "-f", str(self.filler)], check=False, timeout=30)
        ctx.heal_at = time.monotonic()
        ctx.mark("heal", node, "filler removed")

    def recovered(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> bool:
        return ctx.heal_at is not None and recovery_time(attempts, ctx.heal_at) is not None

    def judge(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> list[str]:
        end = ctx.heal_at if ctx.heal_at is not None else float("inf")
        during = [a for a in attempts if ctx.fault_at <= a.start <= end and a.outcome == "refused"]
        codes = {a.code for a in during}
        problems = []
        if 452 not in codes:
            problems.append("no 452 4.3.1 refusal while the spool's disk was full")
        if codes - {452}:
            problems.append(f"refusals other than 452 while the disk was full: {sorted(codes)}")
        return problems


class ClockSkew(Fault):
    """One node's wall clock runs ``SKEW`` ahead (libfaketime); it takes over, then dies too.

    The first takeover is the skewed node's, on the true node's death; the one measured is the
    next: the node with the true clock takes back over from a term stamped by a clock ahead.
    (Before the agents dated a takeover by its first sighting, that waited for the clock's lead.)
    """

    name = "clock-skew"
    summary = (
        f"the passive node's clock {SKEW} off (libfaketime); kill -9 of the active, "
        "then of the skewed node once it is active"
    )

    def inject(self, ctx: FaultContext) -> None:
        lab = ctx.lab
        library = _faketime_library()
        lab.fence(ctx.peer)
        wait_until(lambda: ctx.peer not in _members(lab), 30, "the peer's session to end")
        lab.start_agent(
            ctx.peer,
            # The monotonic clock moves by the same offset (harmless: only its differences
            # count). Left alone, libfaketime 0.9.10 makes clock_nanosleep on it fail (EINVAL).
            env={"LD_PRELOAD": library, "FAKETIME": SKEW},
        )
        wait_until(lambda: _pair(lab), 60, "the pair with a skewed peer")
        # Kept now: the skewed node is killed below, and its log lines must still be placed.
        ctx.skews.update(skewed_processes(lab))
        ctx.mark("note", ctx.peer, f"agent restarted with its clock {SKEW}")
        lab.kill_node(ctx.active)
        ctx.mark("note", ctx.active, "kill -9 of the whole node: the skewed node takes over")
        wait_until(lambda: _pair_or_alone(lab) == ctx.peer, 60, "the skewed node to take over")
        wait_until(lambda: ctx.active not in _members(lab), 30, "the killed node's session to end")
        lab.start_agent(ctx.active)
        wait_until(lambda: _pair(lab) == ctx.peer, 60, "the pair, the skewed node active")
        time.sleep(MIN_FAILOVER_INTERVAL)  # a takeover so soon after the last would wait anyway
        ctx.active, ctx.peer = ctx.peer, ctx.active
        lab.kill_node(ctx.active)
        ctx.fault_at = time.monotonic()  # down once its last process is, as in KillNode
        ctx.mark("fault", ctx.active, "kill -9 of the whole (skewed) node")
        ctx.mark("role", ctx.active, "down (killed)")


class HostileClient(Fault):
    """Every input a security review found harmful, sent through the virtual IP under load.

    ``chaos.hostile`` plays each hostile session from the client host and judges its replies
    (refused where they must be, no stall, no internals shown); the scenario then asks that the
    active node stayed active and ready and that the load went on: one client's bytes must
    never stop the relay for the others, nor make it unready, nor fail it over.
    """

    name = "hostile-client"
    summary = "hostile SMTP sessions through the VIP (bad bytes, injection, floods): no stall"
    fails_over = False
    patience = 120.0

    def __init__(self) -> None:
        self.findings: list[str] = []

    def inject(self, ctx: FaultContext) -> None:
        ctx.mark("fault", ctx.active, "hostile sessions start")
        done = ctx.lab.run_module(
            CLIENT,
            "chaos.hostile",
            ["--to", f"{ctx.lab.vip}:25", "--domain", MAIL_DOMAINS[0]],
            timeout=110.0,
        )
        records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        self.findings = [
            f"{record['session']}: {problem}"
            for record in records
            if "session" in record  # the last line is the summary
            for problem in record["problems"]
        ]
        if done.returncode not in (0, 1):
            self.findings.append(f"chaos.hostile exited {done.returncode}: {done.stderr[-300:]}")
        ctx.heal_at = time.monotonic()
        ctx.mark("heal", ctx.active, f"hostile sessions done: {len(self.findings)} problems")

    def recovered(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> bool:
        return ctx.heal_at is not None and recovery_time(attempts, ctx.heal_at) is not None

    def judge(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> list[str]:
        problems = list(self.findings)
        active = ctx.lab.active_node()
        if active != ctx.active:
            problems.append(f"the active node changed ({ctx.active} -> {active})")
        elif not ctx.lab.relay_ready(active):
            problems.append(f"{active}'s relay is not ready after the hostile sessions")
        end = ctx.heal_at if ctx.heal_at is not None else float("inf")
        refused = [a for a in attempts if ctx.fault_at <= a.start <= end and a.outcome != "acked"]
        if refused:
            codes = sorted({str(a.code) for a in refused})
            problems.append(f"{len(refused)} load attempts failed beside them ({codes})")
        return problems


class GrayFailure(_Partition):
    """The active node's port 25 dropped from its clients only: it looks healthy to itself.

    The lab runs its check locations' monitors for this scenario only (the others measure the
    pair alone): they are started, and seen to find the service up, before the fault.
    """

    name = "gray-failure"
    summary = (
        "the active node's port 25 dropped from the client and internet hosts (nftables); its "
        "own probe passes: the check locations' verdicts move the service"
    )
    sources: ClassVar[tuple[str, ...]] = (CLIENT, INTERNET)
    patience = 60.0
    gray_before = 0  # the active node's gray failure decisions before the fault

    def inject(self, ctx: FaultContext) -> None:
        lab = ctx.lab
        # First: the log holds the decisions of earlier iterations, judged by theirs.
        self.gray_before = len(gray_decisions(lab, ctx.active))
        # Down after two failed checks a second apart: the goal's 10 s allow it, and one check
        # that a loaded machine made slow does not move the service.
        lab.start_monitors(failure_threshold=2)
        # Each look starts `hamta monitor status` per location: seconds on a loaded machine.
        wait_until(lambda: service_up_everywhere(lab), 120, "the monitors to see the service up")
        partitions.block_smtp_from(lab, ctx.active, self.sources)
        ctx.fault_at = time.monotonic()  # the outage begins when the rule applies
        ctx.mark("fault", ctx.active, f"port 25 dropped from {', '.join(self.sources)}")

    # recovered: as for a partition, a 250 from the node cut off proves nothing; the peer's does.

    def heal(self, ctx: FaultContext) -> None:
        partitions.lift(ctx.lab, ctx.active)
        ctx.mark("heal", ctx.active, "port 25 open to everyone again")
        ctx.lab.stop_monitors()

    def judge(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> list[str]:
        decisions = gray_decisions(ctx.lab, ctx.active)[self.gray_before :]
        if not decisions:
            return [f"{ctx.active} made no gray failure decision"]
        ctx.mark("note", ctx.active, decisions[0])
        return []


class GrayFailureOneLocation(GrayFailure):
    """The same fault seen from one check location only: the service must not move."""

    name = "gray-failure-one"
    summary = (
        "the active node's port 25 dropped from the internet host only: one check location "
        "sees the service down, the other does not; no failover"
    )
    sources = (INTERNET,)
    fails_over = False
    steady = True  # the client's host still reaches it: no refusal, no demotion
    hold = 12.0  # how long the fault stays: several of the monitors' check rounds
    seen: dict[str, str | None] | None = None

    def recovered(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> bool:
        return time.monotonic() - ctx.fault_at >= self.hold

    def heal(self, ctx: FaultContext) -> None:
        # What each location saw, read before the rule goes.
        verdicts = ctx.lab.monitor_verdicts(VERDICTS_TIMEOUT)
        self.seen = {location: vip_state(rows) for location, rows in verdicts.items()}
        super().heal(ctx)

    def judge(self, ctx: FaultContext, attempts: Sequence[Attempt]) -> list[str]:
        problems = []
        if gray_decisions(ctx.lab, ctx.active)[self.gray_before :]:
            problems.append(f"{ctx.active} made a gray failure decision on one location's word")
        if self.seen != {INTERNET: "down", CLIENT: "up"}:
            problems.append(f"the locations did not see what the fault does: {self.seen}")
        return problems


def _pair_or_alone(lab: Lab) -> str | None:
    roles = _members(lab)
    active = [node for node, role in roles.items() if role == "active"]
    return active[0] if len(active) == 1 and lab.active_node() == active[0] else None


def skewed_processes(lab: Lab) -> dict[int, float]:
    """The pids of the lab's nodes running under libfaketime, with their clock's lead in s."""
    skews = {}
    for node in lab.nodes:
        for pid in lab.node_pids(node):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            for variable in environ:
                if variable.startswith(b"FAKETIME="):
                    skews[pid] = _lead(variable.removeprefix(b"FAKETIME=").decode())
    return skews


def _lead(faketime: str) -> float:
    """Seconds ahead for libfaketime's relative offsets ("+45s", "-2m", "+1.5h", "+30")."""
    match = re.fullmatch(r"([+-]?\d+(?:\.\d+)?)([smhd]?)", faketime.strip())
    if not match:
        return 0.0  # an absolute or other form: not used by the suite
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return float(match.group(1)) * units[match.group(2)]


def _faketime_library() -> str:
    for candidate in (
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ):
        if Path(candidate).exists():
            return candidate
    raise FaultError("libfaketime is not installed (Debian package faketime)")


def _members(lab: Lab) -> dict[str, str]:
    status = lab.cluster_status()
    return {n["node"]: n["role"] for n in status["nodes"]} if status else {}


def _pair(lab: Lab) -> str | None:
    roles = _members(lab)
    if sorted(roles.values()) != ["active", "passive"]:
        return None
    return lab.active_node()


def _serving_other(lab: Lab, old: str) -> str | None:
    active = lab.active_node()
    return active if active not in (None, old) else None


def wait_until(condition: Callable[[], T | None], timeout: float, what: str) -> T:
    """``cluster.lab.probes.wait_for``, with FaultError naming ``what`` when time runs out."""
    value = probes.wait_for(condition, timeout)
    if not value:
        raise FaultError(f"{what}: not within {timeout:g}s")
    return value


FAULTS: dict[str, type[Fault]] = {
    fault.name: fault
    for fault in (
        KillRelay, KillAgent, KillNode, FreezeNode, PartitionZookeeper, PartitionNode,
        KillZookeeperLeader, ZookeeperQuorumLoss, ZookeeperRollingRestart, StopZookeeperServer,
        ZookeeperOutage, ZookeeperOutageChannelCut, ZookeeperRegainOneSide, Switchover, Flapping,
        DiskFull, ClockSkew, HostileClient, GrayFailure, GrayFailureOneLocation,
    )
}  # fmt: skip
