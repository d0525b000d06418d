"""How often one client may send to the report addresses: a token bucket per client address.

The complaints and bounces addresses take mail from anyone; without a limit, one client could
make the relay parse and keep reports as fast as it can send them (71 MB of junk in quarantine/
in 2.3 s). Each client address gets ``per_minute`` reports a minute, in bursts of as many; beyond,
RCPT to a report address gets a 450 and the client may come back later. Clients in the
configured complaint networks (the feedback loops) are not limited. The table of clients is
capped, oldest first out, so a spray of addresses cannot grow it without bound.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

REPLY_REPORT_RATE = "450 4.7.1 Too many reports from your address, try again later"
MAX_CLIENTS = 10000

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientRate:
    """Token buckets per client address; ``allow`` takes one token (False: none left)."""

    def __init__(self, per_minute: float, exempt: Iterable[Network] = ()) -> None:
        self.per_minute = per_minute
        self._burst = max(1.0, float(per_minute))  # a share below 1 a minute still sends one
        self.exempt = tuple(exempt)
        # client -> (tokens, when last counted), least recently seen first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _exempt(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.exempt)

    def allow(self, client: str, now: float) -> bool:
        """May ``client`` send one more report at ``now`` (monotonic seconds)?"""
        if self._exempt(client):
            return True
        tokens, last = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self.per_minute / 60.0)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return allowed
