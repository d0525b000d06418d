"""Asking the lab's services, from inside a namespace, whether they serve.

Each probe opens its socket inside a given namespace (``netns.socket_in``), so the lab sees a
service exactly as a host of the lab would: the client namespace reaches the virtual IP, the
sink and the DNS server over the bridge, a node namespace reaches its own relay's admin endpoint
on its loopback. A probe answers once, within its timeout; it never raises for a service that
is down, it says so (None, False or an empty list).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import dns.exception
import dns.message
import dns.query
import dns.rcode

from cluster.lab import netns

T = TypeVar("T")


def _connect(namespace: str, host: str, port: int, timeout: float) -> socket.socket | None:
    try:
        sock = netns.socket_in(namespace)
    except netns.NetnsError:
        return None
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except OSError:
        sock.close()
        return None
    return sock


def _read_until(sock: socket.socket, done: Callable[[bytes], bool], limit: int = 65536) -> bytes:
    data = b""
    while not done(data) and len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def tcp_open(namespace: str, host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on ``host:port`` seen from ``namespace``."""
    sock = _connect(namespace, host, port, timeout)
    if sock is None:
        return False
    sock.close()
    return True


def smtp_greeting(namespace: str, host: str, port: int, timeout: float = 2.0) -> str | None:
    """The greeting line of an SMTP server on ``host:port``; None if none answers with 220."""
    sock = _connect(namespace, host, port, timeout)
    if sock is None:
        return None
    with sock:
        try:
            data = _read_until(sock, lambda d: b"\r\n" in d and not d.startswith(b"220-"))
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
        except OSError:
            return None
    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return line if line.startswith("220") else None


def dns_answer(
    namespace: str, server: str, port: int, name: str, rdtype: str, timeout: float = 1.0
) -> list[str]:
    """The records of type ``rdtype`` for ``name`` from the DNS server at ``server:port``."""
    try:
        sock = netns.socket_in(namespace, socket.AF_INET, socket.SOCK_DGRAM)
    except netns.NetnsError:
        return []
    with sock:
        query = dns.message.make_query(name, rdtype)
        try:
            response = dns.query.udp(query, server, timeout=timeout, port=port, sock=sock)
        except (dns.exception.DNSException, OSError):
            return []
    if response.rcode() != dns.rcode.NOERROR:
        return []
    return [item.to_text() for rrset in response.answer for item in rrset]


def zookeeper_mode(namespace: str, host: str, port: int, timeout: float = 1.0) -> str | None:
    """``leader``, ``follower`` or ``standalone`` from the ``srvr`` command; None if not serving."""
    sock = _connect(namespace, host, port, timeout)
    if sock is None:
        return None
    with sock:
        try:
            sock.sendall(b"srvr")
            data = _read_until(sock, lambda d: False)
        except OSError:
            return None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("Mode:"):
            return line.partition(":")[2].strip()
    return None


def http_json(
    namespace: str, host: str, port: int, path: str, timeout: float = 2.0
) -> dict[str, Any] | None:
    """The JSON body of ``GET path`` on ``host:port`` (any status); None if there is none."""
    sock = _connect(namespace, host, port, timeout)
    if sock is None:
        return None
    with sock:
        try:
            request = f"GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            sock.sendall(request.encode())
            data = _read_until(sock, lambda d: False, limit=1 << 20)
        except OSError:
            return None
    _, _, body = data.partition(b"\r\n\r\n")
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def wait_for(
    check: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T | None:
    """Run ``check`` until it returns something truthy or ``timeout`` passes; its last answer.

    Nothing tells the lab when a process in another namespace starts serving, so this asks
    again every ``interval``; each probe itself waits for its answer with a timeout.
    """
    deadline = clock() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        left = deadline - clock()
        if left <= 0:
            return answer
        sleep(min(interval, left))
