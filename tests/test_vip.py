"""The virtual IP in real network namespaces: added, reachable, announced, moved, removed.

The lab: three namespaces on one bridge. ``peer`` holds the bridge (198.19.250.2) and plays the
neighbours and switches; ``first`` (198.19.250.1) and ``second`` (198.19.250.3) are the two
nodes the virtual IP 198.19.250.100 moves between. The second node's interface has a 15-character
name, so that its address goes without the ``:hamta`` label.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pyroute2 import netns as pyroute2_netns

from cluster.vip import VipError, VirtualIp, garp_frames

VIP = "198.19.250.100"
VIP_CIDR = f"{VIP}/24"
FIRST_IF = "hv0"
SECOND_IF = "hvt-fifteen-chr"  # 15 characters: "<name>:hamta" would not fit
BRIDGE = "hvbr"
ETH_P_ARP = 0x0806


def ip(*args: str) -> str:
    """Run ``ip`` and return its output; fail the test with its error."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
    return done.stdout


def mac_of(ns: str, interface: str) -> str:
    """The MAC address of ``interface`` in ``ns``."""
    data = json.loads(ip("-n", ns, "-j", "link", "show", interface))
    address: str = data[0]["address"]
    return address


def addresses(ns: str, interface: str) -> dict[str, str]:
    """IPv4 address -> label on ``interface`` in ``ns``."""
    data = json.loads(ip("-n", ns, "-j", "-4", "addr", "show", "dev", interface))
    return {entry["local"]: entry.get("label", "") for entry in data[0]["addr_info"]}


def neighbour_mac(ns: str, address: str) -> str | None:
    """The MAC that ``ns`` has in its neighbour table for ``address``, if any."""
    data = json.loads(ip("-n", ns, "-j", "neigh", "show", address))
    for entry in data:
        if "lladdr" in entry:
            mac: str = entry["lladdr"]
            return mac
    return None


def socket_in(ns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket opened inside ``ns`` (pyroute2's helper, never creating the namespace)."""
    sock: socket.socket = pyroute2_netns.create_socket(ns, family, kind, proto, flags=0)
    return sock


@dataclass(frozen=True)
class Lab:
    """Names of the namespaces the test built."""

    first: str
    second: str
    peer: str

    def vip(self, node: str, interface: str, **kwargs: object) -> VirtualIp:
        return VirtualIp(VIP_CIDR, interface, netns=node, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def lab() -> Iterator[Lab]:
    """Three fresh namespaces on a bridge; all removed at the end, whatever happened."""
    tag = secrets.token_hex(3)
    lab = Lab(first=f"hvt-{tag}-a", second=f"hvt-{tag}-c", peer=f"hvt-{tag}-b")
    created: list[str] = []
    try:
        for ns in (lab.peer, lab.first, lab.second):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", lab.peer, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", lab.peer, "addr", "add", "198.19.250.2/24", "dev", BRIDGE)
        ip("-n", lab.peer, "link", "set", BRIDGE, "up")
        for ns, interface, port, address in (
            (lab.first, FIRST_IF, "hvp-a", "198.19.250.1/24"),
            (lab.second, SECOND_IF, "hvp-c", "198.19.250.3/24"),
        ):
            ip(
                "-n",
                ns,
                "link",
                "add",
                interface,
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                lab.peer,
            )
            ip("-n", lab.peer, "link", "set", port, "master", BRIDGE, "up")
            ip("-n", ns, "addr", "add", address, "dev", interface)
            ip("-n", ns, "link", "set", interface, "up")
        yield lab
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=10)


def reach(lab: Lab, node: str) -> str:
    """Connect from the peer to the virtual IP's port on ``node``; return whom it reached."""
    with socket_in(node, socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((VIP, 2525))
        listener.listen(1)
        listener.settimeout(3)
        with socket_in(lab.peer, socket.AF_INET, socket.SOCK_STREAM) as client:
            client.settimeout(3)
            client.connect((VIP, 2525))
            accepted, (source, _) = listener.accept()
            accepted.close()
    return str(source)


# ---------------------------------------------------------------------- without namespaces


def test_ipv6_is_refused_with_a_clear_error() -> None:
    with pytest.raises(VipError, match="IPv6"):
        VirtualIp("2001:db8::10/64", "eth0")


def test_invalid_address_and_interface_are_refused() -> None:
    with pytest.raises(VipError, match="invalid virtual IP"):
        VirtualIp("198.18.0.300/24", "eth0")
    with pytest.raises(VipError, match="invalid interface"):
        VirtualIp(VIP_CIDR, "an-interface-name-too-long")


def test_label_only_when_it_fits() -> None:
    assert VirtualIp(VIP_CIDR, "eth0").label == "eth0:hamta"
    assert VirtualIp(VIP_CIDR, SECOND_IF).label is None


def test_garp_frames_layout() -> None:
    mac = bytes.fromhex("020000000001")
    request, reply = garp_frames(mac, ipaddress.IPv4Address(VIP))
    for frame, op, target_mac in ((request, 1, b"\x00" * 6), (reply, 2, mac)):
        assert len(frame) == 60
        dst, src, ethertype = struct.unpack("!6s6sH", frame[:14])
        assert (dst, src, ethertype) == (b"\xff" * 6, mac, ETH_P_ARP)
        fields = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
        vip = ipaddress.IPv4Address(VIP).packed
        assert fields == (1, 0x0800, 6, 4, op, mac, vip, target_mac, vip)


# ---------------------------------------------------------------------- in the lab


@pytest.mark.root
def test_add_makes_the_vip_reachable_and_remove_takes_it_away(lab: Lab) -> None:
    vip = lab.vip(lab.first, FIRST_IF)
    assert not vip.held()
    vip.add()
    assert vip.held()
    assert addresses(lab.first, FIRST_IF)[VIP] == f"{FIRST_IF}:hamta"
    assert reach(lab, lab.first) == "198.19.250.2"

    vip.add()  # idempotent: still one address, no error
    assert list(addresses(lab.first, FIRST_IF)).count(VIP) == 1

    vip.remove()
    assert not vip.held()
    assert VIP not in addresses(lab.first, FIRST_IF)
    vip.remove()  # idempotent
    assert not vip.held()


@pytest.mark.root
def test_add_blocks_only_briefly(lab: Lab) -> None:
    vip = lab.vip(lab.first, FIRST_IF)
    started = time.monotonic()
    vip.add()
    elapsed = time.monotonic() - started
    assert elapsed < 0.2, f"add took {elapsed:.3f}s"


@pytest.mark.root
def test_remove_finds_the_address_whatever_its_prefix(lab: Lab) -> None:
    ip("-n", lab.first, "addr", "add", f"{VIP}/32", "dev", FIRST_IF)
    vip = lab.vip(lab.first, FIRST_IF)
    assert vip.held()
    vip.add()  # held already: nothing added beside it
    assert list(addresses(lab.first, FIRST_IF)).count(VIP) == 1
    vip.remove()
    assert VIP not in addresses(lab.first, FIRST_IF)


@pytest.mark.root
def test_announce_sends_a_gratuitous_request_and_reply(lab: Lab) -> None:
    vip = lab.vip(lab.first, FIRST_IF)
    vip.add()
    mac = bytes.fromhex(mac_of(lab.first, FIRST_IF).replace(":", ""))
    vip_packed = ipaddress.IPv4Address(VIP).packed
    seen: set[int] = set()
    with socket_in(lab.peer, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as cap:
        cap.bind((BRIDGE, ETH_P_ARP))
        cap.settimeout(0.2)
        vip.announce()
        deadline = time.monotonic() + 2
        while seen != {1, 2} and time.monotonic() < deadline:
            try:
                frame = cap.recv(2048)
            except TimeoutError:
                continue
            dst, src = frame[:6], frame[6:12]
            _, _, _, _, op, sha, spa, tha, tpa = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
            if spa != vip_packed or tpa != vip_packed:
                continue
            assert (dst, src, sha) == (b"\xff" * 6, mac, mac)
            assert tha == (mac if op == 2 else b"\x00" * 6)
            seen.add(op)
    assert seen == {1, 2}, "no gratuitous ARP request and reply reached the peer"


@pytest.mark.root
def test_moving_the_vip_updates_the_neighbours_at_once(lab: Lab) -> None:
    first = lab.vip(lab.first, FIRST_IF)
    second = lab.vip(lab.second, SECOND_IF)
    first.add()
    assert reach(lab, lab.first) == "198.19.250.2"
    assert neighbour_mac(lab.peer, VIP) == mac_of(lab.first, FIRST_IF)

    first.remove()
    second.add()
    assert addresses(lab.second, SECOND_IF)[VIP] == SECOND_IF  # no label: it would not fit
    # Without the announcement the peer keeps the old, reachable entry for tens of seconds.
    expected = mac_of(lab.second, SECOND_IF)
    deadline = time.monotonic() + 1
    while neighbour_mac(lab.peer, VIP) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert neighbour_mac(lab.peer, VIP) == expected
    assert reach(lab, lab.second) == "198.19.250.2"


@pytest.mark.root
def test_a_missing_interface_or_namespace_is_a_clear_error(lab: Lab) -> None:
    vip = lab.vip(lab.first, "nosuch0")
    with pytest.raises(VipError, match=r"cannot add 198\.19\.250\.100/24 on nosuch0 .*interface"):
        vip.add()
    with pytest.raises(VipError, match=r"nosuch0.*no such interface"):
        vip.announce()
    assert not vip.held()
    vip.remove()  # nothing can be held on an interface that does not exist

    ghost = VirtualIp(VIP_CIDR, FIRST_IF, netns=f"{lab.first}-gone")
    with pytest.raises(VipError, match=f"{FIRST_IF} in netns {lab.first}-gone.*no network"):
        ghost.add()
    with pytest.raises(VipError, match="no network namespace"):
        ghost.announce()


@pytest.mark.root
def test_announcing_on_a_link_that_is_down_fails(lab: Lab) -> None:
    ip("-n", lab.first, "link", "set", FIRST_IF, "down")
    vip = lab.vip(lab.first, FIRST_IF)
    with pytest.raises(VipError, match=f"cannot announce {VIP_CIDR} on {FIRST_IF}"):
        vip.add()
    assert vip.held()  # the address went on; the executor's rollback removes it
    vip.remove()
    assert not vip.held()


@pytest.mark.root
def test_loopback_is_not_announced(lab: Lab) -> None:
    vip = VirtualIp("198.19.250.200/32", "lo", netns=lab.first)
    vip.add()
    assert vip.held()
    assert "198.19.250.200" in addresses(lab.first, "lo")
    vip.remove()
    assert not vip.held()
