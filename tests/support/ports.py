"""Free loopback ports for test servers."""

from __future__ import annotations

import ipaddress
import socket

# Tries before giving up on finding a port that is free for both TCP and UDP.
_ATTEMPTS = 50


def free_port(host: str = "127.0.0.1", *, udp: bool = False) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now.

    With ``udp=True`` the same port number is also free for UDP (DNS serves both). The port is
    only free at the time of the call, so servers that bind it later may lose a race and should
    retry; it is also how a test gets a "dead MX": an address and port with nothing behind it.
    """
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    for _ in range(_ATTEMPTS):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            if not udp:
                return port
            with socket.socket(family, socket.SOCK_DGRAM) as dgram:
                try:
                    dgram.bind((host, port))
                except OSError:
                    continue
                return port
    raise OSError(f"no port free for both TCP and UDP on {host}")


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` now (a server started)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True
