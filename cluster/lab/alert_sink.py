"""The lab's alert receiver: the webhook the lab's monitors notify, on the internet host.

Run as ``python -m cluster.lab.alert_sink --listen 198.18.0.41:8099 --record FILE``. Every POST
of a JSON object appends one line to FILE, flushed at once so that a reader in another process
(``hamta lab status``, the chaos harness) sees it as soon as the monitor got its 200::

    {"received": 1764090000.123, "location": "inet", "event": "trigger", "check": "node1-smtp",
     "incident": 3, "severity": "critical", "state": "down", "opened": ..., ...}

``location`` is the request's path (each monitor's webhook URL ends with its location: the
notification itself names only the monitor's host, the same for every namespace of the lab);
the rest is the monitor's webhook body (docs/monitor.md, "Notifiers"). Anything else is
answered 400 and recorded nowhere.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from hamta.config import parse_hostport

MAX_BODY = 1 << 20  # a notification is a few hundred bytes


def record_line(body: bytes, path: str, received: float) -> dict[str, Any] | None:
    """The record of one POST, None when it is not a JSON object from a named location."""
    location = path.strip("/")
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not location or "/" in location:
        return None
    return {"received": round(received, 6), "location": location, **data}


def read_record(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a JSON lines record, in order (a line being written is skipped):
    the alert receiver's, and the sink's (cluster.lab.inspection)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


def handler_for(record: IO[str], lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                self.send_error(400, "a JSON body, at most 1 MiB")
                return
            line = record_line(self.rfile.read(length), self.path, time.time())
            if line is None:
                self.send_error(400, "a JSON object, POSTed to /LOCATION")
                return
            with lock:
                record.write(json.dumps(line, separators=(",", ":")) + "\n")
                record.flush()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the record is the log

    return Handler


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cluster.lab.alert_sink``: serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m cluster.lab.alert_sink", description=__doc__)
    parser.add_argument("--listen", required=True, help="ADDR:PORT to accept webhooks on")
    parser.add_argument("--record", required=True, type=Path, help="JSON lines file to append to")
    args = parser.parse_args(argv)
    try:
        host, port = parse_hostport(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    args.record.parent.mkdir(parents=True, exist_ok=True)
    with args.record.open("a", encoding="utf-8") as record:
        try:
            server = ThreadingHTTPServer((host, port), handler_for(record, threading.Lock()))
        except OSError as exc:
            print(f"alert_sink: cannot listen on {args.listen}: {exc.strerror}", file=sys.stderr)
            return 1
        # serve_forever in a thread: the main thread waits for the signal, then shuts it down.
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        print(f"alert_sink: listening on {args.listen}, recording to {args.record}", flush=True)
        stop.wait()
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
