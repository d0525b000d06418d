"""The ``hamta agent``, ``hamta cluster ...`` and ``hamta drbd ...`` commands (``hamtactl``).

``hamta cluster`` reads the agent's configuration for ZooKeeper's address, the cluster's name
and its credentials: ``--config FILE``, else ``/etc/hamta/agent.toml``, else, while a lab is up
under ``./var/lab``, the lab (the command then runs itself again inside the lab's client
namespace, the only place from which the lab's ZooKeeper can be reached).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import syslog
import time
from pathlib import Path

from cluster import drbd_handlers
from cluster.config import AgentConfig, ConfigError, load_agent_config
from cluster.coordination_layout import CoordinationError
from cluster.operator import (
    OperatorError,
    cancel_switchover,
    cluster_status,
    format_history,
    format_local_status,
    format_status,
    local_status,
    operator_session,
    parse_time,
    pause_failover,
    resume_failover,
    schedule_switchover,
    switchover,
    who,
)
from hamta import eventlog

SYSTEM_CONFIG = Path("/etc/hamta/agent.toml")
LAB_DIR = Path("./var/lab")


def _load(path: Path) -> AgentConfig:
    try:
        return load_agent_config(path)
    except ConfigError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_agent(args: argparse.Namespace) -> int:
    """``hamta agent --config FILE``: run this node's agent."""
    # Here, not at the top: the agent's machinery (the executor, pyroute2: 200 more modules)
    # would slow every other command's start, DRBD's fence-peer handler's among them, which
    # runs inside a takeover's storage step (seconds of it on a slow guest, README "Failover").
    from cluster.agent import run_agent  # noqa: PLC0415

    return run_agent(_load(args.config))


def _lab_reexec(argv: list[str]) -> int | None:
    """Run this ``hamta cluster`` command inside the lab's client namespace, if a lab is up."""
    # Here, not at the top: the lab (pyroute2, its ZooKeeper helpers) only without a
    # configuration, never for DRBD's handlers or the agent (see cmd_agent).
    from cluster.lab.lab import Lab, LabError  # noqa: PLC0415

    try:
        lab = Lab.load(LAB_DIR)
    except LabError:
        return None
    config = lab.directory / "node1" / "agent.toml"
    command = ["ip", "netns", "exec", f"{lab.prefix}-client", sys.executable, "-m", "hamtactl"]
    os.execvp("ip", [*command, *argv, "--config", str(config.resolve())])
    return 0  # pragma: no cover - exec does not return


def _cluster_config(args: argparse.Namespace) -> AgentConfig:
    if args.config is not None:
        return _load(args.config)
    if SYSTEM_CONFIG.exists():
        return _load(SYSTEM_CONFIG)
    _lab_reexec(sys.argv[1:])
    print(
        f"hamta: no agent configuration: give --config, or create {SYSTEM_CONFIG}, "
        "or start a lab with 'hamta lab up'",
        file=sys.stderr,
    )
    raise SystemExit(2)


def cmd_cluster(args: argparse.Namespace) -> int:
    """``hamta cluster status|history|pause|resume|switchover``."""
    config = _cluster_config(args)
    # The command's own error line says why it failed; kazoo's retries would bury it.
    eventlog.quiet_library("kazoo")
    try:
        with operator_session(config) as session:
            coordinator = session.coordinator
            if args.action == "status":
                status = cluster_status(coordinator, config)
                print(json.dumps(status, indent=2) if args.json else format_status(status))
            elif args.action == "history":
                history = coordinator.history()[-args.last :] if args.last > 0 else []
                print(json.dumps(history, indent=2) if args.json else format_history(history))
            elif args.action == "pause":
                print(pause_failover(coordinator, who(), args.reason or ""))
            elif args.action == "resume":
                print(resume_failover(coordinator))
            elif args.action == "forget":
                if not args.node:
                    raise OperatorError("forget: name the node to forget with --node")
                coordinator.forget(args.node)
                print(f"{args.node} forgotten: it will no longer be fenced before a takeover")
            elif args.action == "switchover" and args.cancel:
                cancelled = cancel_switchover(coordinator)
                print("scheduled switchover cancelled" if cancelled else "no switchover scheduled")
            elif args.action == "switchover" and args.at:
                due = parse_time(args.at, time.time())
                scheduled = schedule_switchover(coordinator, args.to, due, who())
                if args.json:
                    print(json.dumps(scheduled))
                else:
                    print(
                        f"switchover from {scheduled['source']} to "
                        f"{scheduled['target'] or 'any peer'} scheduled in {scheduled['in_s']:.0f}s"
                    )
            elif args.action == "switchover":
                result = switchover(
                    session,
                    args.to,
                    config.agent.heartbeat,
                    args.timeout,
                    config.agent.switchover_timeout,
                )
                if args.json:
                    print(json.dumps(result))
                else:
                    print(
                        f"switched over from {result['from']} to {result['to']} "
                        f"(epoch {result['epoch']}) in {result['seconds']}s"
                    )
    except (CoordinationError, OperatorError) as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        # ZooKeeper down: what this node's agent says of itself (serving in failsafe?).
        local = local_status(config) if args.action == "status" else None
        if local is not None:
            print(
                json.dumps(local, indent=2)
                if args.json
                else format_local_status(local, time.time())
            )
        return 1
    return 0


def cmd_drbd(args: argparse.Namespace) -> int:
    """``hamta drbd fence-peer|unfence|split-brain|clear-split-brain``: DRBD's handlers."""
    config = _cluster_config(args)
    eventlog.quiet_library("kazoo")  # see cmd_cluster
    node = config.agent.node
    try:
        resource = drbd_handlers.resource_of(os.environ, args.resource)
    except ValueError as exc:
        if args.action != "clear-split-brain":
            print(f"hamta: {exc}", file=sys.stderr)
            return 2
        resource = ""
    try:
        with operator_session(config, timeout=args.timeout) as session:
            coordinator = session.coordinator
            if args.action == "fence-peer":
                peer = args.peer or os.environ.get("DRBD_PEER") or None
                verdict = drbd_handlers.fence_peer(coordinator, node, resource, peer)
            elif args.action == "unfence":
                verdict = drbd_handlers.unfence(coordinator, node, resource)
            elif args.action == "split-brain":
                verdict = drbd_handlers.report_split_brain(coordinator, node, resource)
            else:
                cleared = coordinator.clear_split_brain()
                text = "split brain cleared" if cleared else "no split brain was reported"
                verdict = drbd_handlers.Verdict(0, f"{text}: automatic failover is on")
    except CoordinationError as exc:
        # DRBD reads a failure as "could not fence": it keeps I/O frozen or refuses to promote.
        verdict = drbd_handlers.Verdict(drbd_handlers.EXIT_FAILED, f"ZooKeeper: {exc}")
    except Exception as exc:  # DRBD must get a failure it can act on, and the log why
        verdict = drbd_handlers.Verdict(
            drbd_handlers.EXIT_FAILED, f"failed: {type(exc).__name__}: {exc}"
        )
    message = f"hamta drbd {args.action}: {verdict.message} (exit {verdict.code})"
    if sys.stderr is not None:
        print(message, file=sys.stderr)
    # DRBD runs its handlers from the kernel, with no standard output or error: only the
    # system log (the journal) keeps what the handler decided and why.
    syslog.openlog("hamta-drbd", syslog.LOG_PID, syslog.LOG_DAEMON)
    syslog.syslog(syslog.LOG_ERR if verdict.code == 1 else syslog.LOG_NOTICE, message)
    return verdict.code


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``agent``, ``cluster`` and ``drbd`` on the ``hamta`` command's subparsers."""
    agent = sub.add_parser("agent", help="run this node's cluster agent")
    agent.add_argument("--config", type=Path, required=True, help="the agent's TOML file")
    agent.set_defaults(func=cmd_agent)

    cluster = sub.add_parser("cluster", help="look at and steer the cluster")
    actions = ["status", "history", "pause", "resume", "switchover", "forget"]
    cluster.add_argument("action", choices=actions)
    cluster.add_argument("--node", help="forget: a decommissioned node")
    cluster.add_argument("--config", type=Path, help=f"agent TOML (default: {SYSTEM_CONFIG})")
    cluster.add_argument("--json", action="store_true", help="print JSON")
    cluster.add_argument("--to", help="switchover: the node to hand over to")
    cluster.add_argument("--timeout", type=float, default=30.0, help="switchover: seconds")
    cluster.add_argument(
        "--at",
        metavar="TIME",
        help="switchover: schedule it for TIME (ISO 8601 with its zone, e.g. 2026-12-07T09:00Z)",
    )
    cluster.add_argument(
        "--cancel", action="store_true", help="switchover: cancel the scheduled switchover"
    )
    cluster.add_argument("--reason", help="pause: why, for the record")
    cluster.add_argument("--last", type=int, default=20, help="history: how many")
    cluster.set_defaults(func=cmd_cluster)

    drbd = sub.add_parser(
        "drbd", help="DRBD's handlers (fence-peer, after-resync-target, split-brain)"
    )
    drbd.add_argument(
        "action", choices=["fence-peer", "unfence", "split-brain", "clear-split-brain"]
    )
    drbd.add_argument("--config", type=Path, help=f"agent TOML (default: {SYSTEM_CONFIG})")
    drbd.add_argument("--resource", help="the DRBD resource (default: $DRBD_RESOURCE)")
    drbd.add_argument(
        "--peer",
        help="fence-peer: the peer's node name (default: $DRBD_PEER, "
        "else the only other node of the cluster)",
    )
    drbd.add_argument("--timeout", type=float, default=10.0, help="ZooKeeper connect, seconds")
    drbd.set_defaults(func=cmd_drbd)
