"""The history routes of the monitor's API: ``/api/uptime``, ``/api/outages`` and
``/api/checks/{name}/history?range=``; the store reads, ``monitor.uptime`` does the arithmetic.

Every answer says the time it was computed at (``now``), so that the page and a test compare
figures of the same instant. A range the API does not know is a 400 that lists the known ones;
a check that is not configured is a 404.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from monitor.config import Check
from monitor.maintenance import Window, spans
from monitor.observation import Clock
from monitor.store import Store
from monitor.uptime import (
    RANGES,
    RangeError,
    grid,
    merged_spans,
    outages,
    series,
    span,
    timeline,
    uptime,
)

DEFAULT_RANGE = "24h"


async def uptime_view(
    store: Store, checks: Sequence[Check], now: float, windows: Sequence[Window] = ()
) -> dict[str, Any]:
    """Each check's uptime over every range (one read of the longest range's changes), the
    time in its maintenance windows left out."""
    names = [check.name for check in checks]
    longest = max(RANGES.values())
    history = await store.history(names, now - longest)
    gaps = await store.gaps(now - longest)
    view = []
    for check in checks:
        changes = history[check.name]
        held = spans(windows, check.name, now - longest, now)
        ranges = {
            name: uptime(changes, now - seconds, now, gaps, held).as_json()
            for name, seconds in RANGES.items()
        }
        view.append({"name": check.name, "kind": check.kind, "ranges": ranges})
    return {"now": now, "ranges": list(RANGES), "checks": view}


async def outages_view(
    store: Store, checks: Sequence[Check], now: float, range_name: str
) -> dict[str, Any]:
    """Every check's outages in the range, newest first."""
    start = now - span(range_name)
    history = await store.history([check.name for check in checks], start)
    found = [outage for changes in history.values() for outage in outages(changes, start, now)]
    found.sort(key=lambda outage: outage.start, reverse=True)
    return {
        "now": now,
        "range": range_name,
        "outages": [outage.as_json(now) for outage in found],
    }


async def check_history_view(
    store: Store, check: Check, now: float, range_name: str, windows: Sequence[Window] = ()
) -> dict[str, Any]:
    """One check over a range: response-time series, uptime, state timeline, outages."""
    start, width, count = grid(range_name, now)
    since = now - span(range_name)
    changes = (await store.history([check.name], since))[check.name]
    rows = await store.buckets(check.name, start, width, count)
    gaps = await store.gaps(since)
    held = spans(windows, check.name, since, now)
    return {
        "now": now,
        "check": check.name,
        "kind": check.kind,
        "range": range_name,
        "start": since,
        "bucket_s": width,
        "series": series(rows, start, width, count),
        "uptime": uptime(changes, since, now, gaps, held).as_json(),
        "timeline": [
            {"state": i.state.value, "start": i.start, "end": i.end}
            for i in timeline(changes, since, now, gaps)
        ],
        "monitor_gaps": [{"start": a, "end": b} for a, b in gaps],
        "maintenance": [{"start": a, "end": b} for a, b in merged_spans(held)],
        "outages": [outage.as_json(now) for outage in outages(changes, since, now)],
    }


def _range(request: web.Request) -> str:
    name = request.query.get("range", DEFAULT_RANGE)
    try:
        span(name)
    except RangeError as exc:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": str(exc)}), content_type="application/json"
        ) from None
    return name


def add_history_routes(
    app: web.Application,
    store: Store,
    checks: Sequence[Check],
    clock: Clock,
    windows: Sequence[Window] = (),
) -> None:
    by_name = {check.name: check for check in checks}

    async def _uptime(_request: web.Request) -> web.Response:
        return web.json_response(await uptime_view(store, checks, clock.time(), windows))

    async def _outages(request: web.Request) -> web.Response:
        view = await outages_view(store, checks, clock.time(), _range(request))
        return web.json_response(view)

    async def _history(request: web.Request) -> web.Response:
        check = by_name.get(request.match_info["name"])
        if check is None:
            error = f"no check named {request.match_info['name']!r}"
            raise web.HTTPNotFound(
                text=json.dumps({"error": error}), content_type="application/json"
            )
        view = await check_history_view(store, check, clock.time(), _range(request), windows)
        return web.json_response(view)

    app.router.add_get("/api/uptime", _uptime)
    app.router.add_get("/api/outages", _outages)
    app.router.add_get("/api/checks/{name}/history", _history)
