"""The local control socket of a relay: activate a warm standby, deactivate, ask its state.

Also the operator's hand on one destination: ``destination`` suspends, resumes or retries it
(``hamta queue suspend|resume|retry DOMAIN``), in every worker of the node.

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
import socket
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from hamta.relay import Relay, RelayError, RelayState
from hamta.suppression import control_command as suppression_command
from hamta.suspensions import SuspensionError, write_suspended
from hamta.unix_paths import check_socket_path


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
    if command == "domains":
        return {"ok": True, "snapshot": relay.domain_snapshot()}
    if command == "stop":
        stop.set()
        return {"ok": True}
    if command == "destination":
        return await _destination(relay, request)
    if command in ("suppression-list", "suppression-add", "suppression-remove"):
        # One list for the node (at the spool's root, in SQLite): worker 0's answer is all.
        if relay.state is not RelayState.ACTIVE or relay.suppressions is None:
            raise RelayError(f"relay is {relay.state.value}: no suppression list open")
        return {"ok": True, **(await suppression_command(relay.suppressions, request))}
    raise RelayError(f"unknown command {command!r}")


_DESTINATION_ACTIONS = ("suspend", "resume", "retry")


async def _destination(relay: Relay, request: dict[str, Any]) -> dict[str, Any]:
    """Suspend, resume or retry one destination, in this relay and (worker 0) every worker."""
    action, name = request.get("action"), request.get("destination")
    if action not in _DESTINATION_ACTIONS:
        raise RelayError(f"action must be one of {', '.join(_DESTINATION_ACTIONS)}, not {action!r}")
    if not isinstance(name, str) or not name.strip():
        raise RelayError("destination must be a domain or a destination key")
    queue, spool = relay.queue, relay.spool
    if queue is None or spool is None:
        raise RelayError(f"relay is {relay.state.value}: no queue to act on")
    if relay.fenced is not None:
        raise RelayError(f"relay is fenced: {relay.fenced}")
    key = queue.destination_key(name)
    moved = 0
    if action == "retry":
        moved = queue.retry_destination(key)
    else:
        destination = queue.suspend(key) if action == "suspend" else queue.resume(key)
        # On the spool volume, so that the hold follows the mail through a failover.
        try:
            await asyncio.to_thread(write_suspended, spool.path, set(queue.suspended))
        except SuspensionError as exc:
            raise RelayError(f"{action} {key}: {exc}") from None
        relay.log.info(
            "DestinationSuspended" if action == "suspend" else "DestinationResumed",
            destination=key,
            queued=len(destination.ready),
        )
    workers = [{"worker": relay.worker, "moved": moved}]
    if relay.pool is not None:
        for index, reply in enumerate(await relay.pool.broadcast(request), start=1):
            workers.append({"worker": index, "moved": int(reply.get("moved", 0))})
    return {
        "ok": True,
        "action": action,
        "destination": key,
        "moved": sum(int(w["moved"]) for w in workers),
        "workers": workers,
    }


def bind_control(path: Path) -> socket.socket:
    """The control socket at ``path``, bound (mode 0600) but not yet listening.

    ``hamta serve`` binds it before it gives up root (hamta.privileges), so that the socket
    stays root's: the agent, root without CAP_DAC_OVERRIDE under its unit, may connect to it.
    Until ``start_control`` listens, a connection is refused, as if it did not exist yet.
    A path too long for a unix socket is refused (SocketPathError) before anything is touched.
    """
    check_socket_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by a relay that was killed
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


async def start_control(relay: Relay, sock: socket.socket, stop: asyncio.Event) -> asyncio.Server:
    """Listen on the bound unix socket ``sock``; ``stop`` is set by the ``stop`` command."""

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

    return await asyncio.start_unix_server(serve, sock=sock)
