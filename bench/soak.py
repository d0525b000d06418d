#!/usr/bin/env python3
"""Soak: client load and a CPU hog on each node in turn; every takeover is a false failover.

What is measured
    A lab of its own (prefix ``hsk``, subnet 198.18.12.0/24 unless told otherwise) is built with
    both agents at their defaults (the peer channel's heartbeats every 100 ms, the fenced fast
    takeover after ``peer_timeout`` (1 s) of silence). A continuous client load (``--rate``
    attempts per second over ``--connections`` sessions) runs through the virtual IP for
    ``--minutes`` (30). Meanwhile, turn by turn, ``stress-ng --cpu N`` (N: ``--hog-workers``,
    every core by default) runs inside one node's namespace for ``--hog-seconds``, then
    ``--rest`` seconds of quiet, then the other node. The lab's namespaces share the machine's
    cores: a hog "on a node" starves both agents, the active one and the one that watches it,
    which is the harder case (the watcher's own heartbeats and decisions are late too).

    Nothing is killed, so every takeover and every demotion of the active node is a false
    failover (in production: a healthy node fenced). The agents' ``Decision`` lines
    (bench/takeovers.py) give the takeovers, the demotions and the fences of a silent peer;
    the load gives what the clients saw: refusals, the longest time without a 250, and
    whether every acknowledged message reached the sink.

Output
    One line per hog turn, the figures, then one JSON line: ``false_failovers`` (takeovers),
    ``demotions``, ``silent_fences``, ``longest_gap_s``, the load's figures and ``ok``
    (no false failover, nothing lost).

Usage (as root)
    .venv/bin/python bench/soak.py [--minutes 30] [--hog-seconds 60] [--rest 10]
        [--hog-workers N] [--rate 10] [--connections 4] [--prefix hsk]
        [--subnet 198.18.12.0/24] [--keep]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from failover_common import DRAIN_TIMEOUT, FIRST_ACK_TIMEOUT, UP_TIMEOUT, BenchError, say
from failover_load import Load, drain_and_check, verdict_line
from takeovers import count_moves

from cluster.config import load_agent_config
from cluster.lab.history import Attempt
from cluster.lab.lab import Lab, LabError
from cluster.lab.topology import NODES


def longest_gap(attempts: Sequence[Attempt]) -> float:
    """The longest time the clients went without a 250, from the first to the last attempt."""
    acked = sorted(a.end for a in attempts if a.outcome == "acked")
    if not acked:
        return 0.0
    edges = [min(a.start for a in attempts), *acked, max(a.end for a in attempts)]
    return max(later - earlier for earlier, later in itertools.pairwise(edges))


def hog(lab: Lab, node: str, workers: int, seconds: float) -> None:
    """``stress-ng --cpu`` inside ``node``'s namespace for ``seconds`` (waited for)."""
    argv = ["stress-ng", "--cpu", str(workers), "--timeout", f"{seconds:g}s", "--quiet"]
    process = lab.popen(node, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, error = process.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise BenchError(f"stress-ng on {node} outlived its {seconds:g}s") from None
    if process.returncode != 0:
        raise BenchError(f"stress-ng on {node}: exit {process.returncode}: {error.decode()[-300:]}")


def soak(lab: Lab, args: argparse.Namespace) -> dict[str, Any]:
    """Build the lab, run the load and the hogs, judge; the figures."""
    lab.up(wait=UP_TIMEOUT, monitors=False)
    active = lab.wait_active(UP_TIMEOUT)
    agent = load_agent_config(lab.node_dir(NODES[0]) / "agent.toml").agent
    say(
        f"lab up, {active} active; peer_timeout {agent.peer_timeout:g}s, heartbeats every "
        f"{agent.heartbeat_interval:g}s, fast_takeover {agent.fast_takeover}"
    )
    since = time.time()
    history = lab.directory / "load-soak.jsonl"
    load = Load(lab, history, rate=args.rate, connections=args.connections)
    turns = 0
    try:
        load.wait_first_ack(FIRST_ACK_TIMEOUT)
        deadline = time.monotonic() + args.minutes * 60
        while time.monotonic() < deadline:
            node = NODES[turns % len(NODES)]
            seconds = min(args.hog_seconds, max(deadline - time.monotonic(), 1.0))
            hog(lab, node, args.hog_workers, seconds)
            turns += 1
            load.require_running()
            moves = count_moves([lab.node_dir(n) / "agent.log" for n in NODES], since)
            say(
                f"  turn {turns}: {seconds:.0f}s of {args.hog_workers} CPU hogs on {node}; "
                f"so far {moves.as_dict()}"
            )
            rest = min(args.rest, max(deadline - time.monotonic(), 0.0))
            load.require_running()
            time.sleep(rest)  # quiet between two hogs: the pair's normal pace, measured too
    finally:
        attempts = load.stop()
    verdict = drain_and_check(lab, attempts, DRAIN_TIMEOUT)
    say(f"  load: {verdict_line(verdict)}")
    moves = count_moves([lab.node_dir(n) / "agent.log" for n in NODES], since)
    figures = verdict.as_dict()
    false_failovers = moves.takeovers
    return {
        "minutes": args.minutes,
        "hog_turns": turns,
        "hog_seconds": args.hog_seconds,
        "hog_workers": args.hog_workers,
        "cores": os.cpu_count(),
        "peer_timeout_s": agent.peer_timeout,
        "heartbeat_interval_s": agent.heartbeat_interval,
        "false_failovers": false_failovers,
        "demotions": moves.demotions,
        "silent_fences": moves.silent_fences,
        "fast_takeovers": moves.fast_takeovers,
        "longest_gap_s": round(longest_gap(attempts), 3),
        "sent": figures["sent"],
        "acked": figures["acked"],
        "refused": figures["refused"],
        "unknown": figures["unknown"],
        "lost": figures["lost"],
        "ok": false_failovers == 0 and moves.demotions == 0 and verdict.ok,
    }


def run(args: argparse.Namespace, out: IO[str]) -> int:
    if os.geteuid() != 0:
        raise BenchError("needs root: network namespaces, a loop device, mounts")
    if shutil.which("stress-ng") is None:
        raise BenchError("stress-ng is not installed (scripts/bootstrap installs it)")
    base = Path(tempfile.mkdtemp(prefix="hamta-soak-", dir=args.workdir))
    lab = Lab(base / "lab", prefix=args.prefix, subnet=args.subnet)
    say(f"lab directory: {lab.directory}")
    say(f"load average before the run: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    started = time.monotonic()
    data: dict[str, Any] = {"ok": False}
    try:
        data = soak(lab, args)
    except (BenchError, LabError, OSError, subprocess.SubprocessError) as exc:
        data["error"] = str(exc)
        say(f"FAILED: {exc}")
    except KeyboardInterrupt:
        data["error"] = "interrupted"
    finally:
        try:
            lab.down()
        except LabError as exc:
            say(f"lab down FAILED: {exc}")
            data["ok"] = False
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    data["seconds"] = round(time.monotonic() - started, 1)
    for key, value in data.items():
        say(f"  {key}: {value}")
    print(json.dumps(data), file=out, flush=True)
    return 0 if data["ok"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``bench/soak.py``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--hog-seconds", type=float, default=60.0, help="one hog's turn")
    parser.add_argument("--rest", type=float, default=10.0, help="quiet between two turns")
    parser.add_argument(
        "--hog-workers", type=int, default=os.cpu_count() or 1, help="stress-ng --cpu N"
    )
    parser.add_argument("--rate", type=float, default=10.0, help="load: attempts per second")
    parser.add_argument("--connections", type=int, default=4, help="load: sessions")
    parser.add_argument("--prefix", default="hsk", help="the lab's namespace prefix")
    parser.add_argument("--subnet", default="198.18.12.0/24", help="the lab's subnet")
    parser.add_argument("--workdir", type=Path, default=None, help="where the lab directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the lab directory")
    args = parser.parse_args(argv)
    if min(args.minutes, args.hog_seconds, args.rate) <= 0 or args.rest < 0:
        parser.error("--minutes, --hog-seconds and --rate must be positive, --rest >= 0")
    if args.hog_workers <= 0 or args.connections <= 0:
        parser.error("--hog-workers and --connections must be positive")
    try:
        return run(args, sys.stdout)
    except BenchError as exc:
        say(f"FAILED: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
