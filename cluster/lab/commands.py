"""``hamta lab ...``: build, look at, hurt and take down the namespace lab (``hamtactl``)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from cluster.lab import netns, partitions
from cluster.lab.haproxy import HAPROXY_PORT
from cluster.lab.lab import Lab, LabError
from cluster.lab.monitors import format_verdicts
from cluster.lab.topology import (
    API_PORT,
    CLIENT,
    DEFAULT_DIRECTORY,
    MAX_PAIRS,
    NODES,
    PAIR_CLUSTER,
    PEER_PORT,
    ZOOKEEPER_HOSTS,
    Topology,
)

# Every node a lab of up to MAX_PAIRS pairs may have (the lab says which of them it has).
_ALL_NODES = Topology.build("hamta", "198.18.0.0/24", MAX_PAIRS).nodes


def _load(args: argparse.Namespace) -> Lab:

    try:
        return Lab.load(args.dir)
    except LabError as exc:
        print(f"hamta: {exc}; start one with 'hamta lab up'", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_up(args: argparse.Namespace) -> int:
    """``hamta lab up``: build the lab and start everything."""

    try:
        lab = Lab(args.dir, prefix=args.prefix, subnet=args.subnet, pairs=args.pairs)
        print(f"building the lab in {lab.directory} (prefix {lab.prefix}) ...", flush=True)
        lab.up(wait=args.wait, agents=not args.no_agents, haproxy=args.haproxy)
    except LabError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    print(format_built(lab, agents=not args.no_agents, haproxy=args.haproxy))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """``hamta lab down``: end every process of the lab and remove what it built."""

    try:
        lab = Lab.load(args.dir)
    except LabError:
        # No record: still remove whatever a crashed lab of this prefix left behind.
        try:
            # As many pairs as a lab may have: the namespaces of every pair it may have built
            # (those that do not exist are skipped).
            lab = Lab(args.dir, prefix=args.prefix, subnet=args.subnet, pairs=MAX_PAIRS)
        except LabError as exc:
            print(f"hamta: {exc}", file=sys.stderr)
            return 1
    was_up = lab.record_file.exists() or any(netns.exists(n) for n in lab.topology.namespaces)
    try:
        lab.down()
    except LabError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    if was_up:
        print(f"lab {lab.prefix} is down (logs kept in {lab.directory})")
    else:
        print(f"no lab {lab.prefix} was up in {lab.directory}: nothing to do")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """``hamta lab status``: hosts, processes, ZooKeeper, VIP, spool and roles."""
    lab = _load(args)
    status = lab.status()
    # The check locations' verdicts (cluster.lab.monitors): per location, per check.
    status["monitors"] = lab.monitor_verdicts()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    """``hamta lab send``: mail from the client to the VIP; exit 1 unless all got 250."""

    lab = _load(args)
    try:
        result = lab.send(
            args.count,
            size=args.size,
            domain=args.domain,
            timeout=args.timeout,
            connections=args.connections,
            submission=args.submission,
            password=args.password,
            sender=args.sender,
            pair=args.pair,
        )
    except LabError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    how = "submission with the probe account" if args.submission else "relay"
    port = args.submission or 25
    to = lab.pair_vip(args.pair)
    print(f"{result.summary()} (to {to}:{port}, {how}, domain {args.domain})")
    for sample in result.error_samples:
        print(f"  error: {sample}")
    return 0 if result.all_acked and result.sent == args.count else 1


def cmd_hostile(args: argparse.Namespace) -> int:
    """``hamta lab hostile``: the chaos suite's hostile sessions from the client to the VIP."""
    lab = _load(args)
    argv = ["--to", f"{lab.vip}:25", "--domain", args.domain, "--idle", str(args.idle)]
    done = lab.run_module(CLIENT, "chaos.hostile", argv, timeout=300.0)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for record in records:
        if "session" not in record:
            continue
        replies = record["replies"]
        last = replies[-1].split(" ", 1)[-1].splitlines()[0] if replies else "no reply"
        verdict = "; ".join(record["problems"]) or f"as it must be (last reply: {last})"
        print(f"{record['session']:<26} {verdict}")
    if done.returncode not in (0, 1):
        print(f"hamta: the hostile client failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return 1
    return done.returncode


def cmd_fence(args: argparse.Namespace) -> int:
    """``hamta lab fence NODE``: kill the node's relay and take the VIP off it."""

    lab = _load(args)
    try:
        lab.fence(args.node)
    except LabError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    print(f"fenced {args.node}: relay killed, VIP removed")
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    """``hamta lab kill NODE``: kill -9 every process of the node (agent and relay)."""

    lab = _load(args)
    try:
        lab.kill_node(args.node, signal.SIGKILL)
    except LabError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    print(f"killed {args.node} (agent and relay); restart it with: hamta lab start {args.node}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    """``hamta lab start NODE``: start a node's agent again after a kill."""

    lab = _load(args)
    try:
        lab.start_agent(args.node)
    except LabError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    print(f"started the agent of {args.node}")
    return 0


def cmd_cut(args: argparse.Namespace) -> int:
    """``hamta lab cut NODE --from zookeeper|peer``: a partition of one node (nftables)."""
    lab = _load(args)
    cut = partitions.cut_from_zookeeper if args.side == "zookeeper" else partitions.cut_peer_channel
    try:
        partitions.lift(lab, args.node)  # one cut at a time: the new one replaces the old
        cut(lab, args.node)
    except LabError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    print(
        f"{args.node} cut off from its {CUTS[args.side]}; undo it with: hamta lab heal {args.node}"
    )
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    """``hamta lab heal NODE``: lift the node's cut."""
    lab = _load(args)
    partitions.lift(lab, args.node)
    print(f"{args.node}: cut lifted")
    return 0


CUTS = {"zookeeper": "ZooKeeper servers", "peer": "peer agent (the peer channel)"}


# ------------------------------------------------------------------ output


def format_built(lab: Lab, *, agents: bool, haproxy: bool = False) -> str:
    """What ``lab up`` built, and how to try it."""
    dir_option = "" if lab.directory == DEFAULT_DIRECTORY.absolute() else f" --dir {lab.directory}"
    lines = [f"lab {lab.prefix} is up in {lab.directory}", ""]
    for host in lab.topology.hosts:
        lines.append(f"  {host:<7} {lab.namespace(host):<16} {lab.address(host)}")
    lines += [
        "",
        f"  ZooKeeper        {lab.zookeeper_hosts} (credentials {lab.credentials_path})",
        f"  peer channel     UDP {PEER_PORT} between the nodes (secret {lab.peer_secret_path};"
        " failsafe on: stop every ZooKeeper server and the active node serves on)",
        f"  virtual IP       {lab.vip}:25",
        f"  shared disk      {lab.loop_device} (ext4, mounted only on the active node)",
        f"  mail sink        {lab.address('inet')}:25, recording to {lab.sink_record}",
        f"  agents' API      http://{lab.address('node1')}:{API_PORT}/active (and node2's): "
        "200 on the active node only",
    ]
    if lab.topology.pairs > 1:
        lines += format_pairs(lab)
    if haproxy:
        lines.append(
            f"  HAProxy          {lab.address('client')}:{HAPROXY_PORT} -> the node whose "
            f"/active says 200 (log {lab.directory / 'client' / 'haproxy.log'})"
        )
    lines.append("")
    if agents:
        found = lab.active_node()
        active = found or "node1"
        passive = next(node for node in NODES if node != active)
        steps = [
            (f"hamta lab send --count 10{dir_option}", "mail from the client to the VIP"),
            (
                f"ip netns exec {lab.namespace(CLIENT)} curl -s "
                f"http://{lab.address(active)}:{API_PORT}/active",
                "the agent's API: 200 on the active node, 503 on the other",
            ),
            (f"hamta lab status{dir_option}", "who is active, holds the VIP, mounts the spool"),
            (f"hamta lab kill {active}{dir_option}", "kill -9 the active node"),
            (f"hamta lab status{dir_option}", "the other node took over"),
            (f"hamta lab send --count 10{dir_option}", "mail still flows"),
            (f"hamta lab start {active}{dir_option}", "bring it back, as the passive node"),
            (f"hamta lab cut {passive} --from zookeeper{dir_option}", "ZooKeeper gone: passive"),
            (f"hamta lab cut {active} --from zookeeper{dir_option}", "... and active: serves on"),
            (f"hamta lab send --count 10{dir_option}", "in failsafe: still 250"),
            (
                f"hamta cluster status --config {lab.directory}/{active}/agent.toml",
                "'serving in failsafe since ...'",
            ),
            (f"hamta lab heal {passive}{dir_option}", "ZooKeeper back for the passive: it refuses"),
            (f"hamta lab status{dir_option}", f"{passive} took over once {active} stopped"),
            (f"hamta lab heal {active}{dir_option}", "all back"),
            (
                f"hamta lab cut {passive} --from peer{dir_option}",
                "the peer channel alone: nobody fenced",
            ),
            (f"hamta lab send --count 10{dir_option}", f"{passive} still serves"),
            (
                f"grep peer_channel_silent {lab.directory}/{active}/agent.log",
                "why: its pulse in ZooKeeper advances",
            ),
            (f"hamta lab heal {passive}{dir_option}", "channel back"),
            (f"hamta lab down{dir_option}", "take it all away"),
        ]
        width = max(len(command) for command, _ in steps)
        lines += [f"active node: {found or '(none yet)'}", "", "try it:"]
        lines += [f"  {command:<{width}}  # {why}" for command, why in steps]
    else:
        lines.append(f"no agents started; take it away with: hamta lab down{dir_option}")
    lines += [
        "",
        f"a shell on a host: ip netns exec {lab.namespace('client')} bash",
    ]
    return "\n".join(lines)


def format_pairs(lab: Lab) -> list[str]:
    """The pairs of a lab of several (``--pairs N``) and how to see the fleet."""
    lines = ["", f"  {len(lab.pair_names)} pairs on the one ensemble (cluster, nodes, VIP):"]
    for pair in lab.pair_names:
        nodes = ", ".join(lab.pair_nodes(pair))
        lines.append(f"    {pair:<6} {nodes:<20} {lab.pair_vip(pair)}:25")
    lines += [
        "  fleet status     ip netns exec "
        f"{lab.namespace(CLIENT)} hamta fleet status --zookeeper {lab.zookeeper_hosts} "
        f"--credentials {lab.reader_credentials_path}",
    ]
    return lines


def format_status(status: dict[str, Any]) -> str:
    """``lab status`` for people."""
    state = "up" if status["up"] else "not up (no lab.json)"
    lines = [
        f"lab {status['prefix']} in {status['directory']}: {state}",
        f"subnet {status['subnet']}, VIP {status['vip']}, ZooKeeper {status['zookeeper_hosts']}",
        "",
        f"  {'host':<7} {'namespace':<16} {'address':<15} processes",
    ]
    relays: dict[str, str | None] = status.get("relays", {})
    pairs: dict[str, Any] = status.get("pairs", {})
    # Each pair's VIP holders and spool mounts (pair 1's alone in a one-pair lab's record).
    vip_holders = {n for info in pairs.values() for n in info["vip_holders"]}
    mounts = {n for info in pairs.values() for n in info["spool_mounted_on"]}
    vip_holders |= set(status["vip_holders"])
    mounts |= set(status["spool_mounted_on"])
    for host, info in status["hosts"].items():
        whats = [f"{p['what']}({p['pid']})" for p in info["processes"]]
        if host in ZOOKEEPER_HOSTS and status["zookeeper"].get(host):
            whats.append(f"[{status['zookeeper'][host]}]")
        if host in relays:
            if relays.get(host):
                whats.append(f"[relay {relays[host]}]")
            if host in vip_holders:
                whats.append("[VIP]")
            if host in mounts:
                whats.append("[spool mounted]")
        namespace = info["namespace"] if info["exists"] else "(missing)"
        lines.append(f"  {host:<7} {namespace:<16} {info['address']:<15} {' '.join(whats) or '-'}")
    lines.append("")
    if len(pairs) > 1:
        for pair, info in pairs.items():
            holders = info["vip_holders"]
            lines.append(
                f"pair {pair}: {', '.join(info['nodes'])}; VIP {info['vip']} on "
                + (", ".join(holders) if holders else "nobody")
                + (" (SPLIT BRAIN)" if len(holders) > 1 else "")
            )
        lines.append("")
    holders = status["vip_holders"]
    lines.append(
        "VIP: "
        + (", ".join(holders) if holders else "nobody")
        + (" (SPLIT BRAIN)" if len(holders) > 1 else "")
    )
    for address, nodes in status.get("egress_holders", {}).items():
        lines.append(
            f"egress {address}: "
            + (", ".join(nodes) if nodes else "nobody")
            + (" (SPLIT BRAIN)" if len(nodes) > 1 else "")
        )
    mounted = status["spool_mounted_on"]
    lines.append(
        f"shared disk {status['loop_device'] or '-'}: mounted on "
        f"{', '.join(mounted) if mounted else 'no node'}"
    )
    cluster = status.get("cluster")
    if cluster:
        nodes = ", ".join(
            f"{n['node']} {n['role']}" + (f" (epoch {n['epoch']})" if n["role"] == "active" else "")
            for n in cluster.get("nodes", [])
        )
        lines.append(f"cluster: {nodes or 'no agent has joined'}; leader {cluster.get('leader')}")
    elif status["up"]:
        lines.append("cluster: (no answer from ZooKeeper through 'hamta cluster status')")
    if status.get("monitors"):
        lines += format_verdicts(status["monitors"])
    return "\n".join(lines)


# ------------------------------------------------------------------ parser


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``lab`` and its subcommands on the ``hamta`` command's subparsers."""
    lab = sub.add_parser("lab", help="a test cluster on this host, in network namespaces")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = lab_sub.add_parser(name, help=help_text)
        parser.add_argument(
            "--dir",
            type=Path,
            default=DEFAULT_DIRECTORY,
            help=f"the lab's directory (default: {DEFAULT_DIRECTORY})",
        )
        return parser

    up = command("up", "build the lab and start ZooKeeper, DNS, the sink and both agents")
    up.add_argument("--prefix", default="hamta", help="namespace name prefix (default: hamta)")
    up.add_argument("--subnet", default="198.18.0.0/24", help="inside 198.18.0.0/15")
    up.add_argument("--wait", type=float, default=90.0, help="seconds to wait for everything")
    up.add_argument("--no-agents", action="store_true", help="build the lab without agents")
    up.add_argument(
        "--pairs",
        type=int,
        default=1,
        help=f"pairs on the lab's one ensemble, 1 to {MAX_PAIRS} (default 1; docs/fleet.md)",
    )
    up.add_argument(
        "--haproxy",
        action="store_true",
        help="HAProxy on the client host in front of both nodes, checking each agent's /active",
    )
    up.set_defaults(func=cmd_up)

    down = command("down", "end every process of the lab and remove what it built")
    down.add_argument("--prefix", default="hamta", help="without lab.json: the lab's prefix")
    down.add_argument("--subnet", default="198.18.0.0/24", help=argparse.SUPPRESS)
    down.set_defaults(func=cmd_down)

    status = command("status", "hosts, processes, ZooKeeper, VIP, spool and roles")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    send = command("send", "send mail from the client to the VIP (exit 1 unless all got 250)")
    send.add_argument("--count", type=int, default=10)
    send.add_argument("--size", type=int, default=1024, help="bytes per message")
    send.add_argument(
        "--domain",
        default="a.lab.test",
        help="a.lab.test, b.lab.test, c.lab.test; dane.lab.test (DANE, TLSA matches), "
        "badtlsa.lab.test (TLSA wrong: deferred), sts.lab.test (MTA-STS enforce)",
    )
    send.add_argument("--connections", type=int, default=1, help="SMTP sessions in parallel")
    send.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole run")
    send.add_argument(
        "--submission",
        type=int,
        choices=[587, 465],
        help="submit on 587 (STARTTLS) or 465 (TLS) with <lab dir>/submission-account.json",
    )
    send.add_argument("--password", help="a wrong password instead of the account's (535)")
    send.add_argument("--sender", help="another envelope sender (553 5.7.1 with --submission)")
    send.add_argument(
        "--pair", default=PAIR_CLUSTER, help="to this pair's VIP (lab up --pairs N): lab, lab2, ..."
    )
    send.set_defaults(func=cmd_send)

    hostile = command("hostile", "hostile SMTP sessions from the client to the VIP (refused?)")
    hostile.add_argument("--domain", default="a.lab.test", help="a mail domain of the lab")
    hostile.add_argument("--idle", type=int, default=200, help="idle connections to hold")
    hostile.set_defaults(func=cmd_hostile)

    fence = command("fence", "the lab's STONITH: kill a node's relay, take the VIP off it")
    fence.add_argument("node", choices=_ALL_NODES)
    fence.set_defaults(func=cmd_fence)

    kill = command("kill", "kill -9 a node (its agent and relay)")
    kill.add_argument("node", choices=_ALL_NODES)
    kill.set_defaults(func=cmd_kill)

    start = command("start", "start a node's agent again after a kill")
    start.add_argument("node", choices=_ALL_NODES)
    start.set_defaults(func=cmd_start)

    cut = command("cut", "cut a node off from ZooKeeper or from its peer agent (nftables)")
    cut.add_argument("node", choices=_ALL_NODES)
    cut.add_argument("--from", dest="side", choices=sorted(CUTS), required=True)
    cut.set_defaults(func=cmd_cut)

    heal = command("heal", "lift a node's cut")
    heal.add_argument("node", choices=_ALL_NODES)
    heal.set_defaults(func=cmd_heal)
