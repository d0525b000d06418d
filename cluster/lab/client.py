"""The lab's mail client: sends numbered messages over SMTP and reports what each got.

Run inside the client's namespace as ``python -m cluster.lab.client --to 198.18.0.100:25
--count 100``; it prints one JSON object (a :class:`SendResult`). Every message carries a unique
``X-Lab-Id`` header, which the sink records on delivery, so a test compares ``ids_acked`` (the
relay said 250: it owns the message) with what arrived: an acknowledged id that never arrives
is lost mail, one that arrives twice is a duplicate.

Each message is tried once. A refused message (any SMTP reply but 250) is counted by its code;
a message that got no reply at all (connection refused, reset, timed out) is an error, and the
next message opens a new connection, so that a run spanning a failover keeps going.
"""

from __future__ import annotations

import argparse
import json
import secrets
import smtplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Final

from cluster.lab.results import ERROR_SAMPLES, SendResult
from hamta.config import parse_hostport

SENDER: Final = "lab@client.lab.test"
_COMMAND_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Login:
    """Submission instead of relaying: TLS (465's from the first byte, else STARTTLS), AUTH."""

    user: str
    password: str
    implicit_tls: bool


def _connect(host: str, port: int, login: Login | None, timeout: float) -> smtplib.SMTP:
    if login is None:
        connection = smtplib.SMTP(host, port, local_hostname="client.lab.test", timeout=timeout)
        connection.ehlo()
        return connection
    # The lab's certificate is its own, self-signed: encrypted, not verified.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if login.implicit_tls:
        connection = smtplib.SMTP_SSL(
            host, port, local_hostname="client.lab.test", timeout=timeout, context=context
        )
    else:
        connection = smtplib.SMTP(host, port, local_hostname="client.lab.test", timeout=timeout)
        connection.starttls(context=context)
    try:
        connection.ehlo()
        connection.login(login.user, login.password)
    except BaseException:
        connection.close()
        raise
    return connection


def make_message(lab_id: str, rcpt: str, size: int) -> bytes:
    """A message of about ``size`` bytes (headers included) with ``lab_id`` in X-Lab-Id."""
    headers = (
        f"From: <{SENDER}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: lab message {lab_id}\r\n"
        f"Date: {formatdate(localtime=False)}\r\n"
        f"Message-ID: <{lab_id}@client.lab.test>\r\n"
        f"X-Lab-Id: {lab_id}\r\n"
        "\r\n"
    ).encode()
    filler = max(size - len(headers), 2)
    line = b"x" * 76 + b"\r\n"
    lines, rest = divmod(filler, len(line))
    body = line * lines + (b"y" * max(rest - 2, 0) + b"\r\n" if rest else b"")
    return headers + body


class _Run:
    """One run's shared state: the message numbers still to send and the tally."""

    def __init__(self, count: int, deadline: float, clock: Callable[[], float]) -> None:
        self._numbers: Iterator[int] = iter(range(count))
        self._lock = threading.Lock()
        self._deadline = deadline
        self._clock = clock
        self.result = SendResult()

    def next_number(self) -> int | None:
        with self._lock:
            if self._clock() >= self._deadline:
                return None
            number = next(self._numbers, None)
            if number is not None:
                self.result.sent += 1
            return number

    def acked(self, lab_id: str) -> None:
        with self._lock:
            self.result.acked += 1
            self.result.ids_acked.append(lab_id)

    def refused(self, code: int) -> None:
        with self._lock:
            self.result.refused[code] = self.result.refused.get(code, 0) + 1

    def error(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.result.errors += 1
            samples = self.result.error_samples
            if len(samples) < ERROR_SAMPLES and text not in samples:
                samples.append(text)


def _close(connection: smtplib.SMTP | None) -> None:
    if connection is None:
        return
    try:
        connection.quit()
    except (smtplib.SMTPException, OSError):
        connection.close()


def _sender(
    run: _Run,
    host: str,
    port: int,
    run_id: str,
    size: int,
    domain: str,
    timeout: float,
    login: Login | None,
    sender: str,
) -> None:
    connection: smtplib.SMTP | None = None
    try:
        while (number := run.next_number()) is not None:
            lab_id = f"{run_id}-{number}"
            rcpt = f"user{number}@{domain}"
            try:
                if connection is None:
                    connection = _connect(host, port, login, timeout)
                connection.sendmail(sender, [rcpt], make_message(lab_id, rcpt, size))
                run.acked(lab_id)
            except smtplib.SMTPRecipientsRefused as exc:
                code = int(exc.recipients[rcpt][0])
                run.refused(code)
                if code == 421:
                    _close(connection)
                    connection = None
            except smtplib.SMTPResponseException as exc:  # sender refused, DATA refused, ...
                run.refused(int(exc.smtp_code))
                if exc.smtp_code == 421:
                    _close(connection)
                    connection = None
            except (smtplib.SMTPException, OSError) as exc:
                run.error(exc)
                if connection is not None:
                    connection.close()
                connection = None
    finally:
        _close(connection)


def send(
    host: str,
    port: int,
    count: int,
    *,
    size: int = 1024,
    domain: str = "a.lab.test",
    timeout: float = 30.0,
    connections: int = 1,
    run_id: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    login: Login | None = None,
    sender: str = SENDER,
) -> SendResult:
    """Send ``count`` messages to ``host:port`` over up to ``connections`` sessions at once.

    No message is started after ``timeout`` seconds; each SMTP command waits at most 10 s.
    """
    run_id = run_id or secrets.token_hex(6)
    started = clock()
    run = _Run(count, started + timeout, clock)
    command_timeout = min(timeout, _COMMAND_TIMEOUT)
    workers = [
        threading.Thread(
            target=_sender,
            args=(run, host, port, run_id, size, domain, command_timeout, login, sender),
            name=f"lab-client-{index}",
            daemon=True,
        )
        for index in range(max(1, min(connections, count)))
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    run.result.seconds = clock() - started
    return run.result


def command(
    python: str,
    to: str,
    count: int,
    *,
    size: int = 1024,
    domain: str = "a.lab.test",
    timeout: float = 30.0,
    connections: int = 1,
    submission: Sequence[str] = (),
) -> list[str]:
    """The command line of this client, sending ``count`` messages to ``to`` (ADDR:PORT).

    ``submission``: the arguments of a submission run (see :func:`main`: --account, ...).
    """
    return [
        python,
        "-m",
        "cluster.lab.client",
        "--to",
        to,
        "--count",
        str(count),
        "--size",
        str(size),
        "--domain",
        domain,
        "--timeout",
        str(timeout),
        "--connections",
        str(connections),
        *submission,
    ]


def outcome(done: subprocess.CompletedProcess[str]) -> SendResult:
    """The SendResult a finished run of this client printed; ValueError if it printed none."""
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ValueError(done.stderr.strip() or f"exit status {done.returncode}")
    try:
        return SendResult.from_json(json.loads(lines[-1]))
    except KeyError as exc:
        raise ValueError(f"no {exc} in the client's answer") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cluster.lab.client``; prints a JSON SendResult."""
    parser = argparse.ArgumentParser(prog="python -m cluster.lab.client", description=__doc__)
    parser.add_argument("--to", required=True, help="ADDR:PORT of the relay")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024, help="bytes per message")
    parser.add_argument("--domain", default="a.lab.test", help="recipient domain")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole run")
    parser.add_argument("--connections", type=int, default=1, help="sessions in parallel")
    parser.add_argument("--run-id", default=None, help="prefix of the X-Lab-Id values")
    parser.add_argument("--account", help="submit with this JSON account (user, password)")
    parser.add_argument("--implicit-tls", action="store_true", help="TLS at connect (465)")
    parser.add_argument("--password", help="instead of the account's (to see a refusal)")
    parser.add_argument("--sender", default=SENDER, help="the envelope sender")
    args = parser.parse_args(argv)
    login = None
    if args.account:
        try:
            account = json.loads(Path(args.account).read_text())
            login = Login(account["user"], args.password or account["password"], args.implicit_tls)
        except (OSError, ValueError, KeyError) as exc:
            parser.error(f"cannot read the account {args.account}: {exc}")
    try:
        host, port = parse_hostport(args.to)
    except ValueError as exc:
        parser.error(str(exc))
    if args.count < 0 or args.size <= 0 or args.connections <= 0:
        parser.error("--count, --size and --connections must be positive")
    result = send(
        host,
        port,
        args.count,
        size=args.size,
        domain=args.domain,
        timeout=args.timeout,
        connections=args.connections,
        run_id=args.run_id,
        login=login,
        sender=args.sender,
    )
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
