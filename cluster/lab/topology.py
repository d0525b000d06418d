"""The lab's names and addresses: which hosts exist, their namespaces and where they sit.

Every name and address the lab uses is derived here from two values, a prefix and a subnet, so
that a second lab (the tests') can run beside a user's without touching it: with prefix ``hlt``
and subnet 198.19.240.0/24 nothing it creates shares a name or an address with the default lab.
Addresses are confined to 198.18.0.0/15 (RFC 2544's benchmarking range), which no real network
routes, and live only inside the lab's own network namespaces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Final

# Where a lab lives unless told otherwise, like the relay's ./var/spool.
DEFAULT_DIRECTORY: Final = Path("./var/lab")

ZOOKEEPER_HOSTS: Final = ("zk1", "zk2", "zk3")
NODES: Final = ("node1", "node2")
CLIENT: Final = "client"
INTERNET: Final = "inet"
HOSTS: Final = (*ZOOKEEPER_HOSTS, *NODES, CLIENT, INTERNET)
SWITCH: Final = "sw"
BRIDGE: Final = "br0"
INTERFACE: Final = "eth0"

# The last octet of each host, and of the virtual IP, inside the subnet.
_OFFSETS: Final = {
    "zk1": 11,
    "zk2": 12,
    "zk3": 13,
    "node1": 21,
    "node2": 22,
    "client": 31,
    "inet": 41,
}
_VIP_OFFSET: Final = 100
# Pair 1's egress addresses (the relay's [delivery.egress]), moved with its VIP: offset, name.
# Above the extra pairs' virtual IPs (100 + k - 1), still inside a /25.
_EGRESS: Final = ((111, "out1"), (112, "out2"))
# ``lab up --pairs N``: pair k (2..N) has nodes ``p<k>node1``, ``p<k>node2`` at offsets
# 50 + 10(k-2) + 1 and + 2 (above the client and inet), and its virtual IP at 100 + k - 1. Pair 1
# keeps the names and addresses of the one-pair lab, so that every existing test still holds.
MAX_PAIRS: Final = 3
_PAIR_NODE_BASE: Final = 50
_PAIR_NODE_STEP: Final = 10
# The cluster (agent.cluster, the ZooKeeper root under /hamta) of pair 1; pair k's is lab<k>.
PAIR_CLUSTER: Final = "lab"
# Room for the virtual IP's offset and a broadcast address above it.
_LONGEST_PREFIX: Final = 25

LAB_RANGE: Final = IPv4Network("198.18.0.0/15")
ZOOKEEPER_PORT: Final = 2181
SMTP_PORT: Final = 25
ADMIN_PORT: Final = 8025  # each relay's admin endpoint, on its node's own lab address
ALERTS_PORT: Final = 8099  # the monitors' webhook receiver, on the internet host
PEER_PORT: Final = 7946  # the agents' peer channel (UDP)
DNS_PORT: Final = 53
API_PORT: Final = 8008  # each agent's HTTP API, on the node's own address
# The internet host's validating resolver (unbound, cluster.lab.tls_site), the relays' DNS.
RESOLVER_PORT: Final = 5353
# The mail domains the lab's DNS answers for; all of them are delivered to the sink.
MAIL_DOMAINS: Final = ("a.lab.test", "b.lab.test", "c.lab.test")
MX_NAME: Final = "mx.lab.test"
DOMAIN: Final = "lab.test"
# The monitors' round-trip probes go to LOCATION@PROBE_DOMAIN: the sink's probe mailbox.
PROBE_DOMAIN: Final = "probe.lab.test"

_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,9}$")


class TopologyError(ValueError):
    """A prefix or subnet the lab cannot use."""


@dataclass(frozen=True, slots=True)
class Topology:
    """The lab's hosts, namespaces and addresses for one prefix and subnet."""

    prefix: str
    subnet: IPv4Network
    pairs: int = 1

    @classmethod
    def build(cls, prefix: str, subnet: str, pairs: int = 1) -> Topology:
        """Validate ``prefix``, ``subnet`` (inside 198.18.0.0/15, at most a /25) and ``pairs``."""
        if not 1 <= pairs <= MAX_PAIRS:
            raise TopologyError(
                f"lab pairs {pairs}: the lab builds 1 to {MAX_PAIRS} pairs on its ensemble"
            )
        if not _PREFIX.match(prefix):
            raise TopologyError(
                f"lab prefix {prefix!r}: use 1 to 10 lowercase letters and digits, letter first"
            )
        try:
            network = IPv4Network(subnet, strict=True)
        except ValueError as exc:
            raise TopologyError(f"lab subnet {subnet!r}: {exc}") from None
        if not network.subnet_of(LAB_RANGE):
            raise TopologyError(f"lab subnet {network} is outside {LAB_RANGE}")
        if network.prefixlen > _LONGEST_PREFIX:
            raise TopologyError(f"lab subnet {network} is too small (at most a /25)")
        return cls(prefix, network, pairs)

    # ------------------------------------------------------------------ pairs

    @property
    def pair_names(self) -> tuple[str, ...]:
        """Each pair's cluster name (agent.cluster): ``lab``, ``lab2``, ``lab3``."""
        return tuple(pair_name(k) for k in range(1, self.pairs + 1))

    def pair_nodes(self, pair: str) -> tuple[str, str]:
        """The two nodes of ``pair``; pair 1's are ``node1`` and ``node2``."""
        index = self._pair_index(pair)
        if index == 1:
            return (NODES[0], NODES[1])
        return (f"p{index}{NODES[0]}", f"p{index}{NODES[1]}")

    def pair_of(self, node: str) -> str:
        """The pair ``node`` belongs to."""
        for pair in self.pair_names:
            if node in self.pair_nodes(pair):
                return pair
        raise TopologyError(f"no node {node!r} in the lab (nodes: {', '.join(self.nodes)})")

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node of every pair, pair 1's first."""
        return tuple(node for pair in self.pair_names for node in self.pair_nodes(pair))

    @property
    def hosts(self) -> tuple[str, ...]:
        """Every host: the ensemble, every pair's nodes, the client and the internet."""
        return (*ZOOKEEPER_HOSTS, *self.nodes, CLIENT, INTERNET)

    def pair_vip(self, pair: str) -> IPv4Interface:
        """The virtual IP of ``pair`` (pair 1's is :attr:`vip`)."""
        offset = _VIP_OFFSET + self._pair_index(pair) - 1
        return IPv4Interface(f"{self.subnet.network_address + offset}/{self.subnet.prefixlen}")

    def _pair_index(self, pair: str) -> int:
        for index, name in enumerate(self.pair_names, start=1):
            if name == pair:
                return index
        raise TopologyError(f"no pair {pair!r} in the lab (pairs: {', '.join(self.pair_names)})")

    def namespace(self, host: str) -> str:
        """The network namespace of ``host`` (or of the switch, ``sw``)."""
        if host != SWITCH and host not in self.hosts:
            raise TopologyError(f"no host {host!r} in the lab (hosts: {', '.join(self.hosts)})")
        return f"{self.prefix}-{host}"

    @property
    def switch(self) -> str:
        """The namespace holding the bridge that joins every host."""
        return self.namespace(SWITCH)

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of the lab, the switch first."""
        return (self.switch, *(self.namespace(host) for host in self.hosts))

    def address(self, host: str) -> IPv4Address:
        """The address of ``host`` on the lab's network."""
        if host in _OFFSETS:
            return self.subnet.network_address + _OFFSETS[host]
        if host not in self.hosts:
            raise TopologyError(f"no host {host!r} in the lab")
        index = self._pair_index(self.pair_of(host))
        offset = (
            _PAIR_NODE_BASE
            + _PAIR_NODE_STEP * (index - 2)
            + 1
            + self.pair_nodes(self.pair_of(host)).index(host)
        )
        return self.subnet.network_address + offset

    def interface(self, host: str) -> IPv4Interface:
        """The address of ``host`` with the subnet's prefix length, as set on its ``eth0``."""
        return IPv4Interface(f"{self.address(host)}/{self.subnet.prefixlen}")

    @property
    def vip(self) -> IPv4Interface:
        """The virtual IP that follows the active node."""
        return IPv4Interface(f"{self.subnet.network_address + _VIP_OFFSET}/{self.subnet.prefixlen}")

    @property
    def egress(self) -> tuple[tuple[IPv4Address, str], ...]:
        """The pair's egress addresses and their EHLO names (each with its PTR in the DNS)."""
        base = self.subnet.network_address
        return tuple((base + offset, f"{name}.{DOMAIN}") for offset, name in _EGRESS)

    @property
    def zookeeper_hosts(self) -> str:
        """The ensemble's connection string, ``host:port,...``."""
        return ",".join(f"{self.address(h)}:{ZOOKEEPER_PORT}" for h in ZOOKEEPER_HOSTS)

    def host_of_namespace(self, namespace: str) -> str | None:
        """The host (or ``sw``) whose namespace is ``namespace``; None if not the lab's."""
        head, _, tail = namespace.partition("-")
        if head == self.prefix and (tail in self.hosts or tail == SWITCH):
            return tail
        return None


def pair_name(index: int) -> str:
    """The cluster name of the lab's pair ``index`` (1-based): ``lab``, ``lab2``, ``lab3``."""
    return PAIR_CLUSTER if index == 1 else f"{PAIR_CLUSTER}{index}"
