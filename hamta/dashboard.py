"""The live dashboard: a page at ``/`` of the admin endpoint, and the history it draws.

The relay samples itself every ``admin.dashboard_interval`` seconds (node-wide: every worker's
figures added up, as ``/api/queue`` and ``/metrics`` are) and keeps the last
``admin.dashboard_samples`` samples in memory: queue depth and the rates of reception, delivery,
deferral and bounces between two samples, worked out from the Prometheus counters so that the
page and a Prometheus server agree. The page (``hamta/static/dashboard.html``) polls
``/api/history``, ``/api/domains`` and ``/api/node`` and draws with uPlot, vendored from the npm
registry into ``hamta/static/`` (MIT licence beside it): nothing is fetched from the network when
the page is shown, which is what an admin endpoint on a private network needs.

A counter that goes down (a worker restarted) gives no rate for that interval rather than a
negative one.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

STATIC_FILES = {
    "uPlot.iife.min.js": "application/javascript",
    "uPlot.min.css": "text/css",
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
    "LICENSE.uPlot": "text/plain",
}
_COUNTERS = {
    ("hamta_messages_received_total", ""): "received",
    ("hamta_deliveries_total", "delivered"): "delivered",
    ("hamta_deliveries_total", "deferred"): "deferred",
    ("hamta_deliveries_total", "bounced"): "bounced",
    ("hamta_deliveries_total", "expired"): "expired",
}
RATES = ("received", "delivered", "deferred", "bounced", "expired")


@dataclass(frozen=True, slots=True)
class Figures:
    """What one look at the node's metrics gives: counter totals and bounce breakdowns."""

    totals: Mapping[str, float]
    bounces_by_class: Mapping[str, float]
    bounces_by_code: Mapping[str, float]


def read_figures(exposition: str) -> Figures:
    """Counter totals and bounces by class and by reply code, from a Prometheus exposition."""
    totals: dict[str, float] = {}
    by_class: dict[str, float] = {}
    by_code: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            key = _COUNTERS.get((sample.name, sample.labels.get("outcome", "")))
            if key is not None:
                totals[key] = totals.get(key, 0.0) + sample.value
            elif sample.name == "hamta_bounces_total":
                name = sample.labels.get("class", "Unknown")
                by_class[name] = by_class.get(name, 0.0) + sample.value
            elif sample.name == "hamta_bounce_replies_total":
                code = sample.labels.get("code", "none")
                by_code[code] = by_code.get(code, 0.0) + sample.value
    return Figures(totals, by_class, by_code)


class History:
    """The last ``size`` samples: wall time, queue depth and rates per second, as columns."""

    def __init__(self, size: int = 720) -> None:
        self.size = size
        self._at: deque[float] = deque(maxlen=size)
        self._depth: deque[int] = deque(maxlen=size)
        self._rates: dict[str, deque[float | None]] = {k: deque(maxlen=size) for k in RATES}
        self._previous: tuple[float, Mapping[str, float]] | None = None
        self.latest: Figures | None = None

    def add(self, at: float, depth: int, figures: Figures) -> None:
        """Record a sample taken at wall time ``at``; rates are against the previous sample."""
        previous, self._previous = self._previous, (at, figures.totals)
        self.latest = figures
        if previous is None or at <= previous[0]:
            return  # the first sample gives no rate; a clock step back gives none either
        elapsed = at - previous[0]
        self._at.append(at)
        self._depth.append(depth)
        for key in RATES:
            delta = figures.totals.get(key, 0.0) - previous[1].get(key, 0.0)
            self._rates[key].append(round(delta / elapsed, 3) if delta >= 0 else None)

    def columns(self) -> dict[str, list[Any]]:
        """The samples as columns (uPlot's data layout): ``t`` in seconds, then the series."""
        data: dict[str, list[Any]] = {"t": list(self._at), "depth": list(self._depth)}
        for key in RATES:
            data[f"{key}_per_s"] = list(self._rates[key])
        return data

    def view(self, interval: float) -> dict[str, Any]:
        """The JSON of ``/api/history``."""
        latest = self.latest or Figures({}, {}, {})
        return {
            "interval_s": interval,
            "samples": len(self._at),
            "max_samples": self.size,
            "series": self.columns(),
            "bounces_by_class": dict(sorted(latest.bounces_by_class.items(), key=_by_count)),
            "bounces_by_code": dict(sorted(latest.bounces_by_code.items(), key=_by_count)),
        }


def _by_count(item: tuple[str, float]) -> tuple[float, str]:
    return (-item[1], item[0])


Summary = Callable[[], Awaitable[dict[str, Any]]]
Exposition = Callable[[], Awaitable[str]]


async def sample_forever(
    history: History,
    summary: Summary,
    exposition: Exposition,
    interval: float,
    wall: Callable[[], float] = time.time,
    log: Any = None,
) -> None:
    """Add a sample every ``interval`` seconds until cancelled; a failed look is skipped."""
    while True:
        try:
            figures = read_figures(await exposition())
            depth = int((await summary()).get("depth") or 0)
            history.add(wall(), depth, figures)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a worker between lives; the next sample tries again
            if log is not None:
                log.warning("DashboardSampleFailed", error=repr(exc))
        await asyncio.sleep(interval)


def _static(name: str) -> bytes:
    return resources.files("hamta").joinpath("static", name).read_bytes()


async def _page(request: web.Request) -> web.Response:
    return web.Response(body=_static("dashboard.html"), content_type="text/html")


async def _asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    headers = {"Cache-Control": "max-age=3600"}
    return web.Response(body=_static(name), content_type=STATIC_FILES[name], headers=headers)


HISTORY_KEY = web.AppKey("dashboard_history", History)
INTERVAL_KEY = web.AppKey("dashboard_interval", float)


async def _history(request: web.Request) -> web.Response:
    history = request.app[HISTORY_KEY]
    return web.json_response(history.view(request.app[INTERVAL_KEY]))


def add_dashboard(
    app: web.Application,
    summary: Summary,
    exposition: Exposition,
    interval: float,
    samples: int,
    log: Any = None,
) -> History:
    """Serve the page, its assets and ``/api/history``; sample while the app runs."""
    if not (math.isfinite(interval) and interval > 0):
        raise ValueError(f"dashboard interval must be > 0, not {interval}")
    history = History(samples)
    app[HISTORY_KEY] = history
    app[INTERVAL_KEY] = interval
    app.router.add_get("/", _page)
    app.router.add_get("/static/{name}", _asset)
    app.router.add_get("/api/history", _history)

    async def sampling(_app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(sample_forever(history, summary, exposition, interval, log=log))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(sampling)
    return history
