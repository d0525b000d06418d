"""The virtual IP and the egress addresses move together, in real network namespaces.

Three namespaces (prefix ``he``, subnet 198.19.190.0/24) on one bridge: ``peer`` (.2) plays the
internet's next hop, ``first`` (.1) and ``second`` (.3) are the pair. After a move, the peer
maps every address to the new node's MAC (gratuitous ARP), and a connection opened from an
egress address on the new node reaches the peer from that address.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from cluster.vip import VipError, VipSet, VirtualIp, moving_addresses
from tests.test_vip import addresses, ip, mac_of, neighbour_mac, socket_in

VIP = "198.19.190.100/24"
EGRESS = ["198.19.190.101", "198.19.190.102"]
IFACE = "he0"


@dataclass(frozen=True)
class Pair:
    first: str
    second: str
    peer: str

    def addresses_of(self, node: str) -> VirtualIp | VipSet | None:
        return moving_addresses(VIP, IFACE, EGRESS, netns=node)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    tag = secrets.token_hex(2)
    pair = Pair(first=f"he-{tag}-a", second=f"he-{tag}-c", peer=f"he-{tag}-b")
    created: list[str] = []
    try:
        for ns in (pair.peer, pair.first, pair.second):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", pair.peer, "link", "add", "hebr", "type", "bridge")
        ip("-n", pair.peer, "addr", "add", "198.19.190.2/24", "dev", "hebr")
        ip("-n", pair.peer, "link", "set", "hebr", "up")
        for ns, port, address in (
            (pair.first, "hep-a", "198.19.190.1/24"),
            (pair.second, "hep-c", "198.19.190.3/24"),
        ):
            ip("-n", ns, "link", "add", IFACE, "type", "veth", "peer", "name", port)
            ip("-n", ns, "link", "set", port, "netns", pair.peer)
            ip("-n", pair.peer, "link", "set", port, "master", "hebr", "up")
            ip("-n", ns, "addr", "add", address, "dev", IFACE)
            ip("-n", ns, "link", "set", IFACE, "up")
        yield pair
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


def source_seen_by_peer(pair: Pair, node: str, source: str) -> str:
    """Connect from ``source`` on ``node`` to the peer; return the address the peer saw."""
    with socket_in(pair.peer, socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("198.19.190.2", 0))
        listener.listen(1)
        listener.settimeout(3)
        with socket_in(node, socket.AF_INET, socket.SOCK_STREAM) as client:
            client.settimeout(3)
            client.bind((source, 0))
            client.connect(listener.getsockname())
            accepted, (seen, _) = listener.accept()
            accepted.close()
    return str(seen)


def test_the_vip_and_egress_addresses_move_together(pair: Pair) -> None:
    first, second = pair.addresses_of(pair.first), pair.addresses_of(pair.second)
    assert isinstance(first, VipSet) and isinstance(second, VipSet)
    wanted = {"198.19.190.100", *EGRESS}
    first.add()
    assert wanted <= set(addresses(pair.first, IFACE)) and first.held()
    for address in EGRESS:
        assert source_seen_by_peer(pair, pair.first, address) == address
    # Demotion first, then the peer node takes them all.
    first.remove()
    assert not first.held() and not wanted & set(addresses(pair.first, IFACE))
    second.add()
    assert wanted <= set(addresses(pair.second, IFACE))
    mac = mac_of(pair.second, IFACE)
    # The peer learnt the first node's MAC for the egress addresses (it answered them); the
    # announcements replaced it (Linux updates, but never creates, entries from them).
    for address in EGRESS:
        assert neighbour_mac(pair.peer, address) == mac, address
    for address in EGRESS:
        assert source_seen_by_peer(pair, pair.second, address) == address
    second.remove()
    assert not second.held()


def test_one_failing_member_does_not_stop_the_others_removal(pair: Pair) -> None:
    good = VirtualIp(EGRESS[0], IFACE, netns=pair.first)
    broken = VirtualIp(EGRESS[1], "nosuchif", netns=pair.first)
    group = VipSet([broken, good])
    good.add()
    with pytest.raises(VipError, match="nosuchif"):
        group.add()
    group.remove()  # a missing interface holds nothing: no error, and the good one is gone
    assert not good.held()


def test_nothing_to_move_and_one_address_alone() -> None:
    assert moving_addresses("", IFACE, []) is None
    assert isinstance(moving_addresses(VIP, IFACE, []), VirtualIp)
    assert isinstance(moving_addresses("", IFACE, EGRESS[:1]), VirtualIp)
    with pytest.raises(VipError, match="IPv6"):
        moving_addresses(VIP, IFACE, ["2001:db8::1"])
