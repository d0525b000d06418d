"""The alerting part of the monitor's HTTP face: incidents, acknowledgement, maintenance.

``GET /api/incidents`` (open first, then recent), ``GET /api/incidents/{id}`` (with its
timeline), ``POST /api/incidents/{id}/ack`` and ``GET /api/maintenance``. The acknowledgement
writes the store, exactly as ``hamta monitor ack`` does; it takes only a JSON body, so a page
of another site cannot post it with a plain form (that needs a CORS preflight, refused).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from monitor.failover_rules import incident_locations
from monitor.incident_store import AckError, IncidentStore
from monitor.maintenance import Window
from monitor.pause_window import Windows


@dataclass(frozen=True, slots=True)
class AlertingSources:
    incidents: IncidentStore
    windows: Windows  # live: the configured windows and the cluster's pause
    location: str | None  # this check location's name, with a [cluster] section


ALERTING_KEY = web.AppKey("alerting", AlertingSources)


def window_view(window: Window, now: float) -> dict[str, Any]:
    """A window as the API and the status page show it: what it is, and when it next runs."""
    upcoming = window.upcoming(now)
    start, end = upcoming if upcoming else (window.start, window.end)
    return {
        "name": window.name,
        "checks": list(window.checks) or "all",
        "recurring": window.recurring,
        "days": [("mon", "tue", "wed", "thu", "fri", "sat", "sun")[d] for d in window.days],
        "time": window.at.isoformat(timespec="minutes") if window.at else None,
        "duration": window.duration if window.recurring else None,
        "timezone": window.zone,
        "start": start,
        "end": None if end is not None and math.isinf(end) else end,  # a pause: until resume
        "active": window.current(now) is not None,
        "by": window.by or None,
        "reason": window.reason or None,
    }


def _ident(request: web.Request) -> int:
    try:
        return int(request.match_info["ident"])
    except ValueError:
        raise web.HTTPNotFound(text="no such incident") from None


async def _incidents(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise web.HTTPBadRequest(text="limit: not a number") from None
    rows = await request.app[ALERTING_KEY].incidents.recent(max(1, min(limit, 1000)))
    return web.json_response({"incidents": [row.as_dict() for row in rows]})


async def _incident(request: web.Request) -> web.Response:
    incidents = request.app[ALERTING_KEY].incidents
    ident = _ident(request)
    row = await incidents.get(ident)
    if row is None:
        raise web.HTTPNotFound(text=f"no incident {ident}")
    timeline = await incidents.timeline(ident)
    shown = {**row.as_dict(), "timeline": timeline}
    location = request.app[ALERTING_KEY].location
    if location is not None:  # the check locations that saw it: this one, then its notes'
        shown["locations"] = incident_locations(location, timeline)
    return web.json_response(shown)


async def _ack(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(text='send a JSON body: {"by": NAME}')
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="not JSON") from None
    by = body.get("by", "api") if isinstance(body, dict) else None
    if not isinstance(by, str) or not by.strip():
        raise web.HTTPBadRequest(text="by: a name, as text")
    try:
        row = await request.app[ALERTING_KEY].incidents.ack(_ident(request), by, time.time())
    except AckError as exc:
        raise web.HTTPConflict(text=str(exc)) from None
    return web.json_response(row.as_dict())


async def _maintenance(request: web.Request) -> web.Response:
    now = time.time()
    windows = request.app[ALERTING_KEY].windows
    return web.json_response({"maintenance": [window_view(w, now) for w in windows.shown()]})


def add_incident_routes(
    app: web.Application,
    incidents: IncidentStore,
    windows: Sequence[Window],
    location: str | None = None,
) -> None:
    app[ALERTING_KEY] = AlertingSources(incidents, Windows.of(windows), location)
    app.router.add_get("/api/incidents", _incidents)
    app.router.add_get("/api/incidents/{ident}", _incident)
    app.router.add_post("/api/incidents/{ident}/ack", _ack)
    app.router.add_get("/api/maintenance", _maintenance)
