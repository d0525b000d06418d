"""Network namespaces, the bridge, veth pairs and addresses, through netlink (pyroute2).

The lab never touches the host's own namespace: the bridge lives in a namespace of its own
(``<prefix>-sw``) and each veth pair is created there with its other end placed straight into
the host's namespace, so not even for a moment does an interface appear in the root namespace.

Every lookup opens namespaces with ``flags=0``: pyroute2 would otherwise create a namespace that
is missing, and a query must never bring back a namespace that ``down`` just removed.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Final

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as _netns

NETNS_DIR: Final = Path("/run/netns")


class NetnsError(RuntimeError):
    """A namespace operation failed; the message says which namespace and why."""


def exists(name: str) -> bool:
    """Whether the named namespace exists (is bound under /run/netns)."""
    return name in _netns.listnetns()


def create(name: str) -> None:
    """Create the named namespace with its loopback up; NetnsError if it exists already."""
    if exists(name):
        raise NetnsError(f"network namespace {name} exists already")
    try:
        _netns.create(name)
    except OSError as exc:
        raise NetnsError(f"cannot create network namespace {name}: {exc}") from None
    with _route(name) as ip:
        ip.link("set", index=_index(ip, "lo", name), state="up")


def remove(name: str) -> bool:
    """Delete the named namespace (its interfaces go with it); False if there was none."""
    if not exists(name):
        return False
    try:
        _netns.remove(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise NetnsError(f"cannot remove network namespace {name}: {exc}") from None
    return True


# pyroute2 opens a netlink socket in another namespace through a helper process it starts
# there for a few milliseconds; a power-off of that node (the lab's STONITH kills every process
# in the namespace) can kill the helper too. The socket is then simply asked for again.
_HELPER_ATTEMPTS = 5


def _route(name: str) -> IPRoute:
    for attempt in range(_HELPER_ATTEMPTS):
        try:
            return IPRoute(netns=name, flags=0)
        except FileNotFoundError:
            raise NetnsError(f"no network namespace {name}") from None
        except RuntimeError as exc:  # "child process is dead, status: -9"
            if attempt == _HELPER_ATTEMPTS - 1:
                raise NetnsError(f"cannot open a netlink socket in {name}: {exc}") from None
    raise AssertionError("unreachable")


def _index(ip: IPRoute, ifname: str, name: str) -> int:
    found = ip.link_lookup(ifname=ifname)
    if not found:
        raise NetnsError(f"no interface {ifname} in network namespace {name}")
    return int(found[0])


def add_bridge(name: str, bridge: str) -> None:
    """Create ``bridge`` in namespace ``name`` and bring it up (no address: a plain switch)."""
    with _route(name) as ip:
        try:
            ip.link("add", ifname=bridge, kind="bridge")
        except NetlinkError as exc:
            raise NetnsError(f"cannot add bridge {bridge} in {name}: {exc}") from None
        ip.link("set", index=_index(ip, bridge, name), state="up")


def plug(
    switch: str, bridge: str, port: str, host: str, ifname: str, address: IPv4Interface
) -> None:
    """Join namespace ``host`` to ``bridge`` in ``switch`` with a veth pair.

    The switch's end is called ``port`` and enslaved to the bridge; the host's end is called
    ``ifname``, gets ``address`` and comes up.
    """
    with _route(switch) as ip:
        try:
            ip.link("add", ifname=port, kind="veth", peer={"ifname": ifname, "net_ns_fd": host})
        except NetlinkError as exc:
            raise NetnsError(f"cannot add veth {port}/{host}:{ifname}: {exc}") from None
        index = _index(ip, port, switch)
        ip.link("set", index=index, master=_index(ip, bridge, switch))
        ip.link("set", index=index, state="up")
    with _route(host) as ip:
        index = _index(ip, ifname, host)
        ip.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
        ip.link("set", index=index, state="up")


def addresses(name: str, ifname: str) -> list[IPv4Interface]:
    """The IPv4 addresses on ``ifname`` in namespace ``name`` (empty if either is gone)."""
    if not exists(name):
        return []
    try:
        with _route(name) as ip:
            found = ip.link_lookup(ifname=ifname)
            if not found:
                return []
            return [
                IPv4Interface(f"{message.get('IFA_ADDRESS')}/{message['prefixlen']}")
                for message in ip.get_addr(family=socket.AF_INET, index=found[0])
            ]
    except NetnsError:
        return []


def remove_address(name: str, ifname: str, address: IPv4Interface) -> bool:
    """Take ``address`` off ``ifname`` in namespace ``name``; False if it was not there."""
    if address not in addresses(name, ifname):
        return False
    with _route(name) as ip:
        try:
            ip.addr(
                "del",
                index=_index(ip, ifname, name),
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
            )
        except NetlinkError as exc:
            if exc.code == errno.EADDRNOTAVAIL:  # gone meanwhile (its holder released it)
                return False
            raise NetnsError(f"cannot remove {address} from {name}:{ifname}: {exc}") from None
    return True


def inode(name: str) -> tuple[int, int] | None:
    """The (device, inode) identifying the named namespace; None if it does not exist."""
    try:
        st = os.stat(NETNS_DIR / name)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def pids_in(names: Iterable[str]) -> dict[str, list[int]]:
    """The processes inside each of the named namespaces (found by the inode of /proc/PID/ns/net).

    Only the given namespaces are looked at, so that nothing outside the lab is ever signalled.
    Exited processes (zombies) have no namespace any more and are not listed.
    """
    wanted: dict[tuple[int, int], str] = {}
    for name in names:
        key = inode(name)
        if key is not None:
            wanted[key] = name
    found: dict[str, list[int]] = {name: [] for name in wanted.values()}
    if not wanted:
        return found
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}/ns/net")
        except OSError:  # exited meanwhile, or a zombie
            continue
        owner = wanted.get((st.st_dev, st.st_ino))
        if owner is not None:
            found[owner].append(int(entry.name))
    for pids in found.values():
        pids.sort()
    return found


def socket_in(
    name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket created inside namespace ``name``, for this process to use as any other.

    A socket belongs to the namespace it was created in for its whole life, so the lab can probe
    a service from the client's point of view without running a process there.
    """
    if not exists(name):
        raise NetnsError(f"no network namespace {name}")
    try:
        sock: socket.socket = _netns.create_socket(name, family, kind, flags=0)
    except OSError as exc:
        raise NetnsError(f"cannot open a socket in {name}: {exc}") from None
    return sock


def exec_argv(name: str, argv: Iterable[str]) -> list[str]:
    """The command line that runs ``argv`` inside namespace ``name``.

    ``ip netns exec`` also gives the command a mount namespace of its own (mounts made under it
    are private to its process tree, as on a separate machine) and execs it, so the pid of the
    command is the pid of the process started.
    """
    return ["ip", "netns", "exec", name, *argv]
