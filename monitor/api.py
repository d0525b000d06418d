"""The monitor's HTTP face: ``/api/checks`` (JSON) and ``/metrics``, with aiohttp.

Both read what the engine recorded (the store, the metrics), never the checks themselves, so a
scrape costs no probe. The status page to come is served from here and reads the same store.
The Host check and security headers are the relay admin endpoint's (hamta.admin_guard): the
same DNS-rebinding reasoning applies to a monitor on loopback.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from hamta.admin_guard import guard
from monitor.api_cluster import LINK_KEY, add_cluster_routes
from monitor.api_incidents import add_incident_routes
from monitor.cluster_link import ClusterLink
from monitor.config import Check
from monitor.failover_rules import states_by_location
from monitor.history_api import add_history_routes
from monitor.incident_store import IncidentStore
from monitor.maintenance import Window
from monitor.metrics import MonitorMetrics
from monitor.observation import Clock, SystemClock
from monitor.page import add_status_page
from monitor.store import Store


@dataclass(frozen=True, slots=True)
class Sources:
    """What the pages read: the store, the metrics, the configured checks (in their order)."""

    store: Store
    metrics: MonitorMetrics
    checks: tuple[Check, ...]


SOURCES_KEY = web.AppKey("sources", Sources)


async def checks_view(store: Store, checks: Sequence[Check]) -> list[dict[str, Any]]:
    """Each configured check: state, since when, its run of outcomes, the last observation."""
    rows = await store.states()
    view = []
    for check in checks:
        row = rows.get(check.name)
        state = row.state if row is not None else None
        view.append(
            {
                "name": check.name,
                "kind": check.kind,
                "interval": check.interval,
                "state": state.state.value if state else "unknown",
                "since": state.since if state else None,
                "failures": state.failures if state else 0,
                "successes": state.successes if state else 0,
                "last": row.last if row is not None else None,
            }
        )
    return view


async def _checks(request: web.Request) -> web.Response:
    sources = request.app[SOURCES_KEY]
    view = await checks_view(sources.store, sources.checks)
    link = request.app.get(LINK_KEY)
    if link is not None:  # [cluster]: each location's verdict, from the published znodes
        located = link.snapshot.locations
        for row in view:
            row["locations"] = states_by_location(row["name"], located, link.location, row["state"])
    return web.json_response({"checks": view})


async def _metrics(request: web.Request) -> web.Response:
    sources = request.app[SOURCES_KEY]
    rows = await IncidentStore(sources.store).open_incidents()
    sources.metrics.open_incidents(collections.Counter(row.incident.severity for row in rows))
    body = sources.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(
    store: Store,
    metrics: MonitorMetrics,
    checks: Sequence[Check],
    listen: str,
    *,
    clock: Clock | None = None,
    windows: Sequence[Window] = (),
    link: ClusterLink | None = None,
) -> web.Application:
    app = web.Application()
    # Incidents, acknowledgement and maintenance windows (monitor.api_incidents).
    location = link.location if link is not None else None
    add_incident_routes(app, IncidentStore(store), windows, location)
    app[SOURCES_KEY] = Sources(store, metrics, tuple(checks))
    guard(app, listen, [])
    app.router.add_get("/api/checks", _checks)
    app.router.add_get("/metrics", _metrics)
    add_history_routes(app, store, checks, clock or SystemClock(), windows)
    add_status_page(app)
    if link is not None:  # [cluster]: /api/cluster and /api/locations
        add_cluster_routes(app, link)
    return app
