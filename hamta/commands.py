"""The relay's operator commands: drive a running relay, look at the queue and the spool, check
a configuration, plan capacity (``hamtactl`` dispatches).

``hamta serve``, the relay itself, is :mod:`hamta.serve`: these commands need the configuration
and the control socket, not the relay's runtime (aiohttp, aiosmtpd, DKIM), and start without it.
DKIM keys and the suppression list are :mod:`hamta.reputation_cli`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hamta import capacity, eventlog, spool_check
from hamta.config import Config, ConfigError, load_config
from hamta.control_client import ControlError, send_command
from hamta.queue import recipient_domain
from hamta.spool import LiveMessage, SpoolError, load_state
from hamta.workers import SHARD_PREFIX, stray_refusal, stray_shards


def load_or_exit(path: Path | None) -> Config:
    """The relay's configuration; its error on standard error and exit 2 if it is wrong."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# ------------------------------------------------------------------- relay


def cmd_relay(args: argparse.Namespace) -> int:
    """``hamta relay activate|deactivate|status``: drive a running relay over its socket."""
    socket_path = args.socket or load_or_exit(args.config).control.socket
    request: dict[str, Any] = {"command": args.action}
    if args.action == "activate" and args.spool:
        request["spool"] = str(args.spool.resolve())
    if args.action == "activate" and (args.epoch is not None or args.token is not None):
        if args.epoch is None or args.token is None:
            print("hamta: --epoch and --token go together", file=sys.stderr)
            return 2
        request.update(epoch=args.epoch, token=str(args.token.resolve()))
    if args.action == "deactivate" and args.timeout is not None:
        request["timeout"] = args.timeout
    try:
        reply = send_command(socket_path, request, timeout=args.wait)
    except ControlError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    reply.pop("ok", None)
    print(json.dumps(reply, indent=2))
    return 0


# ------------------------------------------------------------------- queue


def _queue_from_admin(listen: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://{listen}/api/queue", timeout=5) as response:
            data: dict[str, Any] = json.load(response)
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _queue_from_spool(path: Path) -> dict[str, Any]:

    domains: dict[str, dict[str, int]] = {}
    depth = 0
    shards = [path, *sorted(path.glob(f"{SHARD_PREFIX}*"))]
    messages: list[LiveMessage] = []
    for shard in shards:
        state = load_state(shard)
        depth += state.stats.messages
        messages += state.live.values()
    for message in messages:
        recipients = message.rec.recipients
        for index in message.pending:
            row = domains.setdefault(
                recipient_domain(recipients[index]),
                {"ready": 0, "deferred": 0, "in_flight": 0},  # no relay: none in flight
            )
            row["deferred" if message.retry and index in message.retry else "ready"] += 1
    return {"state": "offline", "spool": str(path), "depth": depth, "domains": domains}


def cmd_queue(args: argparse.Namespace) -> int:
    """``hamta queue``: queued recipients by domain, from the running relay or the spool."""
    config = load_or_exit(args.config)
    summary = _queue_from_admin(config.admin.listen) if config.admin.listen else None
    if summary is None or summary.get("state") == "standby":
        if not (config.spool.path / "journal").is_dir():
            print(
                f"hamta: no relay answers on {config.admin.listen} and no spool at "
                f"{config.spool.path}",
                file=sys.stderr,
            )
            return 1
        summary = _queue_from_spool(config.spool.path)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"state: {summary['state']}   messages queued: {summary['depth']}")
    domains: dict[str, dict[str, int]] = summary.get("domains", {})
    if domains:
        width = max(len("domain"), *(len(d) for d in domains))
        print(f"{'domain':<{width}}  {'ready':>8}  {'deferred':>8}  {'in_flight':>9}")
        for domain, row in sorted(domains.items(), key=lambda kv: -sum(kv[1].values())):
            print(
                f"{domain:<{width}}  {row['ready']:>8}  {row['deferred']:>8}  "
                f"{row.get('in_flight', 0):>9}"
            )
    return 0


def cmd_queue_destination(args: argparse.Namespace) -> int:
    """``hamta queue suspend|resume|retry DOMAIN``: act on one destination of a running relay."""
    socket_path = args.socket or load_or_exit(args.config).control.socket
    request = {"command": "destination", "action": args.queue_action, "destination": args.domain}
    try:
        reply = send_command(socket_path, request, timeout=args.wait)
    except ControlError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    workers = len(reply.get("workers", [])) or 1
    done = {"suspend": "suspended", "resume": "resumed", "retry": "retried"}[args.queue_action]
    extra = (
        f": {reply.get('moved', 0)} deferred jobs due now" if args.queue_action == "retry" else ""
    )
    print(f"{reply['destination']} {done} in {workers} worker(s){extra}")
    return 0


# ---------------------------------------------------------------- capacity


def _fetch_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
        return text


def _measure_relay(base: str, seconds: float) -> tuple[capacity.Measured, str]:
    """Scrape a relay's /metrics twice ``seconds`` apart; its figures and its state."""
    first = _fetch_text(f"{base}/metrics")
    started = time.monotonic()
    time.sleep(seconds)  # the window the received rate is measured over
    second = _fetch_text(f"{base}/metrics")
    elapsed = time.monotonic() - started
    state = str(json.loads(_fetch_text(f"{base}/api/queue")).get("state", "?"))
    return capacity.measure(first, second, elapsed, time.time()), state


def cmd_capacity(args: argparse.Namespace) -> int:
    """``hamta capacity``: the spool, logs and connections a mail volume needs."""
    measured = None
    per_day, latency = args.messages_per_day, args.latency
    size = args.avg_size * capacity.KIB if args.avg_size is not None else None
    if args.from_metrics:
        base = args.from_metrics.rstrip("/").removesuffix("/metrics")
        try:
            measured, state = _measure_relay(base, args.sample_seconds)
        except capacity.CapacityError as exc:
            print(f"hamta: {base}: {exc}", file=sys.stderr)
            return 1
        except (urllib.error.URLError, OSError, ValueError) as exc:
            print(f"hamta: cannot read {base}: {exc}", file=sys.stderr)
            return 1
        if per_day is None and measured.received_total > 0:
            per_day = measured.messages_per_day
        size = measured.avg_size_bytes if size is None else size
        latency = measured.latency_seconds if latency is None else latency
    if per_day is None or size is None:
        print(
            "hamta: give --messages-per-day and --avg-size, or --from-metrics a relay that has "
            "received mail",
            file=sys.stderr,
        )
        return 2
    config = load_or_exit(args.config)
    try:
        workload = capacity.Workload(
            per_day,
            size,
            args.retention,
            args.outage_hours,
            args.peak_factor,
            latency or capacity.DEFAULT_LATENCY_SECONDS,
        )
    except capacity.CapacityError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 2
    result = capacity.plan(workload, capacity.Limits.of(config.delivery, config.spool))
    if args.json:
        print(json.dumps(capacity.to_dict(result, measured), indent=2))
        return 0
    if measured is not None:
        print(
            capacity.format_measured(
                measured, f"{args.from_metrics} ({state})", args.sample_seconds
            )
        )
    print(capacity.format_plan(result))
    return 0


# ------------------------------------------------------------------ config


def cmd_spool_check(args: argparse.Namespace) -> int:
    """``hamta spool check [--repair]``: damage in a spool no relay holds; rebuild it."""

    path: Path = args.spool or load_or_exit(args.config).spool.path
    if not (path / "journal").is_dir():
        print(f"hamta: no spool at {path}", file=sys.stderr)
        return 1
    reports = []
    for shard in [path, *sorted(path.glob(f"{SHARD_PREFIX}*"))]:
        try:
            reports.append(spool_check.repair(shard) if args.repair else spool_check.check(shard))
        except SpoolError as exc:
            print(f"hamta: {exc}", file=sys.stderr)
            return 1
    print(
        json.dumps(reports, indent=2) if args.json else "\n".join(map(spool_check.render, reports))
    )
    if args.repair:
        return 0 if all(r["clean_after_repair"] for r in reports) else 1
    return 1 if any(r["damaged"] for r in reports) else 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """``hamta config check FILE``: validate a configuration file."""
    config = load_or_exit(args.file)
    if config.log.file is not None and (problem := eventlog.log_file_problem(config.log.file)):
        print(f"hamta: {args.file}: log.file: {problem}", file=sys.stderr)
        return 2
    # A count set on purpose below the shards holding mail: the relay would refuse to activate
    # on this spool (hamta.workers). Said now, not by a failed start or takeover; a spool on
    # shared storage is seen where it is mounted (the active node). The default adopts them.
    if "workers" in config.node.model_fields_set:
        try:
            stray = stray_shards(config.spool.path, config.node.workers)
        except (SpoolError, OSError) as exc:
            print(
                f"hamta: {args.file}: spool.path: cannot read {config.spool.path}: {exc}",
                file=sys.stderr,
            )
            return 2
        if stray:
            refusal = stray_refusal(config.spool.path, config.node.workers, stray, default=False)
            print(f"hamta: {args.file}: node.workers: {refusal}", file=sys.stderr)
            return 2
    # Each address with its role when it is not plain smtp (submission, submissions + backend).
    listening = ", ".join(
        item.listen
        if item.role == "smtp" and item.auth is None
        else f"{item.listen} ({item.role}, auth {item.auth})"
        for item in config.smtp.listeners
    )
    # Warnings, not failures: DNS may be fixed after the file (hamta.egress_ptr).
    if config.delivery.egress.sources:
        from hamta.egress_ptr import ptr_warnings  # noqa: PLC0415 - dnspython only when needed

        for warning in asyncio.run(ptr_warnings(config.delivery.egress, config.dns)):
            print(f"hamta: {args.file}: warning: {warning}", file=sys.stderr)
    print(f"{args.file}: ok (SMTP on {listening}, spool {config.spool.path})")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the relay's operator commands on the ``hamta`` command's subparsers."""
    relay = sub.add_parser("relay", help="drive a running relay over its control socket")
    relay.add_argument("action", choices=["activate", "deactivate", "status", "stop"])
    relay.add_argument("--spool", type=Path, help="spool directory to activate on")
    relay.add_argument("--epoch", type=int, help="the term to activate for (with --token)")
    relay.add_argument("--token", type=Path, help="the fencing token file that carries the term")
    relay.add_argument("--socket", type=Path, help="control socket (default: from config)")
    relay.add_argument("--config", type=Path, help="TOML file naming the control socket")
    relay.add_argument("--timeout", type=float, help="graceful stop budget for deactivate")
    relay.add_argument("--wait", type=float, default=120.0, help="seconds to wait for a reply")
    relay.set_defaults(func=cmd_relay)

    queue = sub.add_parser("queue", help="queued mail by domain")
    queue.add_argument("--config", type=Path, help="TOML file (default: built-in)")
    queue.add_argument("--json", action="store_true", help="print JSON")
    queue.set_defaults(func=cmd_queue)
    queue_sub = queue.add_subparsers(dest="queue_action", metavar="{suspend,resume,retry}")
    for action, text in (
        ("suspend", "hold a destination's mail in the queue (kept across restarts and failover)"),
        ("resume", "deliver a suspended destination's mail again"),
        ("retry", "make every deferred message of a destination due now"),
    ):
        act = queue_sub.add_parser(action, help=text, description=text)
        act.add_argument("domain", help="recipient domain, or a static route's [host]:port")
        # SUPPRESS: not given here, the value given before the subcommand stands.
        act.add_argument(
            "--config",
            type=Path,
            default=argparse.SUPPRESS,
            help="TOML file naming the control socket",
        )
        act.add_argument("--socket", type=Path, help="control socket (default: from config)")
        act.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
        )
        act.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a reply")
        act.set_defaults(func=cmd_queue_destination)

    cap = sub.add_parser("capacity", help="spool, logs and connections a mail volume needs")
    cap.add_argument("--messages-per-day", type=float, help="mail received a day")
    cap.add_argument("--avg-size", type=float, help="average message size in KiB")
    cap.add_argument(
        "--retention",
        type=float,
        default=capacity.DEFAULT_RETENTION_DAYS,
        help="days the event log is kept (default: %(default)g)",
    )
    cap.add_argument(
        "--outage-hours",
        type=float,
        default=capacity.DEFAULT_OUTAGE_HOURS,
        help="delivery outage the spool must absorb (default: %(default)g)",
    )
    cap.add_argument(
        "--peak-factor",
        type=float,
        default=capacity.DEFAULT_PEAK_FACTOR,
        help="peak rate over the daily average (default: %(default)g)",
    )
    cap.add_argument(
        "--latency",
        type=float,
        help=f"seconds per delivery (default: measured, else {capacity.DEFAULT_LATENCY_SECONDS:g})",
    )
    cap.add_argument(
        "--from-metrics",
        metavar="URL",
        help="a running relay's admin endpoint, e.g. http://127.0.0.1:8025",
    )
    cap.add_argument(
        "--sample-seconds",
        type=float,
        default=5.0,
        help="time between the two scrapes of --from-metrics (default: %(default)g)",
    )
    cap.add_argument("--config", type=Path, help="relay TOML for its limits (default: built-in)")
    cap.add_argument("--json", action="store_true", help="print one JSON object")
    cap.set_defaults(func=cmd_capacity)

    spool = sub.add_parser("spool", help="spool tools")
    spool_sub = spool.add_subparsers(dest="spool_command", required=True)
    checker = spool_sub.add_parser(
        "check", help="report damaged spool files and what they cost (exit 1 if any)"
    )
    checker.add_argument("--config", type=Path, help="TOML file naming the spool")
    checker.add_argument("--spool", type=Path, help="spool directory (default: from config)")
    checker.add_argument(
        "--repair",
        action="store_true",
        help="rebuild as a relay's recovery would: damaged files to damaged/, a fresh checkpoint",
    )
    checker.add_argument("--json", action="store_true", help="print JSON")
    checker.set_defaults(func=cmd_spool_check)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_config_check)
