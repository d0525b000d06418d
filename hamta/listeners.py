"""The SMTP listening sockets: bound once at start (while privileged), listening only when active.

A relay gives up root before it parses a client byte (hamta.privileges), yet it listens on port
25, and on the virtual IP, which only arrives on the node at activation. So ``hamta serve`` binds
every ``smtp.listen`` address at start, with IP_FREEBIND so that an address not (yet) on the node
can be bound, and hands the bound sockets to the relay. Bound is not listening: a standby relay's
sockets refuse connections. Activation calls listen(2) (through asyncio), deactivation stops it
with shutdown(SHUT_RD), which on Linux takes a listening socket back to closed while it keeps
its address and port (the way HAProxy pauses a listener), ready for the next activation.

Worker 0 binds one set per worker (SO_REUSEPORT, so the kernel spreads connections across
workers as before) and passes each worker its set at exec; it keeps them, so that a worker it
restarts gets the same sockets back without any privilege.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Sequence

from hamta.config import parse_hostport

# Linux's values; Python 3.11's socket module does not name them.
_IP_FREEBIND = 15
_IPV6_FREEBIND = 78


class ListenerError(Exception):
    """An SMTP address cannot be bound."""


def bind(listen: Sequence[str], *, reuse_port: bool) -> list[socket.socket]:
    """One bound, non-listening TCP socket per address each ``host:port`` resolves to."""
    sockets: list[socket.socket] = []
    try:
        for item in listen:
            host, port = parse_hostport(item)
            try:
                infos = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            except socket.gaierror as exc:
                raise ListenerError(f"cannot resolve {item}: {exc.strerror}") from None
            for family, kind, proto, _, address in dict.fromkeys(
                (i[0], i[1], i[2], i[3], i[4]) for i in infos
            ):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    # As asyncio does: an IPv6 socket takes no IPv4 traffic from the v4 one.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_FREEBIND, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
                sock.setblocking(False)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise ListenerError(f"cannot listen on {item}: {exc.strerror}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _resolve(item: str) -> list[tuple[str, int]]:
    host, port = parse_hostport(item)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenerError(f"cannot resolve {item}: {exc.strerror}") from None
    return [(str(info[4][0]), int(info[4][1])) for info in infos]


def listener_index(sock: socket.socket, listen: Sequence[str]) -> int:
    """Which of the ``listen`` addresses ``sock`` was bound for (its listener's role).

    Found from the socket's own address, as :func:`bind` resolved it: a worker is handed bare
    file descriptors at exec, and the address is what tells a 587 socket from a 25 one.
    """
    name = sock.getsockname()
    bound = (str(name[0]), int(name[1]))
    for index, item in enumerate(listen):
        if bound in _resolve(item):
            return index
    raise ListenerError(f"socket {bound} matches no smtp listener ({', '.join(listen)})")


def adopt(fds: Sequence[int]) -> list[socket.socket]:
    """The sockets a worker was handed at exec, by file descriptor."""
    sockets = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def unlisten(sock: socket.socket) -> None:
    """Stop ``sock`` listening (pending connections are reset); it keeps its address."""
    try:
        sock.shutdown(socket.SHUT_RD)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:  # never listened, or already stopped
            raise


def close_all(sockets: Sequence[socket.socket]) -> None:
    """Close every socket (at exit)."""
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.close()
