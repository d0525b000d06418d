"""The local control socket of a relay: activate a warm standby, deactivate, ask its state.

One JSON object a line each way, over a unix socket created with mode 0600, so that only root
(the agent) may drive it. Activation answers when the relay is listening and its queue is
recovered, with the timings, which the agent records as a step of its promotion.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from hamta.relay import Relay, RelayError


async def _handle(relay: Relay, request: dict[str, Any], stop: asyncio.Event) -> dict[str, Any]:
    command = request.get("command")
    if command == "status":
        return {"ok": True, "pid": os.getpid(), **(await relay.node_summary())}
    if command == "activate":
        if stop.is_set():
            # An activation racing a SIGTERM would take the spool lock in a dying process.
            raise RelayError("relay is stopping")
        spool = request.get("spool")
        epoch, token = request.get("epoch"), request.get("token")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise RelayError(f"epoch must be an integer, not {epoch!r}")
        activation = await relay.activate(
            Path(spool) if spool else None, epoch=epoch, token=Path(token) if token else None
        )
        return {"ok": True, **dataclasses.asdict(activation)}
    if command == "deactivate":
        await relay.deactivate(float(request.get("timeout", relay.config.node.stop_timeout)))
        return {"ok": True, "state": relay.state.value}
    if command == "metrics":
        return {"ok": True, "text": generate_latest(relay.metrics.registry).decode()}
    if command == "stop":
        stop.set()
        return {"ok": True}
    raise RelayError(f"unknown command {command!r}")


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a relay that was killed


async def start_control(relay: Relay, path: Path, stop: asyncio.Event) -> asyncio.Server:
    """Listen on the unix socket at ``path``; ``stop`` is set by the ``stop`` command."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("request must be a JSON object")
                reply = await _handle(relay, request, stop)
            except (ValueError, RelayError) as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # the relay is back in standby; say why to the caller
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    _prepare_socket_path(path)
    old_umask = os.umask(0o177)
    try:
        return await asyncio.start_unix_server(serve, path=str(path))
    finally:
        os.umask(old_umask)
