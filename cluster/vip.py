"""The virtual IP that follows the active node: added, announced, removed, checked.

The address is managed over netlink with pyroute2, and announced with gratuitous ARP sent from a
raw ``AF_PACKET`` socket, so that neighbours and switches learn the new owner at once instead of
after their ARP entries go stale (tens of seconds on Linux). Only IPv4 is supported: an IPv6
virtual IP would need unsolicited neighbour advertisements instead, which are not implemented.

Every call blocks briefly (netlink round trips; the announcement paces its frames over about
20 ms): the executor runs them in a worker thread. When ``netns`` is given, the work is done in a
short-lived thread that has joined that network namespace (``setns`` affects the calling thread
only), so that the netlink and packet sockets are opened inside it without forking a process
that runs other threads, and without creating the namespace when it does not exist.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

NETNS_DIR: Final = Path("/run/netns")
LABEL_SUFFIX: Final = ":hamta"
IFNAMSIZ: Final = 16  # the kernel's limit on interface names and labels, NUL included

_CLONE_NEWNET: Final = 0x40000000
_ETH_P_ARP: Final = 0x0806
_ETH_P_IP: Final = 0x0800
_ARPHRD_ETHER: Final = 1
_ARPOP_REQUEST: Final = 1
_ARPOP_REPLY: Final = 2
_BROADCAST: Final = b"\xff" * 6
_ZERO_MAC: Final = b"\x00" * 6
_MIN_FRAME: Final = 60  # Ethernet minimum without the FCS; short frames are padded

T = TypeVar("T")


class VipError(Exception):
    """The virtual IP could not be added, removed, checked or announced."""


class VirtualIp:
    """One IPv4 virtual IP on one interface, optionally inside a named network namespace.

    ``address`` is an IPv4 address with its prefix length ("198.18.0.100/24"; without one it is
    a /32). An IPv6 address is refused with ``VipError``. ``netns`` names a namespace under
    /run/netns (or is a path to a namespace file); None operates in the caller's namespace,
    which is the normal case: the agent runs inside its node's namespace already.
    ``arp_count`` rounds of announcements (one ARP request and one ARP reply each) are sent
    ``arp_interval`` seconds apart, pacing with ``sleep``.
    """

    def __init__(
        self,
        address: str,
        interface: str,
        *,
        netns: str | None = None,
        arp_count: int = 3,
        arp_interval: float = 0.01,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        try:
            parsed = ipaddress.ip_interface(address)
        except ValueError as exc:
            raise VipError(f"invalid virtual IP {address!r}: {exc}") from exc
        if not isinstance(parsed, ipaddress.IPv4Interface):
            raise VipError(
                f"virtual IP {address} is IPv6; only IPv4 is supported "
                "(IPv6 would need unsolicited neighbour advertisements, not implemented)"
            )
        if not interface or len(interface) >= IFNAMSIZ or "/" in interface:
            raise VipError(f"invalid interface name {interface!r} for virtual IP {address}")
        self.address = address
        self.interface = interface
        self.netns = netns
        self.ip: ipaddress.IPv4Interface = parsed
        self.arp_count = arp_count
        self.arp_interval = arp_interval
        self._sleep = sleep
        label = interface + LABEL_SUFFIX
        # A label that does not fit would be refused by the kernel: go without one.
        self.label: str | None = label if len(label) < IFNAMSIZ else None

    def __repr__(self) -> str:
        where = f" in netns {self.netns}" if self.netns else ""
        return f"VirtualIp({self.ip.with_prefixlen} on {self.interface}{where})"

    # ------------------------------------------------------------------ public API

    def describe(self) -> str:
        """The address, for the executor's step results."""
        return f"{self.address} on {self.interface}"

    def add(self) -> None:
        """Add the address if it is not there yet, then announce it with gratuitous ARP."""
        self.add_address()
        self.announce()

    def add_address(self) -> None:
        """Add the address if it is not there yet, without announcing it."""
        self._netlink("add", self._add)

    def remove(self) -> None:
        """Remove the address if it is there; a missing interface holds nothing, so no error."""
        self._netlink("remove", self._remove)

    def held(self) -> bool:
        """Whether the interface carries the address (with any prefix length)."""
        return self._netlink("check", lambda ipr: bool(self._entries(ipr)))

    def announce(self) -> None:
        """Send gratuitous ARP for the address: a request and a reply per round, broadcast.

        Both forms are sent because neighbours differ in which one they honour; the reply
        carries the sender's MAC as target too, which Linux requires to treat it as gratuitous
        (and so to override a recent entry). Links that do not use ARP (loopback, tunnels) have
        no neighbours to tell, and are skipped silently.
        """
        try:
            _in_netns(self.netns, self._announce)
        except VipError:
            raise
        except OSError as exc:
            raise VipError(f"cannot announce {self._where()}: {_reason(exc)}") from exc

    # ------------------------------------------------------------------ netlink

    def _netlink(self, verb: str, work: Callable[[Any], T]) -> T:
        def run() -> T:
            with IPRoute() as ipr:
                return work(ipr)

        try:
            return _in_netns(self.netns, run)
        except VipError:
            raise
        except NetlinkError as exc:
            raise VipError(f"cannot {verb} {self._where()}: {os.strerror(exc.code)}") from exc
        except OSError as exc:
            raise VipError(f"cannot {verb} {self._where()}: {_reason(exc)}") from exc

    def _index(self, ipr: Any) -> int | None:
        found: list[int] = ipr.link_lookup(ifname=self.interface)
        return found[0] if found else None

    def _entries(self, ipr: Any) -> list[int]:
        """The prefix lengths with which the address is on the interface (usually one or none)."""
        index = self._index(ipr)
        if index is None:
            return []
        wanted = str(self.ip.ip)
        return [
            int(entry["prefixlen"])
            for entry in ipr.get_addr(family=socket.AF_INET, index=index)
            if (entry.get_attr("IFA_LOCAL") or entry.get_attr("IFA_ADDRESS")) == wanted
        ]

    def _add(self, ipr: Any) -> None:
        index = self._index(ipr)
        if index is None:
            raise VipError(f"cannot add {self._where()}: no such interface")
        if self._entries(ipr):
            return
        request: dict[str, Any] = {
            "index": index,
            "address": str(self.ip.ip),
            "prefixlen": self.ip.network.prefixlen,
        }
        if self.label is not None:
            request["label"] = self.label
        try:
            ipr.addr("add", **request)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # added meanwhile by someone else: the same outcome
                raise

    def _remove(self, ipr: Any) -> None:
        index = self._index(ipr)
        if index is None:
            return
        for prefixlen in self._entries(ipr):
            try:
                ipr.addr("del", index=index, address=str(self.ip.ip), prefixlen=prefixlen)
            except NetlinkError as exc:
                if exc.code != errno.EADDRNOTAVAIL:  # removed meanwhile: the same outcome
                    raise

    # ------------------------------------------------------------------ ARP

    def _announce(self) -> None:
        # Protocol 0: this socket only sends, so the kernel queues no received frames on it.
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0) as sock:
            try:
                sock.bind((self.interface, 0))
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    raise VipError(f"cannot announce {self._where()}: no such interface") from exc
                raise
            hatype, mac = sock.getsockname()[3:5]
            if hatype != _ARPHRD_ETHER or len(mac) != 6:
                return
            frames = garp_frames(mac, self.ip.ip)
            for round_ in range(self.arp_count):
                if round_:
                    self._sleep(self.arp_interval)  # pacing: a burst may be dropped whole
                for frame in frames:
                    sock.send(frame)

    def _where(self) -> str:
        where = f" in netns {self.netns}" if self.netns else ""
        return f"{self.ip.with_prefixlen} on {self.interface}{where}"


def garp_frames(mac: bytes, address: ipaddress.IPv4Address) -> tuple[bytes, bytes]:
    """The two gratuitous ARP Ethernet frames announcing that ``mac`` owns ``address``.

    The request has sender = target = ``address`` and a zero target MAC (RFC 5227's
    announcement); the reply has the sender's MAC as target MAC, as Linux requires of a
    gratuitous reply. Both go to the Ethernet broadcast address.
    """
    ip = address.packed
    header = struct.pack("!6s6sH", _BROADCAST, mac, _ETH_P_ARP)

    def arp(op: int, target_mac: bytes) -> bytes:
        body = struct.pack(
            "!HHBBH6s4s6s4s", _ARPHRD_ETHER, _ETH_P_IP, 6, 4, op, mac, ip, target_mac, ip
        )
        return (header + body).ljust(_MIN_FRAME, b"\x00")

    return arp(_ARPOP_REQUEST, _ZERO_MAC), arp(_ARPOP_REPLY, mac)


# ---------------------------------------------------------------------- namespaces

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc  # noqa: PLW0603 - loaded once, on first use inside a namespace
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _in_netns(netns: str | None, work: Callable[[], T]) -> T:
    """Run ``work`` in network namespace ``netns`` (None: here, in the calling thread).

    Python 3.11 has no ``os.setns``, hence the libc call. The thread ends with ``work``, so no
    thread of the process is left in the other namespace; sockets opened by ``work`` stay in the
    namespace they were created in.
    """
    if netns is None:
        return work()
    path = Path(netns) if "/" in netns else NETNS_DIR / netns
    results: list[T] = []
    failures: list[BaseException] = []

    def target() -> None:
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise OSError(errno.ENOENT, f"no network namespace {path}") from exc
            try:
                _setns(fd)
            finally:
                os.close(fd)
            results.append(work())
        except BaseException as exc:  # handed over to the caller's thread
            failures.append(exc)

    thread = threading.Thread(target=target, name=f"netns:{netns}", daemon=True)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]
    return results[0]


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


class VipSet:
    """The virtual IP and the relay's egress addresses (``[delivery.egress.sources]``), moved
    together: added (each announced) on promotion, removed on demotion, before the peer adds
    them. It stands where one :class:`VirtualIp` would: ``address`` and ``interface`` are the
    first member's (the virtual IP when there is one), for hooks and the watchdog.

    A failure of one member does not stop the others: removal in particular goes on, so that a
    demoted node holds as few of the service's addresses as it can; the first error is raised.
    """

    def __init__(self, members: list[VirtualIp]) -> None:
        if not members:
            raise VipError("no addresses to move")
        self.members = members
        self.address = members[0].address
        self.interface = members[0].interface

    def __repr__(self) -> str:
        return f"VipSet({', '.join(repr(m) for m in self.members)})"

    def add(self) -> None:
        """Add every address, then announce them all at once.

        Every address is on the interface before any is announced, and so before the next
        promotion step activates the relay, which sends from the egress addresses at once. The
        announcements run side by side, one thread each: their paced rounds overlap instead of
        adding up (with the virtual IP and two egress addresses, about 20 ms instead of 60 ms,
        and more on a loaded machine, where each pause and thread start takes longer).
        """
        self._each(lambda member: member.add_address())
        errors: list[VipError] = []

        def announce(member: VirtualIp) -> None:
            try:
                member.announce()
            except VipError as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=announce, args=(member,), name="vip-announce", daemon=True)
            for member in self.members
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def remove(self) -> None:
        """Remove every address that is there."""
        self._each(lambda member: member.remove())

    def held(self) -> bool:
        """Whether any of the addresses is on the interface (a demoted node must hold none)."""
        return any(member.held() for member in self.members)

    def announce(self) -> None:
        """Announce every address again."""
        self._each(lambda member: member.announce())

    def others(self) -> list[str]:
        """The members after the first, as ``ip`` takes them: the watchdog removes them too."""
        return [member.ip.with_prefixlen for member in self.members[1:]]

    def describe(self) -> str:
        """The addresses, for the executor's step results."""
        return ", ".join(m.ip.with_prefixlen for m in self.members) + f" on {self.interface}"

    def _each(self, work: Callable[[VirtualIp], None]) -> None:
        errors: list[VipError] = []
        for member in self.members:
            try:
                work(member)
            except VipError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def moving_addresses(
    vip: str, interface: str, egress: list[str], *, netns: str | None = None
) -> VirtualIp | VipSet | None:
    """What the agent moves with the active role: the virtual IP (``vip``, "" for none) and the
    egress addresses (each a /32 on the same interface); None when there is nothing."""
    members = [VirtualIp(vip, interface, netns=netns)] if vip else []
    members += [VirtualIp(address, interface, netns=netns) for address in egress]
    if not members:
        return None
    return members[0] if len(members) == 1 else VipSet(members)
