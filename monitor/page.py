"""The status page at ``/`` of the monitor: its HTML, CSS and JS (``monitor/static/``) and
uPlot, read from hamta's vendored copy (``hamta/static/``, MIT licence beside it) rather than a
second copy: nothing is fetched from the network when the page is shown.

The page draws only what the JSON API gives (``/api/checks``, ``/api/uptime``,
``/api/checks/NAME/history``, ``/api/incidents`` and ``/api/incidents/ID`` for the timelines,
``/api/maintenance``, and ``/api/cluster`` once a monitor serves it); the security headers and
the ``Host`` check are the API's (``hamta.admin_guard``): a Content-Security-Policy of
``'self'`` only, no inline code.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

#: name -> (package that holds it, content type)
STATIC_FILES = {
    "status.js": ("monitor", "application/javascript"),
    "status.css": ("monitor", "text/css"),
    "uPlot.iife.min.js": ("hamta", "application/javascript"),
    "uPlot.min.css": ("hamta", "text/css"),
    "LICENSE.uPlot": ("hamta", "text/plain"),
}


def _read(package: str, name: str) -> bytes:
    return resources.files(package).joinpath("static", name).read_bytes()


async def _page(_request: web.Request) -> web.Response:
    return web.Response(body=_read("monitor", "status.html"), content_type="text/html")


async def _asset(request: web.Request) -> web.Response:
    entry = STATIC_FILES.get(request.match_info["name"])
    if entry is None:
        raise web.HTTPNotFound()
    package, content_type = entry
    body = _read(package, request.match_info["name"])
    return web.Response(
        body=body, content_type=content_type, headers={"Cache-Control": "max-age=3600"}
    )


def add_status_page(app: web.Application) -> None:
    app.router.add_get("/", _page)
    app.router.add_get("/static/{name}", _asset)
