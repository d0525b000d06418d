"""Which relay networks make an open relay: a network that covers a large part of the internet.

``smtp.relay_networks`` lists the clients that may relay; a typo such as ``0.0.0.0/0`` (or a
``/4`` meant as a ``/24``) would let the whole internet send spam through the relay, which gets
its addresses blocklisted within hours. Such a network is refused unless the configuration says
``smtp.allow_open_relay = true``. Private networks (``10.0.0.0/8``, ``fc00::/7``) stay allowed:
nobody on the internet sends from them.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import Final

#: An IPv4 network shorter than this prefix covers a 128th or more of the address space.
IPV4_MIN_PREFIX: Final = 8
#: IPv6 networks shorter than this cover a 8,192th or more of the global unicast space (2000::/3).
IPV6_MIN_PREFIX: Final = 16

_PRIVATE_V6: Final = (IPv6Network("fc00::/7"), IPv6Network("fe80::/10"))
# IPv6 prefixes in which a client's IPv4 address is embedded at (first bit, prefix length): a
# /96 of them covers the whole IPv4 internet (IPv4-mapped, RFC 6052 NAT64, RFC 3056 6to4).
_EMBEDDING_V4: Final = (
    (IPv6Network("::ffff:0:0/96"), 96),
    (IPv6Network("64:ff9b::/96"), 96),
    (IPv6Network("2002::/16"), 16),
)


def _open(network: IPv4Network | IPv6Network) -> bool:
    if isinstance(network, IPv4Network):
        return network.prefixlen < IPV4_MIN_PREFIX
    for embedding, start in _EMBEDDING_V4:
        if network.subnet_of(embedding):
            return network.prefixlen - start < IPV4_MIN_PREFIX
    if any(network.subnet_of(private) for private in _PRIVATE_V6):
        return False
    return network.prefixlen < IPV6_MIN_PREFIX


def open_networks(
    networks: list[IPv4Network | IPv6Network],
) -> list[IPv4Network | IPv6Network]:
    """The networks of ``networks`` that would make an open relay, in their order."""
    return [network for network in networks if _open(network)]
