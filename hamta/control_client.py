"""The client side of a relay's control socket: one JSON request, one JSON reply."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any


class ControlError(Exception):
    """The control socket could not be reached or the relay refused the command."""


def send_command(path: Path, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one command to a relay's control socket and return its reply."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise ControlError(f"no relay control socket at {path}") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror or exc}") from None
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError(f"{path}: unreadable reply {data[:200]!r}") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "refused")))
    return reply
