"""A continuous mail load with a history: every attempt, its outcome and its times.

Run inside the lab's client namespace as ``python -m cluster.lab.load --to VIP:25 --history
FILE``; it sends until SIGTERM (or ``--duration``), one message per attempt at ``--rate``
attempts per second over ``--connections`` sessions, and appends one JSON line per attempt:

    {"id": "...", "start": t0, "end": t1, "outcome": "acked"|"refused"|"unknown", "code": 250,
     "detail": "..."}

Times are ``time.monotonic()``, the system-wide CLOCK_MONOTONIC, so they compare with the
faults a test or a benchmark injects from another process on the same host. "unknown" means
the connection was lost after DATA was sent: the message may or may not have been taken. A
session that fails is dropped and the next attempt opens a new one, so a run spans failovers.
Checking the history against the sink's record is :mod:`cluster.lab.history`'s job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import smtplib
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from cluster.lab.client import SENDER, make_message
from hamta.config import parse_hostport

_CONNECT_TIMEOUT = 1.0
_COMMAND_TIMEOUT = 5.0


class _Writer:
    """Appends history lines from several threads, flushing each one."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()


def _attempt(
    session: smtplib.SMTP | None, host: str, port: int, lab_id: str, rcpt: str, size: int
) -> tuple[smtplib.SMTP | None, str, int, str]:
    """Send one message; the session to keep (or None), outcome, code and detail."""
    data_sent = False
    try:
        if session is None:
            session = smtplib.SMTP(timeout=_CONNECT_TIMEOUT)
            session.connect(host, port)
            session.sock.settimeout(_COMMAND_TIMEOUT)  # type: ignore[union-attr]
            code, reply = session.ehlo("load.lab.test")
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
        code, reply = session.mail(SENDER)
        if code != 250:
            raise smtplib.SMTPResponseException(code, reply)
        code, reply = session.rcpt(rcpt)
        if code not in (250, 251):
            raise smtplib.SMTPResponseException(code, reply)
        data_sent = True
        code, reply = session.data(make_message(lab_id, rcpt, size))
        if code != 250:
            session.rset()
            return session, "refused", code, reply.decode(errors="replace")[:120]
        return session, "acked", 250, ""
    except smtplib.SMTPResponseException as exc:
        _close(session)
        error = exc.smtp_error
        detail = (error.decode(errors="replace") if isinstance(error, bytes) else error)[:120]
        return None, "refused", exc.smtp_code, detail
    except (OSError, smtplib.SMTPException) as exc:
        _close(session)
        outcome = "unknown" if data_sent else "refused"
        return None, outcome, 0, f"{type(exc).__name__}: {exc}"[:120]


def _close(session: smtplib.SMTP | None) -> None:
    if session is None:
        return
    with contextlib.suppress(OSError):
        session.close()


def run(
    to: str,
    history: IO[str],
    *,
    rate: float,
    connections: int,
    duration: float | None,
    domain: str,
    size: int,
    stop: threading.Event,
    run_id: str | None = None,
) -> None:
    """Send until ``stop`` is set (or ``duration`` passes), writing one line per attempt."""
    host, port = parse_hostport(to, 25)
    writer = _Writer(history)
    run_id = run_id or secrets.token_hex(3)
    interval = connections / rate
    ends = time.monotonic() + duration if duration else None
    counter = iter(range(10**12))
    counter_lock = threading.Lock()

    def sender(index: int) -> None:
        session: smtplib.SMTP | None = None
        next_at = time.monotonic() + index * interval / connections
        while not stop.is_set() and (ends is None or time.monotonic() < ends):
            # Paced, not synchronised: waiting for the next slot or for the stop.
            if stop.wait(max(0.0, next_at - time.monotonic())):
                break
            next_at += interval
            with counter_lock:
                number = next(counter)
            lab_id = f"{run_id}-{number:07d}"
            start = time.monotonic()
            session, outcome, code, detail = _attempt(
                session, host, port, lab_id, f"load{number % 50}@{domain}", size
            )
            record = {"id": lab_id, "start": start, "end": time.monotonic(), "outcome": outcome}
            record["code"] = code
            if detail:
                record["detail"] = detail
            writer.write(record)
        if session is not None:
            try:
                session.quit()
            except (OSError, smtplib.SMTPException):
                _close(session)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cluster.lab.load``."""
    parser = argparse.ArgumentParser(prog="python -m cluster.lab.load", description=__doc__)
    parser.add_argument("--to", required=True, help="ADDR:PORT of the relay (the virtual IP)")
    parser.add_argument("--history", type=Path, required=True, help="JSON lines, appended")
    parser.add_argument("--rate", type=float, default=20.0, help="attempts per second")
    parser.add_argument("--connections", type=int, default=2, help="sessions in parallel")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds (default: until SIGTERM)"
    )
    parser.add_argument("--domain", default="a.lab.test")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--run-id", help="prefix of the X-Lab-Id values (default: random)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    socket.setdefaulttimeout(_COMMAND_TIMEOUT)
    with open(args.history, "a", encoding="utf-8") as history:
        run(
            args.to,
            history,
            rate=args.rate,
            connections=args.connections,
            duration=args.duration,
            domain=args.domain,
            size=args.size,
            stop=stop,
            run_id=args.run_id,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
