"""The admin endpoint (aiohttp): health for the agent, the queue for operators, metrics.

``/health/live`` answers 200 while the process runs (a warm standby included);
``/health/ready`` answers 200 only when the relay is listening with a writable spool, which is what
the cluster agent and load balancers probe; ``/api/queue`` gives the queue figures as JSON and
``/metrics`` the Prometheus exposition.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from hamta.config import parse_hostport
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


async def _metrics(request: web.Request) -> web.Response:
    payload = await request.app[RELAY_KEY].node_metrics()
    return web.Response(text=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(relay: Relay) -> web.Application:
    """The aiohttp application for one relay."""
    app = web.Application()
    app[RELAY_KEY] = relay
    app.router.add_get("/health/live", _live)
    app.router.add_get("/health/ready", _ready)
    app.router.add_get("/api/queue", _queue)
    app.router.add_get("/metrics", _metrics)
    return app


async def start_admin(relay: Relay, listen: str) -> web.AppRunner:
    """Serve the admin endpoint on ``listen`` (host:port); stop it with ``runner.cleanup()``."""
    runner = web.AppRunner(make_app(relay), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = parse_hostport(listen)
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner
