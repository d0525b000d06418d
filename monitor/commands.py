"""``monitor run | status | check NAME | incidents | ack ID``: the monitor's sub-commands.

``register(subparsers)`` adds them under ``monitor``; each sets ``args.func(args) -> int``.
The collaborators of a running monitor (store, metrics, engine, HTTP app) are built in one
place, ``_serve``. Exit codes: 0 fine, 1 the check is not up, 2 a configuration or usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hamta.config import ConfigError, parse_hostport
from monitor.config import MonitorConfig, load_monitor_config, relay_dkim_keys

DEFAULT_CONFIG = Path("monitor.toml")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``monitor`` and its sub-commands; bare ``monitor`` runs it."""
    monitor = subparsers.add_parser("monitor", help="watch the mail service from outside")
    _config_option(monitor)
    monitor.set_defaults(func=cmd_run)
    sub = monitor.add_subparsers(dest="monitor_command")
    run = sub.add_parser("run", help="run every check at its interval; serve /api and /metrics")
    _config_option(run)
    run.set_defaults(func=cmd_run)
    status = sub.add_parser("status", help="each check's state, from the store or the API")
    _config_option(status)
    status.add_argument(
        "--api", action="store_true", help="ask the running monitor instead of reading its store"
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=cmd_status)
    check = sub.add_parser("check", help="run one check now; exit 0 when it is up")
    _config_option(check)
    check.add_argument("name", help="the check's name in the configuration")
    check.set_defaults(func=cmd_check)
    incidents = sub.add_parser("incidents", help="open and recent incidents, from the store")
    _config_option(incidents)
    incidents.add_argument("--json", action="store_true", help="print JSON instead of a table")
    incidents.add_argument("--limit", type=int, default=50, help="at most this many (50)")
    incidents.set_defaults(func=cmd_incidents)
    ack = sub.add_parser("ack", help="acknowledge an incident: no further escalation")
    _config_option(ack)
    ack.add_argument("incident", type=int, help="the incident's number")
    ack.add_argument("--by", default=None, help="who acknowledges (default: the user's name)")
    ack.set_defaults(func=cmd_ack)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"the monitor's TOML file (default {DEFAULT_CONFIG})",
    )


def _load(args: argparse.Namespace) -> MonitorConfig:
    try:
        return load_monitor_config(getattr(args, "config", DEFAULT_CONFIG))
    except ConfigError as exc:
        print(f"monitor: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    from hamta.eventlog import LogFileError  # noqa: PLC0415

    config = _load(args)
    try:
        return asyncio.run(_serve(config))
    except (OSError, LogFileError) as exc:  # the listen address taken, the log not writable
        print(f"monitor: {exc}", file=sys.stderr)
        return 1


async def _serve(config: MonitorConfig) -> int:
    """Run until a signal (0) or until the engine fails, e.g. its store cannot be written (1)."""
    # Imported here: `monitor status` and `check` need none of the server's modules.
    import aiohttp  # noqa: PLC0415
    from aiohttp import web  # noqa: PLC0415

    from hamta import eventlog  # noqa: PLC0415
    from monitor.alerting import assemble  # noqa: PLC0415
    from monitor.api import build_app  # noqa: PLC0415
    from monitor.cluster_link import cluster_link  # noqa: PLC0415
    from monitor.engine import Engine  # noqa: PLC0415
    from monitor.metrics import MonitorMetrics  # noqa: PLC0415
    from monitor.observation import SystemClock  # noqa: PLC0415
    from monitor.store import Store  # noqa: PLC0415

    eventlog.configure(config.log.level, config.log.file)
    log = eventlog.get_logger(component="monitor")
    keys = relay_dkim_keys(config.relay_config) if config.relay_config else []
    store = Store(config.store.path)
    metrics = MonitorMetrics(config.checks)
    clock = SystemClock()
    session = aiohttp.ClientSession()
    alerting, dispatcher = assemble(config, store, session, log, clock, socket.gethostname())
    link = cluster_link(config, store, log, clock, alerting.on_change)  # None: no [cluster]
    engine = Engine(
        config.checks,
        store,
        metrics,
        log,
        clock,
        nameservers=tuple(config.dns.nameservers),
        dkim_keys=tuple(keys),
        retention=config.store.retention,
        on_change=link.on_change if link else alerting.on_change,
        relabel=link.relabel if link else None,
    )
    app = build_app(
        store,
        metrics,
        config.checks,
        config.server.listen,
        clock=clock,
        windows=alerting.windows,
        link=link,
    )
    runner = web.AppRunner(app)
    await runner.setup()
    host, port = parse_hostport(config.server.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("MonitorStarted", listen=config.server.listen, checks=len(config.checks))
        if link is not None:
            # The cluster first (at most its connect_timeout): the passive node's relay must
            # not be judged down, and open an incident, before the monitor knows it is passive.
            await link.step()
        engine_task = asyncio.create_task(engine.run())
        # The notifications and the escalation: beside the engine, never in its way.
        tasks = {engine_task, asyncio.create_task(alerting.run())}
        tasks.add(asyncio.create_task(dispatcher.run()))
        if link is not None:
            tasks.add(asyncio.create_task(link.run()))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed = next((task for task in tasks if task.done()), None)
        if failed is not None:
            # The checks never raise: what ends the engine is the store (a full or broken disk).
            # A monitor that records nothing must not look alive: it stops, and says why.
            log.error("MonitorFailed", error=repr(failed.exception()))
            return 1
        # Notifications already queued (a resolve, say) get a moment to go out.
        await dispatcher.drain(2.0)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks)
        log.info("MonitorStopped")
        return 0
    finally:
        await runner.cleanup()
        await session.close()
        await store.close()


# ------------------------------------------------------------------ status


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.api:
        rows = _from_api(config)
        if rows is None:
            return 1
    else:
        if not config.store.path.exists():
            print(
                f"monitor: no store at {config.store.path} (has the monitor run?)", file=sys.stderr
            )
            return 1
        rows = asyncio.run(_from_store(config))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows, time.time()))
    return 0


async def _from_store(config: MonitorConfig) -> list[dict[str, Any]]:
    from monitor.api import checks_view  # noqa: PLC0415
    from monitor.store import Store  # noqa: PLC0415

    store = Store(config.store.path)
    try:
        return await checks_view(store, config.checks)
    finally:
        await store.close()


def _from_api(config: MonitorConfig) -> list[dict[str, Any]] | None:
    host, port = parse_hostport(config.server.listen)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/api/checks"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            rows: list[dict[str, Any]] = json.load(response)["checks"]
            return rows
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        print(f"monitor: cannot read {url}: {exc}", file=sys.stderr)
        return None


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def columns(lines: Sequence[tuple[str, ...]]) -> str:
    """Lines as aligned columns; the last column (a free-text detail) is left unpadded."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        + f"  {line[-1]}"
        for line in lines
    )


def format_table(rows: list[dict[str, Any]], now: float) -> str:
    """One line per check: name, kind, state, since, last run's time and detail."""
    header = ("CHECK", "KIND", "STATE", "SINCE", "LAST", "DETAIL")
    lines = [header]
    for row in rows:
        last = row.get("last") or {}
        since = _ago(now - row["since"]) if row.get("since") else "-"
        took = f"{last['seconds']:.2f}s" if last else "-"
        lines.append(
            (row["name"], row["kind"], row["state"], since, took, str(last.get("detail", "")))
        )
    return columns(lines)


# ------------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    check = config.check(args.name)
    if check is None:
        names = ", ".join(c.name for c in config.checks) or "none"
        print(f"monitor: no check named {args.name!r} (configured: {names})", file=sys.stderr)
        return 2
    return asyncio.run(_check_now(config, check))


async def _stored_answers(config: MonitorConfig, name: str) -> dict[str, list[str]]:
    from monitor.store import Store  # noqa: PLC0415

    if not config.store.path.exists():
        return {}
    store = Store(config.store.path)
    try:
        return await store.answers(name)
    finally:
        await store.close()


async def _check_now(config: MonitorConfig, check: Any) -> int:
    from monitor.checks import run_check  # noqa: PLC0415
    from monitor.engine import thresholds  # noqa: PLC0415
    from monitor.observation import CheckContext, SystemClock  # noqa: PLC0415
    from monitor.verdicts import CheckState, State, Thresholds, next_state  # noqa: PLC0415

    keys = relay_dkim_keys(config.relay_config) if config.relay_config else []
    clock = SystemClock()
    # The running monitor's last answers, read and not written: what changed since its run.
    known = await _stored_answers(config, check.name) if check.kind == "dns" else {}
    context = CheckContext(clock.time(), tuple(config.dns.nameservers), tuple(keys), known)
    observation = await run_check(check, context, clock)
    # One observation is the whole evidence here: thresholds of 1, the check's slowness limit.
    once = Thresholds(1, 1, thresholds(check).degraded_after)
    state, _ = next_state(
        check.name, CheckState(), observation.outcome, observation.seconds, 0.0, "", once
    )
    print(f"{check.name}: {state.state.value} ({observation.seconds:.2f}s) {observation.detail}")
    for line in observation.changes:
        print(f"  changed: {line}")
    return 0 if state.state is State.UP else 1


# --------------------------------------------------------------- incidents


def _when(at: float | None) -> str:
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


def format_incidents(rows: list[dict[str, Any]]) -> str:
    """One line per incident: number, check, severity, state, opened, resolved, ack, window."""
    header = ("ID", "CHECK", "SEVERITY", "STATE", "OPENED", "RESOLVED", "ACK", "DETAIL")
    lines = [header]
    for row in rows:
        lines.append(
            (
                str(row["id"]),
                row["check"],
                row["severity"],
                row["state"],
                _when(row["opened"]),
                _when(row["resolved"]),
                row["acked_by"] or "-",
                (f"[maintenance {row['maintenance']}] " if row["maintenance"] else "")
                + row["detail"],
            )
        )
    return columns(lines)


def cmd_incidents(args: argparse.Namespace) -> int:
    config = _load(args)
    if not config.store.path.exists():
        print(f"monitor: no store at {config.store.path} (has the monitor run?)", file=sys.stderr)
        return 1
    rows = asyncio.run(_incidents(config, max(1, args.limit)))
    print(json.dumps(rows, indent=2) if args.json else format_incidents(rows))
    return 0


async def _incidents(config: MonitorConfig, limit: int) -> list[dict[str, Any]]:
    from monitor.incident_store import IncidentStore  # noqa: PLC0415
    from monitor.store import Store  # noqa: PLC0415

    store = Store(config.store.path)
    try:
        return [row.as_dict() for row in await IncidentStore(store).recent(limit)]
    finally:
        await store.close()


def cmd_ack(args: argparse.Namespace) -> int:
    """Acknowledge through the store, not the API: it works whether the monitor runs or not
    (stopped for an upgrade, crashed), and the running monitor reads the store at each tick."""
    import getpass  # noqa: PLC0415

    from monitor.incident_store import AckError  # noqa: PLC0415

    config = _load(args)
    if not config.store.path.exists():
        print(f"monitor: no store at {config.store.path} (has the monitor run?)", file=sys.stderr)
        return 1
    by = args.by or getpass.getuser()
    try:
        row = asyncio.run(_ack(config, args.incident, by))
    except AckError as exc:
        print(f"monitor: {exc}", file=sys.stderr)
        return 1
    print(f"incident {row['id']} ({row['check']}) acknowledged by {row['acked_by']}")
    return 0


async def _ack(config: MonitorConfig, incident: int, by: str) -> dict[str, Any]:
    from monitor.incident_store import IncidentStore  # noqa: PLC0415
    from monitor.store import Store  # noqa: PLC0415

    store = Store(config.store.path)
    try:
        row = await IncidentStore(store).ack(incident, by, time.time())
        return row.as_dict()
    finally:
        await store.close()
