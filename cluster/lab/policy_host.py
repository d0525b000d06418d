"""The lab's MTA-STS policy host: HTTPS serving ``/.well-known/mta-sts.txt`` per domain.

Run as ``python -m cluster.lab.policy_host --listen ADDR:443 --cert C --key K --policies DIR``.
A request for ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` gets ``DIR/<domain>.txt``
as ``text/plain`` (RFC 8461 3.3); anything else is a 404. One line per request on stdout.
"""

from __future__ import annotations

import argparse
import http.server
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from hamta.config import parse_hostport

WELL_KNOWN = "/.well-known/mta-sts.txt"


def policy_for(policies: Path, host: str, path: str) -> bytes | None:
    """The policy a request asks for, or None (not a policy request, or no such domain)."""
    name = host.split(":", maxsplit=1)[0].lower()
    if path != WELL_KNOWN or not name.startswith("mta-sts."):
        return None
    domain = name.removeprefix("mta-sts.")
    if not domain or "/" in domain or domain.startswith("."):
        return None
    try:
        return (policies / f"{domain}.txt").read_bytes()
    except OSError:
        return None


def serve(host: str, port: int, cert: Path, key: Path, policies: Path) -> None:
    """Serve until killed."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = policy_for(policies, self.headers.get("Host") or "", self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            print(f"policy_host: {self.address_string()} {format % args}", flush=True)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"policy_host: listening on {host}:{port}, policies in {policies}", flush=True)
    server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cluster.lab.policy_host``."""
    parser = argparse.ArgumentParser(prog="python -m cluster.lab.policy_host", description=__doc__)
    parser.add_argument("--listen", required=True, help="ADDR:PORT to serve HTTPS on")
    parser.add_argument("--cert", required=True, type=Path)
    parser.add_argument("--key", required=True, type=Path)
    parser.add_argument("--policies", required=True, type=Path, help="<domain>.txt files")
    args = parser.parse_args(argv)
    try:
        host, port = parse_hostport(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        serve(host, port, args.cert, args.key, args.policies)
    except (OSError, ssl.SSLError) as exc:
        print(f"policy_host: cannot serve on {args.listen}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
