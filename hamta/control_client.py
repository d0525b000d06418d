"""The client side of a relay's control socket: one JSON request, one JSON reply.

The one client of the socket for everybody: the command line and the tests (``send_command``),
worker 0 fanning a command out to its workers and the cluster agent driving its relay
(``request``, on their event loop). A time limit covers the whole exchange, connection included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

# A reply is one line read whole: a suppression list or a worker's metrics run to megabytes,
# far past asyncio's 64 KiB default for a line.
_REPLY_LIMIT = 1 << 30


class ControlError(Exception):
    """The control socket could not be reached or the relay refused the command."""


async def request(path: Path, command: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Send ``command`` to the relay's control socket at ``path``; its reply, or ControlError."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=_REPLY_LIMIT)
            try:
                writer.write(json.dumps(command).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        raise ControlError(f"{command['command']}: no reply within {timeout:g}s") from None
    except FileNotFoundError:
        raise ControlError(f"no relay control socket at {path}") from None
    except ConnectionRefusedError:
        raise ControlError(f"no relay listens on {path}") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    try:
        reply: dict[str, Any] = json.loads(line)
    except ValueError:
        raise ControlError(f"{path}: unreadable reply {line[:200]!r}") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "refused")))
    return reply


def send_command(path: Path, command: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """``request`` for a caller with no event loop of its own (the command line)."""
    return asyncio.run(request(path, command, timeout))
