"""Admission: how many sessions the relay takes, from whom, and when it asks clients to wait.

Every inbound connection costs a file descriptor and buffers, and every accepted message costs
memory until it is delivered. Without limits, 1,100 idle connections from anywhere exhausted the
1,024 descriptors a default service gets (clients then failed with broken pipes and the health
endpoint was reset), and a flood grew the queue to 24k messages and the process to 729 MB.

* :class:`ConnectionLimits`: at most ``max_connections`` sessions at once, and at most
  ``max_connections_per_client`` from one address outside the relay networks (relay clients,
  application servers sending through many connections, are trusted like Postfix's mynetworks).
  Beyond them a connection gets 421 4.7.0 and is closed (``hamta.smtp``). The last tenth of
  ``max_connections`` is kept for relay clients.
* :class:`Pressure`: MAIL gets 452 4.3.1 while the spool holds ``max_queued_messages`` or the
  process's resident memory is above ``max_memory``; the client keeps its mail and retries.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

REPLY_TOO_MANY = "421 4.7.0 Too many connections, try again later"
REPLY_TOO_MANY_FROM_CLIENT = "421 4.7.0 Too many connections from your address, try again later"
REPLY_BUSY = "452 4.3.1 Insufficient system resources, try again later"

_PAGE = os.sysconf("SC_PAGE_SIZE")


class ConnectionLimits:
    """Counts of open sessions, in total and per client address outside the relay networks."""

    def __init__(
        self, max_connections: int, per_client: int, is_relay_client: Callable[[str], bool]
    ) -> None:
        self.max_connections = max_connections
        # Clients outside the relay networks never take the last tenth of the sessions: a
        # flood from many addresses still leaves room for the relay's own clients.
        self.reserved = max_connections // 10
        self.per_client = per_client
        self._is_relay_client = is_relay_client
        self.open = 0
        self._by_client: dict[str, int] = {}  # outside the relay networks only

    def admit(self, client: str) -> str | None:
        """Count a new session in and return None, or return the limit it is over."""
        if self.open >= self.max_connections:
            return "max_connections"
        if not self._is_relay_client(client):
            if self.open >= self.max_connections - self.reserved:
                return "max_connections"
            count = self._by_client.get(client, 0)
            if count >= self.per_client:
                return "max_connections_per_client"
            self._by_client[client] = count + 1
        self.open += 1
        return None

    def release(self, client: str) -> None:
        """An admitted session ended."""
        self.open -= 1
        count = self._by_client.get(client)
        if count is not None:
            if count <= 1:
                del self._by_client[client]
            else:
                self._by_client[client] = count - 1


def resident_bytes() -> int:
    """The process's resident memory (RSS) now, from /proc/self/statm."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


class Pressure:
    """Whether the relay should take no new mail for now: queue or memory over their limits."""

    def __init__(
        self,
        max_queued: int,
        max_memory: int,
        queued: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_queued = max_queued
        self.max_memory = max_memory
        self._queued = queued
        self._clock = clock
        self._rss = (0.0, 0)  # when read, bytes: once a second is plenty under a flood

    def rss(self) -> int:
        """The resident memory, read at most once a second."""
        now = self._clock()
        if now - self._rss[0] >= 1.0:
            self._rss = (now, resident_bytes())
        return self._rss[1]

    def check(self) -> tuple[str, int, int] | None:
        """None, or the resource over its limit with its value and limit."""
        queued = self._queued()
        if queued >= self.max_queued:
            return "queue", queued, self.max_queued
        if self.max_memory:
            rss = self.rss()
            if rss > self.max_memory:
                return "memory", rss, self.max_memory
        return None


def raise_descriptor_limit(needed: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``needed`` as far as the hard limit allows.

    Returns the soft limit before and after. systemd gives services 1,024 soft (for programs
    still using select()) under a hard limit of 524,288; hamta uses epoll and may take more.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft, soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]
