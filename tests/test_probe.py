"""The SMTP probe against a real relay, a dead port, a silent listener and refusing servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiosmtpd.smtp import SMTP, Session

from cluster.probe import ProbeResult, smtp_probe
from hamta.smtp_replies import REPLY_SHUTTING_DOWN
from tests.conftest import RelayFactory
from tests.support import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def probe_server(handler: Handler, *, timeout: float = 5.0) -> ProbeResult:
    """Probe a loopback server running ``handler`` for each connection."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await smtp_probe("127.0.0.1", port, timeout=timeout)
    finally:
        server.close()
        await server.wait_closed()


def scripted(replies: dict[str, bytes], banner: bytes, heard: list[str]) -> Handler:
    """A server that sends ``banner``, then answers each command verb from ``replies``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        while line := (await reader.readline()).decode().rstrip("\r\n"):
            heard.append(line)
            verb = line.split(" ")[0].upper()
            writer.write(replies.get(verb, b"502 5.5.1 unexpected\r\n"))
            await writer.drain()
            if verb == "QUIT":
                break
        writer.close()

    return handle


def test_a_serving_relay_passes(make_relay: RelayFactory) -> None:
    relay = make_relay()
    result = asyncio.run(smtp_probe(relay.host, relay.port, timeout=5))
    assert result.ok, result.detail
    assert result.detail.startswith("220 ")
    assert 0 < result.seconds < 5
    assert relay.events("Reception") == []


def test_the_dialogue_is_banner_ehlo_noop_quit_and_nothing_else() -> None:
    heard: list[str] = []
    replies = {
        "EHLO": b"250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
        "NOOP": b"250 2.0.0 OK\r\n",
        "QUIT": b"221 2.0.0 Bye\r\n",
    }
    result = asyncio.run(probe_server(scripted(replies, b"220 mx.test ESMTP\r\n", heard)))
    assert result == ProbeResult(True, result.seconds, "220 mx.test ESMTP")
    assert heard == ["EHLO hamta-probe", "NOOP", "QUIT"]


def test_a_port_nobody_listens_on_is_refused() -> None:
    result = asyncio.run(smtp_probe("127.0.0.1", free_port(), timeout=2))
    assert not result.ok
    assert result.detail == "connection refused"


def test_a_listener_that_never_sends_a_banner_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the probe hangs up
        writer.close()

    started = time.monotonic()
    result = asyncio.run(probe_server(silent, timeout=0.5))
    elapsed = time.monotonic() - started
    assert not result.ok
    assert result.detail == "no banner within 0.5s"
    assert 0.5 <= elapsed < 1.5, elapsed


def test_a_stopping_relay_banner_fails_the_probe() -> None:
    heard: list[str] = []
    banner = (REPLY_SHUTTING_DOWN + "\r\n").encode()
    result = asyncio.run(probe_server(scripted({}, banner, heard)))
    assert not result.ok
    assert result.detail == f"banner: {REPLY_SHUTTING_DOWN}"
    assert heard == []


def test_an_smtp_server_answering_421_to_ehlo_fails_the_probe() -> None:
    class Stopping:
        async def handle_EHLO(  # noqa: N802 - aiosmtpd finds its hooks by this name
            self,
            server: SMTP,
            session: Session,
            envelope: object,
            hostname: str,
            responses: list[str],
        ) -> list[str]:
            return ["421 4.3.2 Service shutting down, try again later"]

    async def main() -> ProbeResult:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Stopping()), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await smtp_probe("127.0.0.1", port, timeout=5)
        finally:
            server.close()
            await server.wait_closed()

    result = asyncio.run(main())
    assert not result.ok
    assert result.detail == "EHLO: 421 4.3.2 Service shutting down, try again later"


def test_a_failed_noop_a_hang_up_and_a_non_smtp_server_fail_the_probe() -> None:
    heard: list[str] = []
    replies = {"EHLO": b"250 mx.test\r\n", "NOOP": b"451 4.3.0 spool not writable\r\n"}
    result = asyncio.run(probe_server(scripted(replies, b"220 mx.test\r\n", heard)))
    assert (result.ok, result.detail) == (False, "NOOP: 451 4.3.0 spool not writable")

    result = asyncio.run(probe_server(scripted({}, b"220 mx.test\r\n", [])))
    assert (result.ok, result.detail) == (False, "EHLO: 502 5.5.1 unexpected")

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mx.test\r\n")
        await reader.readline()
        writer.close()

    result = asyncio.run(probe_server(hang_up))
    assert not result.ok
    assert result.detail == "connection closed by the server before the EHLO reply"

    result = asyncio.run(probe_server(scripted({}, b"HTTP/1.1 400 Bad Request\r\n", [])))
    assert not result.ok
    assert result.detail == "banner: not an SMTP reply: 'HTTP/1.1 400 Bad Request'"
