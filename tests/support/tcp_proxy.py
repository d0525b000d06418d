"""A TCP relay on loopback whose link the test can cut: a network partition between two ends.

Used to take a ZooKeeper client away from its server while the server keeps running, so that
the server expires the client's session on its own clock, as it would in a real partition.
While severed, every relayed connection is closed and new ones are accepted and dropped.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

_ACCEPT_POLL = 0.1  # how often the accept loop checks whether it should end


class TcpProxy:
    """Relays a free loopback port to ``upstream``, except between ``sever()`` and ``restore()``."""

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(_ACCEPT_POLL)
        self.address: tuple[str, int] = (host, self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._severed = False
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._start(self._accept_loop)

    @property
    def hosts(self) -> str:
        """``host:port`` of the relay, as a ZooKeeper connection string."""
        return f"{self.address[0]}:{self.address[1]}"

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                severed = self._severed
            if severed:
                downstream.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=2.0)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets.update((downstream, upstream))
            self._start(self._pump, downstream, upstream)
            self._start(self._pump, upstream, downstream)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass  # cut by sever() or by either end
        finally:
            self._drop(source, sink)

    def _drop(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):  # already shut down by the other pump
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with self._lock:
                self._sockets.discard(sock)

    def sever(self) -> None:
        """Cut every relayed connection and refuse new ones until ``restore()``."""
        with self._lock:
            self._severed = True
            open_sockets = list(self._sockets)
        self._drop(*open_sockets)

    def restore(self) -> None:
        """Relay new connections again."""
        with self._lock:
            self._severed = False

    def close(self) -> None:
        """Stop relaying and free the port."""
        self.sever()
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=2.0)
        self._listener.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
