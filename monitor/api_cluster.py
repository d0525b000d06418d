"""``/api/cluster`` and ``/api/locations``: what the cluster link last read (monitor.cluster_link).

Registered only when monitor.toml has a ``[cluster]`` section: without it both answer 404,
which the status page reads as "this monitor does not report the cluster".
"""

from __future__ import annotations

from aiohttp import web

from monitor.cluster_link import ClusterLink

LINK_KEY = web.AppKey("cluster_link", ClusterLink)


async def _cluster(request: web.Request) -> web.Response:
    link = request.app[LINK_KEY]
    snapshot = link.snapshot
    return web.json_response(
        {
            "cluster": snapshot.cluster,
            "link": snapshot.link,
            "detail": snapshot.detail,
            "read_at": snapshot.read_at,
            "epoch": snapshot.epoch,
            "active": snapshot.active,
            "active_since": snapshot.active_since,
            "nodes": list(snapshot.nodes),
            "failovers": list(snapshot.failovers),
            "paused": dict(snapshot.paused) if snapshot.paused is not None else None,
        }
    )


async def _locations(request: web.Request) -> web.Response:
    link = request.app[LINK_KEY]
    snapshot = link.snapshot
    return web.json_response(
        {
            "location": link.location,
            "link": snapshot.link,
            "locations": dict(snapshot.locations),
        }
    )


def add_cluster_routes(app: web.Application, link: ClusterLink) -> None:
    app[LINK_KEY] = link
    app.router.add_get("/api/cluster", _cluster)
    app.router.add_get("/api/locations", _locations)
