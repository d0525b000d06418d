"""What the admin endpoint answers, and to whom: security headers and the ``Host`` check.

The endpoint has no authentication: it listens on loopback (or a management address) and tells
anybody who can reach it the queue, the domains and the metrics. A web page in an operator's
browser could still reach it by DNS rebinding: its own name, resolved a second time to
127.0.0.1, makes the browser send the page's requests to the relay as if they were same-origin.
What gives that away is the ``Host`` header, which carries the page's name. So only these names
are answered: the listen address, ``localhost``, the names in ``admin.allowed_hosts``, and, when
the endpoint listens on every address (``0.0.0.0`` / ``::``), any IP literal (a rebinding needs
a name). The port is not checked: an SSH tunnel changes it, and the name alone tells a rebinding.
Anything else gets ``421 Misdirected Request`` with a short text.

Every answer carries headers that keep the dashboard to its own files and out of frames.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from aiohttp import web

from hamta.config import parse_hostport

#: The dashboard loads its own script, styles and JSON, nothing else; no inline code at all.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
_WILDCARDS: Final = frozenset({"0.0.0.0", "::", ""})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _name(host: str) -> str:
    return host.strip().strip("[]").lower().rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Which ``Host`` headers the endpoint listening on ``listen`` answers."""

    def __init__(self, listen: str, allowed_hosts: Iterable[str]) -> None:
        listen_host, _ = parse_hostport(listen)
        self.any_ip = _name(listen_host) in _WILDCARDS
        self.names = frozenset(
            {_name(listen_host), "localhost", *(_name(host) for host in allowed_hosts)}
        )

    def allows(self, header: str | None) -> bool:
        """Whether a request with this ``Host`` header (None: none) is answered."""
        if header is None:
            return True  # HTTP/1.0 tools; a browser always sends one
        try:
            host, _ = parse_hostport(header, default_port=80)
        except ValueError:
            return False
        name = _name(host)
        return name in self.names or (self.any_ip and _is_ip(name))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp middleware: 421 for a ``Host`` this endpoint does not answer."""
        header = request.headers.get("Host")
        if not self.allows(header):
            return web.Response(
                status=421,
                text=f"hamta admin: Host {header!r} is not answered here; "
                "add the name to admin.allowed_hosts\n",
            )
        return await handler(request)


async def add_security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp ``on_response_prepare`` hook: the headers on every answer, errors included."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def guard(app: web.Application, listen: str, allowed_hosts: Iterable[str]) -> None:
    """Install the ``Host`` check and the security headers on ``app``."""
    app.middlewares.append(HostCheck(listen, allowed_hosts).middleware)
    app.on_response_prepare.append(add_security_headers)
