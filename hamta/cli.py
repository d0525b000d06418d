"""The ``hamta`` command: serve the relay, drive a warm standby, look at the queue, check config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chaos.cli import add_chaos_commands
from cluster.cli import add_cluster_commands
from cluster.lab.cli import add_lab_commands
from hamta import capacity, eventlog
from hamta.config import Config, ConfigError, load_config
from hamta.control_client import ControlError, send_command
from hamta.reputation_cli import add_reputation_commands

if TYPE_CHECKING:
    from hamta.relay import Relay
    from hamta.supervision import StopDeadline

# The relay itself (hamta.relay, the admin server with aiohttp, the spool, the workers) is
# imported by the commands that run or read it, not here: every other command, DRBD's
# fence-peer handler among them, starts in a fraction of the time, which on a slow machine
# (20 s instead of 8 s under TCG) decides whether a takeover fits its step's time limit.

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is optional outside Linux
    uvloop = None  # type: ignore[assignment]


def _load(path: Path | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# ------------------------------------------------------------------- serve


class Shutdown:
    """The stop of ``hamta serve``: asked by a signal, the control socket or a fatal failure.

    Built before the event loop (the relay is, to load root-only keys before root goes), used
    inside it; its deadline ends the process at ``node.stop_timeout`` from the request on.
    """

    def __init__(self, deadline: StopDeadline) -> None:
        self.deadline = deadline
        self.stop = asyncio.Event()
        self.fatal: list[str] = []

    def request(self) -> None:
        self.deadline.arm()
        self.stop.set()

    def fail(self, reason: str) -> None:
        self.fatal.append(reason)
        self.request()


def _check_descriptors(config: Config, log: Any) -> None:
    """Raise the open-files limit to what the configuration needs, or warn that it is short.

    Every session and connection is a file descriptor: run short of them and clients get broken
    pipes while the health endpoint is reset.
    """
    from hamta.admission import raise_descriptor_limit  # noqa: PLC0415

    needed = capacity.descriptors_needed(
        config.smtp.max_connections, config.delivery.max_connections_per_destination
    )
    before, limit = raise_descriptor_limit(needed)
    if limit < needed:
        log.warning("DescriptorLimitLow", limit=limit, needed=needed,
                    action="raise LimitNOFILE (systemd) or ulimit -n, or lower "
                           "smtp.max_connections")  # fmt: skip
    elif limit > before:
        log.info("DescriptorLimitRaised", before=before, limit=limit, needed=needed)


async def _serve(
    config: Config,
    relay: Relay,
    standby: bool,
    control_socket: socket.socket,
    dropped: dict[str, object],
    shutdown: Shutdown,
) -> int:
    from hamta.admin import start_admin  # noqa: PLC0415 - see the imports at the top
    from hamta.control import start_control  # noqa: PLC0415
    from hamta.relay import RelayError, RelayState  # noqa: PLC0415
    from hamta.workers import control_path  # noqa: PLC0415

    pool, worker = relay.pool, relay.worker
    log = relay.log
    log.info("PrivilegesDropped", **dropped)
    loop = asyncio.get_running_loop()
    stop, deadline, fatal = shutdown.stop, shutdown.deadline, shutdown.fatal
    tasks: set[asyncio.Task[Any]] = set()

    def activate_from_signal() -> None:
        if relay.state is RelayState.STANDBY:
            task = loop.create_task(relay.activate())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGTERM, shutdown.request)
    loop.add_signal_handler(signal.SIGINT, shutdown.request)
    if pool is not None:
        # Before the control socket, the admin endpoint and SIGUSR1: once the node answers, all
        # of it is warm, and whoever drives it may activate it at once.
        try:
            await pool.start()
        except ControlError as exc:
            log.error("WorkersFailed", error=str(exc))
            print(f"hamta: {exc}", file=sys.stderr)
            await pool.stop(0)
            return 1
    if worker == 0:
        loop.add_signal_handler(signal.SIGUSR1, activate_from_signal)
    admin_listen = config.admin.listen if worker == 0 else ""
    try:
        admin = await start_admin(relay, admin_listen) if admin_listen else None
    except OSError as exc:
        print(f"hamta: cannot serve admin on {admin_listen}: {exc.strerror}", file=sys.stderr)
        if pool is not None:
            await pool.stop(0)
        return 1
    socket_path = control_path(config.control.socket, worker)
    control = await start_control(relay, control_socket, stop)
    socket_inode = socket_path.stat().st_ino
    log.info("RelayStarted", standby=standby, admin=admin_listen, control=str(socket_path),
             workers=config.node.workers)  # fmt: skip
    code = 0
    try:
        if not standby:
            try:
                await relay.activate()
            except RelayError as exc:
                log.error("ActivationFailed", error=str(exc))
                print(f"hamta: {exc}", file=sys.stderr)
                code = 1
                return code
        await stop.wait()
        deadline.arm()  # also when the control socket's stop command set the event
        log.info("RelayStopping", state=relay.state.value, failure=fatal[0] if fatal else None)
        if fatal:
            code = 1
        for task in list(tasks):
            await asyncio.gather(task, return_exceptions=True)
        if relay.state is RelayState.ACTIVE:
            await relay.deactivate(deadline.graceful())
    finally:
        control.close()
        # A relay started since this one was given up for dead (a worker still stopping when
        # its node was restarted) has taken the path: its socket is not ours to remove.
        # PermissionError: bound while root in a directory the relay's user may not write; the
        # next start removes it.
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if socket_path.stat().st_ino == socket_inode:
                socket_path.unlink()
        if pool is not None:
            await pool.stop(deadline.graceful())
        if admin is not None:
            await admin.cleanup()
        deadline.cancel()
        log.info("RelayExited", code=code)
    return code


def _fds(text: str) -> list[int]:
    return [int(fd) for fd in text.split(",") if fd]


def _run(coro: Any) -> int:
    if uvloop is None:
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def cmd_serve(args: argparse.Namespace) -> int:
    """``hamta serve``: run the relay (or a warm standby) until SIGTERM."""
    config = _load(args.config)
    if args.worker:
        from hamta.workers import die_with_parent  # noqa: PLC0415 - see the imports at the top

        # A worker of a multi-process relay: it goes when the relay that started it goes.
        die_with_parent()
    from hamta import listeners as smtp_sockets  # noqa: PLC0415
    from hamta import privileges  # noqa: PLC0415
    from hamta.bounce_classes import BounceRulesError, build_classifier  # noqa: PLC0415
    from hamta.control import bind_control  # noqa: PLC0415
    from hamta.relay import Relay  # noqa: PLC0415
    from hamta.smtp import tls_context  # noqa: PLC0415
    from hamta.supervision import StopDeadline, Supervisor  # noqa: PLC0415
    from hamta.workers import WorkerPool, control_path  # noqa: PLC0415

    standby = args.standby or bool(args.worker)
    try:
        eventlog.configure(config.log.level, config.log.file)
    except eventlog.LogFileError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1
    node_log = (
        eventlog.get_logger(node=config.node.hostname, worker=args.worker)
        if config.node.workers > 1
        else eventlog.get_logger(node=config.node.hostname)
    )
    # From the stop's request on, the process is gone within node.stop_timeout, come what may.
    shutdown = Shutdown(StopDeadline(config.node.stop_timeout, node_log))
    # While root: the hard limit may be raised only so.
    _check_descriptors(config, node_log)
    # Everything that needs root happens here, before the event loop and its threads exist:
    # the SMTP sockets are bound, the log and a standalone spool handed over, then root goes.
    # A port taken is thus found at start, by a standby too, not at its first activation.
    control: socket.socket | None = None
    try:
        if args.listen_fds is not None:  # a worker: worker 0 bound them
            own, others = smtp_sockets.adopt(args.listen_fds), []
        else:
            workers = config.node.workers
            # Workers share the port; a lone relay must not, or a second one started by
            # mistake would silently take half the connections.
            own = smtp_sockets.bind(config.smtp.listen, reuse_port=workers > 1)
            others = [
                smtp_sockets.bind(config.smtp.listen, reuse_port=True) for _ in range(1, workers)
            ]
        user = config.node.user
        if args.config is None and user is None and os.geteuid() == 0:
            # The built-in configuration is for trying hamta on this machine: loopback only,
            # where no outside client reaches the parser. A configuration file is what serves
            # the world, and there root is given up unless the file keeps it on purpose.
            user = "root"
            node_log.warning("RunningAsRoot", reason="the built-in configuration (loopback "
                             "only); a configuration file sets [node] user")  # fmt: skip
        identity = privileges.resolve(user, config.node.group)
        # Bound while root, so that it is root's (hamta.control.bind_control).
        control = bind_control(control_path(config.control.socket, args.worker))
        if os.geteuid() != identity.uid:
            if config.log.file is not None:
                privileges.give_file(config.log.file, identity)
            if not standby:  # a standby is activated on a spool the cluster agent hands over
                privileges.give_tree(config.spool.path, identity)

        def task_failed(name: str, exc: BaseException) -> None:
            relay.task_failed(name, exc)  # the relay is built before any task starts

        # One supervisor for every long-lived task of the process: the relay's and the pool's.
        supervisor = Supervisor(node_log, task_failed)
        pool = None
        if args.worker == 0 and config.node.workers > 1:
            pool = WorkerPool(args.config, config.control.socket, node_log, others,
                              spawn=supervisor.spawn)  # fmt: skip
        # Built while root: the DKIM keys it loads may stay readable by root alone.
        relay = Relay(config, listeners=own, worker=args.worker, pool=pool,
                      on_fatal=shutdown.fail, supervisor=supervisor)  # fmt: skip
        dropped = privileges.drop_privileges(identity)
        # What each activation reads again, read once now as the relay's user: a file it may
        # not read stops the start (of a standby too), not a takeover.
        try:
            tls_context(config.smtp)
        except (OSError, ssl.SSLError) as exc:
            raise privileges.PrivilegeError(
                f"as user {identity.user}: cannot load smtp.tls_cert {config.smtp.tls_cert} "
                f"with smtp.tls_key {config.smtp.tls_key}: {exc}"
            ) from None
        try:
            build_classifier(config.delivery.bounce_rules)
        except BounceRulesError as exc:
            raise privileges.PrivilegeError(f"as user {identity.user}: {exc}") from None
    except (smtp_sockets.ListenerError, privileges.PrivilegeError, OSError) as exc:
        log = eventlog.get_logger(node=config.node.hostname)
        log.error("StartFailed", error=str(exc))
        log.info("RelayExited", code=1)
        print(f"hamta: {exc}", file=sys.stderr)
        if control is not None:
            with contextlib.suppress(OSError):
                control_path(config.control.socket, args.worker).unlink()
        return 1
    try:
        return _run(_serve(config, relay, standby, control, dropped, shutdown))
    finally:
        smtp_sockets.close_all([own_socket for group in [own, *others] for own_socket in group])


# ------------------------------------------------------------------- relay


def cmd_relay(args: argparse.Namespace) -> int:
    """``hamta relay activate|deactivate|status``: drive a running relay over its socket."""
    socket_path = args.socket or _load(args.config).control.socket
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
    from hamta.queue import recipient_domain  # noqa: PLC0415 - see the imports at the top
    from hamta.spool import LiveMessage, load_state  # noqa: PLC0415
    from hamta.workers import SHARD_PREFIX  # noqa: PLC0415

    domains: dict[str, dict[str, int]] = {}
    depth = 0
    shards = [path, *sorted(path.glob(f"{SHARD_PREFIX}*"))]
    messages: list[LiveMessage] = []
    for shard in shards:
        state = load_state(shard)
        depth += state.stats.messages
        messages += state.live.values()
    for message in messages:
        for index in message.pending:
            row = domains.setdefault(
                recipient_domain(message.rec.recipients[index]), {"ready": 0, "deferred": 0}
            )
            row["deferred" if message.retry and index in message.retry else "ready"] += 1
    return {"state": "offline", "spool": str(path), "depth": depth, "domains": domains}


def cmd_queue(args: argparse.Namespace) -> int:
    """``hamta queue``: queued recipients by domain, from the running relay or the spool."""
    config = _load(args.config)
    summary = _queue_from_admin(config.admin.listen) if config.admin.listen else None
    if summary is None or summary.get("state") == "standby":
        if not (config.spool.path / "journal").is_dir():
            print(f"hamta: no relay answers on {config.admin.listen} and no spool at "
                  f"{config.spool.path}", file=sys.stderr)  # fmt: skip
            return 1
        summary = _queue_from_spool(config.spool.path)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"state: {summary['state']}   messages queued: {summary['depth']}")
    domains: dict[str, dict[str, int]] = summary.get("domains", {})
    if domains:
        width = max(len("domain"), *(len(d) for d in domains))
        print(f"{'domain':<{width}}  {'ready':>8}  {'deferred':>8}")
        for domain, row in sorted(domains.items(), key=lambda kv: -sum(kv[1].values())):
            print(f"{domain:<{width}}  {row['ready']:>8}  {row['deferred']:>8}")
    return 0


def cmd_queue_destination(args: argparse.Namespace) -> int:
    """``hamta queue suspend|resume|retry DOMAIN``: act on one destination of a running relay."""
    socket_path = args.socket or _load(args.config).control.socket
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
        print("hamta: give --messages-per-day and --avg-size, or --from-metrics a relay that has "
              "received mail", file=sys.stderr)  # fmt: skip
        return 2
    config = _load(args.config)
    try:
        workload = capacity.Workload(
            per_day, size, args.retention, args.outage_hours, args.peak_factor,
            latency or capacity.DEFAULT_LATENCY_SECONDS,
        )  # fmt: skip
    except capacity.CapacityError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 2
    result = capacity.plan(workload, capacity.Limits.of(config.delivery, config.spool))
    if args.json:
        print(json.dumps(capacity.to_dict(result, measured), indent=2))
        return 0
    if measured is not None:
        print(capacity.format_measured(measured, f"{args.from_metrics} ({state})",
                                       args.sample_seconds))  # fmt: skip
    print(capacity.format_plan(result))
    return 0


# ------------------------------------------------------------------ config


def cmd_spool_check(args: argparse.Namespace) -> int:
    """``hamta spool check [--repair]``: damage in a spool no relay holds; rebuild it."""
    from hamta import spool_check  # noqa: PLC0415 - see the imports at the top
    from hamta.spool import SpoolError  # noqa: PLC0415
    from hamta.workers import SHARD_PREFIX  # noqa: PLC0415

    path: Path = args.spool or _load(args.config).spool.path
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
    config = _load(args.file)
    if config.log.file is not None and (problem := eventlog.log_file_problem(config.log.file)):
        print(f"hamta: {args.file}: log.file: {problem}", file=sys.stderr)
        return 2
    print(f"{args.file}: ok (SMTP on {', '.join(config.smtp.listen)}, spool {config.spool.path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``hamta`` command."""
    parser = argparse.ArgumentParser(prog="hamta", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the relay")
    serve.add_argument("--config", type=Path, help="TOML file (default: built-in)")
    serve.add_argument(
        "--standby", action="store_true",
        help="start warm: no spool, no listener, until activated over the control socket",
    )  # fmt: skip
    serve.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    # A worker's SMTP sockets, bound by worker 0 (hamta.listeners), as file descriptors.
    serve.add_argument("--listen-fds", type=_fds, default=None, help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

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
        act.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                         help="TOML file naming the control socket")  # fmt: skip
        act.add_argument("--socket", type=Path, help="control socket (default: from config)")
        act.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print JSON")  # fmt: skip
        act.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a reply")
        act.set_defaults(func=cmd_queue_destination)

    cap = sub.add_parser("capacity", help="spool, logs and connections a mail volume needs")
    cap.add_argument("--messages-per-day", type=float, help="mail received a day")
    cap.add_argument("--avg-size", type=float, help="average message size in KiB")
    cap.add_argument(
        "--retention", type=float, default=capacity.DEFAULT_RETENTION_DAYS,
        help="days the event log is kept (default: %(default)g)",
    )  # fmt: skip
    cap.add_argument(
        "--outage-hours", type=float, default=capacity.DEFAULT_OUTAGE_HOURS,
        help="delivery outage the spool must absorb (default: %(default)g)",
    )  # fmt: skip
    cap.add_argument(
        "--peak-factor", type=float, default=capacity.DEFAULT_PEAK_FACTOR,
        help="peak rate over the daily average (default: %(default)g)",
    )  # fmt: skip
    cap.add_argument(
        "--latency", type=float,
        help=f"seconds per delivery (default: measured, else {capacity.DEFAULT_LATENCY_SECONDS:g})",
    )  # fmt: skip
    cap.add_argument(
        "--from-metrics", metavar="URL",
        help="a running relay's admin endpoint, e.g. http://127.0.0.1:8025",
    )  # fmt: skip
    cap.add_argument(
        "--sample-seconds", type=float, default=5.0,
        help="time between the two scrapes of --from-metrics (default: %(default)g)",
    )  # fmt: skip
    cap.add_argument("--config", type=Path, help="relay TOML for its limits (default: built-in)")
    cap.add_argument("--json", action="store_true", help="print one JSON object")
    cap.set_defaults(func=cmd_capacity)

    spool = sub.add_parser("spool", help="spool tools")
    spool_sub = spool.add_subparsers(dest="spool_command", required=True)
    spool_check = spool_sub.add_parser(
        "check", help="report damaged spool files and what they cost (exit 1 if any)"
    )
    spool_check.add_argument("--config", type=Path, help="TOML file naming the spool")
    spool_check.add_argument("--spool", type=Path, help="spool directory (default: from config)")
    spool_check.add_argument(
        "--repair", action="store_true",
        help="rebuild as a relay's recovery would: damaged files to damaged/, a fresh checkpoint",
    )  # fmt: skip
    spool_check.add_argument("--json", action="store_true", help="print JSON")
    spool_check.set_defaults(func=cmd_spool_check)

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_config_check)

    add_reputation_commands(sub)
    add_cluster_commands(sub)
    add_chaos_commands(sub)
    add_lab_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hamta`` console script."""
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
