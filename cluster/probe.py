"""Prove that a relay is serving: a real SMTP dialogue that sends no mail.

The probe reads the 220 banner, says EHLO (expects 250), NOOP (expects 250) and QUIT. A relay
that accepted a TCP connection but cannot take mail (still starting, stopping with 421, its
spool unwritable and refusing with 4xx) fails the probe, which a port check would not notice.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Final

# A reply of more lines than this is not an SMTP server talking (EHLO lists a dozen or so).
_MAX_REPLY_LINES: Final = 100
_QUIT_GRACE: Final = 1.0


@dataclass(frozen=True)
class ProbeResult:
    """How the probe went: ``detail`` is the banner on success, else what went wrong."""

    ok: bool
    seconds: float
    detail: str


class _UnexpectedReplyError(Exception):
    """The server answered something other than what the probe expects."""


async def smtp_probe(
    host: str, port: int, *, timeout: float = 5.0, helo: str = "hamta-probe"
) -> ProbeResult:
    """Talk SMTP to ``host:port`` (banner, EHLO, NOOP, QUIT) within ``timeout`` seconds in all.

    Never raises for what the server does: a refusal, an unexpected reply ("EHLO: 421 4.3.2
    ..."), a closed connection or the time limit ("no banner within 5s") give ``ok=False``.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    stage = "connect"
    writer: asyncio.StreamWriter | None = None

    def result(ok: bool, detail: str) -> ProbeResult:
        return ProbeResult(ok, round(loop.time() - started, 6), detail)

    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            stage = "banner"
            banner = await _expect(reader, "220", "banner")
            for stage, command in (("EHLO", f"EHLO {helo}"), ("NOOP", "NOOP")):
                writer.write(command.encode("ascii") + b"\r\n")
                await writer.drain()
                await _expect(reader, "250", stage)
            stage = "QUIT"
        # Serving is proven; a server slow to say goodbye does not make it unhealthy.
        writer.write(b"QUIT\r\n")
        with contextlib.suppress(OSError, TimeoutError, EOFError, _UnexpectedReplyError):
            async with asyncio.timeout(_QUIT_GRACE):
                await writer.drain()
                await _read_reply(reader, "QUIT")
        return result(True, banner)
    except TimeoutError:
        if stage == "connect":
            return result(False, f"no connection within {timeout:g}s")
        if stage == "banner":
            return result(False, f"no banner within {timeout:g}s")
        return result(False, f"no reply to {stage} within {timeout:g}s")
    except ConnectionRefusedError:
        return result(False, "connection refused")
    except _UnexpectedReplyError as exc:
        return result(False, str(exc))
    except EOFError:
        return result(False, f"connection closed by the server before the {stage} reply")
    except OSError as exc:
        return result(False, f"{stage}: {exc.strerror or exc}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(_QUIT_GRACE):
                    await writer.wait_closed()


async def _read_reply(reader: asyncio.StreamReader, stage: str) -> tuple[str, str]:
    """One reply, possibly multi-line: (code, first line). EOFError if the server hangs up."""
    first = ""
    for _ in range(_MAX_REPLY_LINES):
        try:
            raw = await reader.readline()
        except ValueError as exc:  # a line beyond the stream's limit
            raise _UnexpectedReplyError(f"{stage}: reply line too long") from exc
        if not raw.endswith(b"\n"):
            raise EOFError
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        code = line[:3]
        if not (code.isdigit() and len(line) >= 3 and line[3:4] in ("", " ", "-")):
            raise _UnexpectedReplyError(f"{stage}: not an SMTP reply: {line[:80]!r}")
        first = first or line
        if line[3:4] != "-":
            return code, first
    raise _UnexpectedReplyError(f"{stage}: reply longer than {_MAX_REPLY_LINES} lines")


async def _expect(reader: asyncio.StreamReader, wanted: str, stage: str) -> str:
    code, first = await _read_reply(reader, stage)
    if code != wanted:
        raise _UnexpectedReplyError(f"{stage}: {first}")
    return first
