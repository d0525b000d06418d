"""A receiving MX for tests that records every delivered message exactly.

Postfix's smtp-sink only counts, and undercounts when a client reuses connections, so the
relay's delivery tests assert against this aiosmtpd server instead. It runs in its own thread
(through :class:`aiosmtpd.controller.Controller`), so synchronous test code can wait on it.

Failures are scripted through the recipient's local part: ``reject*`` gets ``550 5.1.1``,
``defer*`` gets ``451 4.3.0``, ``full*`` gets ``552 5.2.2`` and ``slow*`` is accepted after
``slow_seconds``. ``data_reply`` replaces the 250 after DATA (e.g. ``"451 4.7.1 throttled"``).
With ``pipelining`` it offers PIPELINING (RFC 2920; aiosmtpd reads commands one after another
from its stream, so it serves pipelined clients as it is) and counts its reads (``reads``).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from .ports import free_port
from .started import Started

__all__ = ["Delivered", "RecordingSink", "free_port"]

REJECT_REPLY = "550 5.1.1 No such user"
DEFER_REPLY = "451 4.3.0 Try again later"
FULL_REPLY = "552 5.2.2 Mailbox full"
ACCEPT_REPLY = "250 2.1.5 OK"
QUEUED_REPLY = "250 2.0.0 OK: queued"


@dataclass(frozen=True, slots=True)
class Delivered:
    """One message the sink accepted: envelope, exact bytes after DATA, and how it came."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    #: The message as received: CRLF line ends, dot-stuffing undone, final "." removed.
    data: bytes
    #: The client's ``host:port`` (``[v6]:port`` for IPv6).
    peer: str
    #: Whether the message came over a STARTTLS-protected session.
    tls: bool
    #: The name the client gave in EHLO (or HELO).
    ehlo: str = ""

    @property
    def peer_host(self) -> str:
        """The client's address without the port, e.g. to check a relay's source address."""
        return self.peer.rpartition(":")[0].strip("[]")


def _format_peer(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = str(peername[0]), int(peername[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peername)


class _Handler:
    """aiosmtpd handler hooks; runs in the controller's event-loop thread."""

    def __init__(self, sink: RecordingSink) -> None:
        self._sink = sink

    async def handle_RCPT(  # noqa: N802 - the hook name aiosmtpd looks up
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        local = address.rpartition("@")[0].strip('"').lower() if "@" in address else address
        if local.startswith("reject"):
            return REJECT_REPLY
        if local.startswith("defer"):
            return DEFER_REPLY
        if local.startswith("full"):
            return FULL_REPLY
        if local.startswith("slow") and self._sink.slow_seconds > 0:
            # Simulated latency of a slow MX, not synchronisation with anything.
            await asyncio.sleep(self._sink.slow_seconds)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return ACCEPT_REPLY

    async def handle_EHLO(  # noqa: N802 - the hook name aiosmtpd looks up
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self._sink.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_DATA(  # noqa: N802 - the hook name aiosmtpd looks up
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        if self._sink.data_reply is not None:
            return self._sink.data_reply
        self._sink._record(
            Delivered(
                mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=envelope.original_content or b"",
                peer=_format_peer(session.peer),
                tls=session.ssl is not None,
                ehlo=session.host_name or "",
            )
        )
        return QUEUED_REPLY


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP protocol that reports each new TCP connection to the sink."""

    def __init__(self, sink: RecordingSink, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self.raw_transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # aiosmtpd calls connection_made again on the same connection after a STARTTLS
        # handshake, with the TLS transport; only the plain first call is a new connection.
        if transport.get_extra_info("ssl_object") is None:
            self.raw_transport = transport
            self._sink._live.add(self)
            self._sink._connected(transport.get_extra_info("peername"))
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._sink.reads += 1
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        self._sink._live.discard(self)
        super().connection_lost(error)


class _SinkController(Controller):
    """Controller on a socket bound beforehand, whose start-up probe is not counted."""

    def __init__(self, sink: RecordingSink, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(sink._handler, hostname=sink.host, port=sink.port, **kwargs)
        self._sink = sink
        self._sock = sock

    def factory(self) -> SMTP:
        return _CountingSMTP(self._sink, self._sink._handler, **self.SMTP_kwargs)

    def _create_server(self) -> Any:
        # Binding ourselves makes port 0 work without a race; the server closes the socket.
        return self.loop.create_server(self._factory_invoker, sock=self._sock)

    def _trigger_server(self) -> None:
        # Controller.start() connects once to make aiosmtpd build its protocol object. Bind
        # that probe's source address first so the sink knows its peer before the server
        # sees it, and can leave it out of the connection count.
        family = self._sock.family
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(self.ready_timeout)
            probe.bind((self._sink.host, 0))
            self._sink._ignore_peer = probe.getsockname()[:2]
            probe.connect((self._sink.host, self._sink.port))
            probe.recv(1024)


class RecordingSink(Started):
    """An SMTP server on ``host:port`` that records each accepted message as :class:`Delivered`.

    ``port=0`` picks a free port at the first :meth:`start`; a restart keeps the port, so a test
    can take an MX down and bring it back. With ``tls_cert``/``tls_key`` it offers STARTTLS.
    All public methods are safe to call from any thread.
    """

    def __init__(
        self,
        host: str = "127.0.0.5",
        port: int = 0,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        *,
        slow_seconds: float = 0.0,
        data_reply: str | None = None,
        server_hostname: str = "recording-sink.test",
        ready_timeout: float = 5.0,
        smtputf8: bool = True,
        pipelining: bool = False,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        self.host = host
        self.port = port
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.slow_seconds = slow_seconds
        self.data_reply = data_reply
        self.server_hostname = server_hostname
        self.ready_timeout = ready_timeout
        # False: a next hop without RFC 6531, as many still are (refuses non-ASCII arguments).
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        # Reads of client data (data_received calls): how many segments the clients' bytes took.
        self.reads = 0
        self._handler = _Handler(self)
        self._cond = threading.Condition()
        self._messages: list[Delivered] = []
        self._connections = 0
        self._ignore_peer: tuple[str, int] | None = None
        self._controller: _SinkController | None = None
        # Open connections; touched only in the server thread.
        self._live: set[_CountingSMTP] = set()

    # -- called from the server thread ------------------------------------------------------

    def _connected(self, peername: Any) -> None:
        with self._cond:
            if self._ignore_peer is not None and tuple(peername[:2]) == self._ignore_peer:
                # Controller.start()'s probe; forget it so a later client that happens to
                # get the same source port is counted.
                self._ignore_peer = None
                return
            self._connections += 1
            self._cond.notify_all()

    def _record(self, message: Delivered) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    # -- public API -------------------------------------------------------------------------

    @property
    def messages(self) -> list[Delivered]:
        """A snapshot (a new list) of the messages accepted so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    @property
    def count(self) -> int:
        """Number of messages accepted so far."""
        with self._cond:
            return len(self._messages)

    @property
    def connections(self) -> int:
        """Number of SMTP connections clients opened (a STARTTLS upgrade is not a new one)."""
        with self._cond:
            return self._connections

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` messages were accepted; False if ``timeout`` ran out."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._messages) >= count, timeout)

    def wait_for_connections(self, count: int, timeout: float) -> bool:
        """Block until at least ``count`` connections were seen; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._connections >= count, timeout)

    def take(self) -> list[Delivered]:
        """The messages accepted since the last call, then forgotten (a long run stays small).

        :attr:`count` and :meth:`wait_for` count only what has not been taken.
        """
        with self._cond:
            taken, self._messages = self._messages, []
            return taken

    def clear(self) -> None:
        """Forget recorded messages and reset the connection count."""
        with self._cond:
            self._messages.clear()
            self._connections = 0

    @property
    def running(self) -> bool:
        """Whether the server is listening."""
        return self._controller is not None

    def _tls_context(self) -> ssl.SSLContext | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def start(self) -> None:
        """Bind, start the server thread and return once it accepts connections."""
        if self._controller is not None:
            raise RuntimeError("RecordingSink already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Lets a restarted sink take its port back while old connections sit in TIME_WAIT.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        tls_context = self._tls_context()
        # Each start needs a new controller: a stopped one has closed its event loop.
        controller = _SinkController(
            self,
            sock,
            ready_timeout=self.ready_timeout,
            # An explicit name also keeps aiosmtpd from calling socket.getfqdn() (a DNS query).
            server_hostname=self.server_hostname,
            tls_context=tls_context,
            require_starttls=False,
            decode_data=False,
            enable_SMTPUTF8=self.smtputf8,
        )
        try:
            controller.start()
        except BaseException:
            controller.stop(no_assert=True)
            sock.close()
            raise
        self._controller = controller

    def stop(self) -> None:
        """Stop listening and drop every open connection, as a crashed MX would."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        try:
            # Controller.stop() cancels the session tasks but leaves their sockets open, so a
            # client would keep talking to a stopped sink; close them in the server thread.
            asyncio.run_coroutine_threadsafe(self._drop_connections(), controller.loop).result(
                timeout=self.ready_timeout
            )
        finally:
            controller.stop()

    async def _drop_connections(self) -> None:
        for protocol in list(self._live):
            if protocol.raw_transport is not None:
                protocol.raw_transport.close()
