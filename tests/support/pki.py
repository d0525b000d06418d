"""A test certificate authority (openssl) and an HTTPS server with its certificate.

MTA-STS (RFC 8461) fetches policies over HTTPS with a certificate that verifies, and its
``enforce`` mode needs MX certificates valid for the MX names: :class:`TestCa` issues both, and
the relay trusts it through ``[tls_policy] ca_file``. :class:`HttpsServer` serves fixed bodies
by Host header (the standard library's server, in a thread), as a policy host does.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from cluster.lab.tls_site import issue, make_ca


class TestCa:
    """A CA in ``dir``: ``ca.crt`` and leaf certificates it signs (cluster.lab.tls_site's)."""

    __test__ = False  # not a pytest class

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.cert, self.key = make_ca(dir, "hamta test CA")

    def issue(self, name: str, dns_names: Sequence[str]) -> tuple[Path, Path, Path]:
        """A leaf for ``dns_names``: ``(cert, key, chain)``, the chain being leaf then CA."""
        return issue(self.dir, name, dns_names)


class HttpsServer:
    """HTTPS on ``host:port``: ``pages`` maps (Host, path) to (status, content type, body)."""

    def __init__(
        self,
        host: str,
        port: int,
        cert: Path,
        key: Path,
        pages: Mapping[tuple[str, str], tuple[int, str, str]],
    ) -> None:
        self.host, self.port = host, port
        self.pages = dict(pages)
        self.requests: list[tuple[str, str]] = []
        # POSTs: (Host, path, Content-Type, body); answered 200.
        self.posts: list[tuple[str, str, str, bytes]] = []
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").split(":")[0]
                owner.requests.append((host, self.path))
                status, ctype, body = owner.pages.get((host, self.path), (404, "text/plain", ""))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                host = (self.headers.get("Host") or "").split(":")[0]
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.posts.append((host, self.path, self.headers.get("Content-Type", ""), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
