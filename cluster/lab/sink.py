"""The lab's "internet" mail server: accepts everything and records each delivered recipient.

Run as ``python -m cluster.lab.sink --listen 198.18.0.41:25 --record FILE``. Every recipient of
every message accepted appends one JSON line to FILE, flushed at once so that a reader in another
process (the lab, a chaos check) sees it as soon as the relay got its 250::

    {"at": 1764090000.123, "mail_from": "...", "rcpt": "...", "message_id": "<...>",
     "x_lab_id": "...", "size": 1234}

``x_lab_id`` is the message's ``X-Lab-Id`` header (null without one): the lab's client stamps a
unique one on each message it sends, so lost and duplicated mail can be counted exactly.

With ``--mailbox DIR --mailbox-domain DOMAIN`` it is also the probe mailbox of the monitors'
round-trip check: a message for ``LOCAL@DOMAIN`` is written whole as one file in ``DIR/LOCAL/``
(written under ``DIR/.tmp`` and renamed, so a reader never sees half of it) and not recorded:
the record counts the lab's own mail only, which the chaos checker compares with what was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import IO, Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from hamta.config import parse_hostport

ACCEPTED = "250 2.0.0 Ok: delivered"


def delivery_lines(
    envelope: Envelope, content: bytes, at: float, peer: str = "", ehlo: str = ""
) -> list[dict[str, Any]]:
    """The record lines of one accepted message, one per recipient, with the address it came
    from and the name its sender gave in EHLO (the relay's egress source)."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(content, headersonly=True)
    mail_from = envelope.mail_from or ""
    if mail_from == "<>":
        mail_from = ""
    return [
        {
            "at": round(at, 6),
            "mail_from": mail_from,
            "rcpt": rcpt,
            "message_id": _header(headers.get("Message-ID")),
            "x_lab_id": _header(headers.get("X-Lab-Id")),
            "size": len(content),
            "peer": peer,
            "ehlo": ehlo,
        }
        for rcpt in envelope.rcpt_tos
    ]


def _header(value: Any) -> str | None:
    return None if value is None else str(value).strip()


class ProbeMailbox:
    """The probe mailbox: one file a message and recipient, in a folder per local part."""

    def __init__(self, directory: Path, domain: str) -> None:
        self.directory = directory
        self.domain = domain.lower()
        self._count = itertools.count()

    def takes(self, rcpt: str) -> bool:
        local, _, domain = rcpt.rpartition("@")
        return bool(local) and domain.lower() == self.domain

    def store(self, rcpt: str, content: bytes) -> None:
        local = rcpt.rpartition("@")[0].lower()
        if not local or "/" in local or local.startswith("."):
            return  # not a name a folder can have: dropped, as a mailbox would refuse it
        folder = self.directory / local
        scratch = self.directory / ".tmp"
        folder.mkdir(parents=True, exist_ok=True)
        scratch.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}.{os.getpid()}.{next(self._count)}.eml"
        (scratch / name).write_bytes(content)
        os.replace(scratch / name, folder / name)


class RecordingHandler:
    """aiosmtpd hooks: accept every message and append its recipients to the record (those of
    the probe mailbox's domain, when there is one, go to the mailbox instead)."""

    def __init__(
        self,
        record: IO[str],
        clock: Callable[[], float] = time.time,
        mailbox: ProbeMailbox | None = None,
    ) -> None:
        self._record = record
        self._clock = clock
        self._mailbox = mailbox
        self.delivered = 0

    async def handle_DATA(  # noqa: N802 - the hook name aiosmtpd looks up
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        content = envelope.original_content or b""
        mailbox = self._mailbox
        peer = str(session.peer[0]) if isinstance(session.peer, tuple) else ""
        lines = delivery_lines(envelope, content, self._clock(), peer, session.host_name or "")
        for line in lines:
            if mailbox is not None and mailbox.takes(line["rcpt"]):
                mailbox.store(line["rcpt"], content)
                continue
            self._record.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._record.flush()
        self.delivered += 1
        return ACCEPTED


async def serve(
    host: str,
    port: int,
    record: Path,
    hostname: str,
    mailbox: ProbeMailbox | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; with ``tls``, STARTTLS is offered (not required)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    record.parent.mkdir(parents=True, exist_ok=True)
    with record.open("a", encoding="utf-8") as out:
        handler = RecordingHandler(out, mailbox=mailbox)

        def factory() -> SMTP:
            # An explicit hostname also keeps aiosmtpd from asking DNS for this host's FQDN.
            return SMTP(
                handler,
                hostname=hostname,
                decode_data=False,
                enable_SMTPUTF8=True,
                tls_context=tls,
                require_starttls=False,
            )

        server = await loop.create_server(factory, host, port, reuse_address=True)
        print(f"sink: listening on {host}:{port}, recording to {record}", flush=True)
        try:
            await stop.wait()
        finally:
            server.close()
            await server.wait_closed()
        print(f"sink: stopped after {handler.delivered} messages", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m cluster.lab.sink``."""
    parser = argparse.ArgumentParser(prog="python -m cluster.lab.sink", description=__doc__)
    parser.add_argument("--listen", required=True, help="ADDR:PORT to accept mail on")
    parser.add_argument("--record", required=True, type=Path, help="JSON lines file to append to")
    parser.add_argument("--hostname", default="mx.lab.test", help="name in the greeting")
    parser.add_argument("--mailbox", type=Path, help="the probe mailbox's directory")
    parser.add_argument("--mailbox-domain", help="the domain whose mail goes to --mailbox")
    parser.add_argument("--tls-cert", type=Path, help="certificate chain (PEM): offer STARTTLS")
    parser.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    args = parser.parse_args(argv)
    if (args.mailbox is None) != (args.mailbox_domain is None):
        parser.error("--mailbox and --mailbox-domain go together")
    mailbox = ProbeMailbox(args.mailbox, args.mailbox_domain) if args.mailbox else None
    tls = None
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_cert is not None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            tls.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            parser.error(f"cannot load {args.tls_cert}: {exc}")
    try:
        host, port = parse_hostport(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(serve(host, port, args.record, args.hostname, mailbox, tls))
    except OSError as exc:
        print(f"sink: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
