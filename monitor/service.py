"""A running monitor, assembled: the store, metrics, alerting, engine and HTTP app built in one
place from the configuration, run until a signal or until the engine fails.

``hamta monitor run`` (``monitor.commands``) only handles its arguments and calls :func:`serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket

import aiohttp
from aiohttp import web

from hamta import eventlog
from hamta.config import parse_hostport
from monitor.alerting import assemble
from monitor.api import build_app
from monitor.cluster_link import cluster_link
from monitor.config import MonitorConfig, relay_dkim_keys
from monitor.engine import Engine
from monitor.metrics import MonitorMetrics
from monitor.observation import SystemClock
from monitor.store import Store


async def serve(config: MonitorConfig) -> int:
    """Run until a signal (0) or until the engine fails, e.g. its store cannot be written (1)."""
    eventlog.configure(config.log.level, config.log.file)
    log = eventlog.get_logger(component="monitor")
    keys = relay_dkim_keys(config.relay_config) if config.relay_config else []
    store = Store(config.store.path)
    clock = SystemClock()
    session = aiohttp.ClientSession()
    alerting, dispatcher = assemble(config, store, session, log, clock, socket.gethostname())
    # The notification counts are the dispatcher's own, read at each scrape.
    metrics = MonitorMetrics(config.checks, notifications=dispatcher.counts)
    # None without [cluster]; its pause is a window of the alerting's (monitor.pause_window).
    link = cluster_link(config, store, log, clock, alerting.on_change, alerting.windows)
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
