"""The admin endpoint (aiohttp): health for the agent, the queue for operators, metrics.

``/health/live`` answers 200 while the process runs (a warm standby included);
``/health/ready`` answers 200 only when the relay is listening with a writable spool, which is what
the cluster agent and load balancers probe; ``/api/queue`` gives the queue figures as JSON and
``/metrics`` the Prometheus exposition. ``/api/domains`` lists destinations by queue depth with
their bounces and throttling, ``/api/domain/{domain}`` one of them (``hamta.domain_stats``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from hamta import activations
from hamta.admin_guard import guard
from hamta.config import parse_hostport
from hamta.dashboard import add_dashboard
from hamta.domain_stats import domain_view, domains_view
from hamta.relay import Relay

RELAY_KEY = web.AppKey("relay", Relay)


async def _live(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    return web.json_response({"live": True, "state": relay.state.value})


async def _ready(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    ready = await relay.node_ready()
    body = {"ready": ready, "state": relay.state.value}
    return web.json_response(body, status=200 if ready else 503)


async def _queue(request: web.Request) -> web.Response:
    return web.json_response(await request.app[RELAY_KEY].node_summary())


async def _domains(request: web.Request) -> web.Response:
    limit_text = request.query.get("limit", "100")
    if not limit_text.isdigit():
        return web.json_response({"error": "limit must be a whole number"}, status=400)
    snapshot = await request.app[RELAY_KEY].node_domains()
    return web.json_response(domains_view(snapshot, int(limit_text) or None))


async def _domain(request: web.Request) -> web.Response:
    domain = request.match_info["domain"].lower().rstrip(".")
    snapshot = await request.app[RELAY_KEY].node_domains()
    row = snapshot["domains"].get(domain)
    if row is None:
        return web.json_response(
            {"domain": domain, "error": "nothing queued or sent for this domain in memory"},
            status=404,
        )
    return web.json_response(domain_view(domain, row, snapshot["window_seconds"]))


async def _metrics(request: web.Request) -> web.Response:
    payload = await request.app[RELAY_KEY].node_metrics()
    return web.Response(text=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _node(request: web.Request) -> web.Response:
    relay = request.app[RELAY_KEY]
    summary = await relay.node_summary()
    spool = summary.get("spool")
    taken = await asyncio.to_thread(activations.recent, Path(spool)) if spool else []
    return web.json_response(
        {
            "node": relay.config.node.hostname,
            "state": relay.state.value,
            "ready": await relay.node_ready(),
            "epoch": summary.get("epoch"),
            "fenced": bool(summary.get("fenced")),
            "spool": spool,
            "activations": taken,
        }
    )


def make_app(relay: Relay, listen: str) -> web.Application:
    """The aiohttp application for one relay, served on ``listen``."""
    app = web.Application()
    app[RELAY_KEY] = relay
    admin = relay.config.admin
    guard(app, listen, admin.allowed_hosts)
    add_dashboard(
        app,
        relay.node_summary,
        lambda: relay.node_metrics(destinations=False),
        admin.dashboard_interval,
        admin.dashboard_samples,
        relay.log,
    )
    app.router.add_get("/api/node", _node)
    app.router.add_get("/health/live", _live)
    app.router.add_get("/health/ready", _ready)
    app.router.add_get("/api/queue", _queue)
    app.router.add_get("/api/domains", _domains)
    app.router.add_get("/api/domain/{domain}", _domain)
    app.router.add_get("/metrics", _metrics)
    return app


async def start_admin(relay: Relay, listen: str) -> web.AppRunner:
    """Serve the admin endpoint on ``listen`` (host:port); stop it with ``runner.cleanup()``."""
    runner = web.AppRunner(make_app(relay, listen), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = parse_hostport(listen)
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner
