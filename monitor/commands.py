"""``monitor run | status | check NAME``: the monitor's sub-commands, for any dispatcher.

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
import sys
import time
import urllib.error
import urllib.request
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
    from aiohttp import web  # noqa: PLC0415

    from hamta import eventlog  # noqa: PLC0415
    from monitor.api import build_app  # noqa: PLC0415
    from monitor.engine import Engine  # noqa: PLC0415
    from monitor.metrics import MonitorMetrics  # noqa: PLC0415
    from monitor.observation import SystemClock  # noqa: PLC0415
    from monitor.store import Store  # noqa: PLC0415

    eventlog.configure(config.log.level, config.log.file)
    log = eventlog.get_logger(component="monitor")
    keys = relay_dkim_keys(config.relay_config) if config.relay_config else []
    store = Store(config.store.path)
    metrics = MonitorMetrics(config.checks)
    engine = Engine(
        config.checks,
        store,
        metrics,
        log,
        SystemClock(),
        nameservers=tuple(config.dns.nameservers),
        dkim_keys=tuple(keys),
        retention=config.store.retention,
    )
    runner = web.AppRunner(build_app(store, metrics, config.checks, config.server.listen))
    await runner.setup()
    host, port = parse_hostport(config.server.listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("MonitorStarted", listen=config.server.listen, checks=len(config.checks))
        engine_task = asyncio.create_task(engine.run())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({engine_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if engine_task.done():
            # The checks never raise: what ends the engine is the store (a full or broken disk).
            # A monitor that records nothing must not look alive: it stops, and says why.
            log.error("MonitorFailed", error=repr(engine_task.exception()))
            return 1
        engine_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await engine_task
        log.info("MonitorStopped")
        return 0
    finally:
        await runner.cleanup()
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
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        + f"  {line[-1]}"
        for line in lines
    )


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
