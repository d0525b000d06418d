"""Network partitions of a lab node with nftables: cut off from ZooKeeper, from its peer's
agent (the peer channel), or from everything.

The chaos suite's partition scenarios and the keepalived baseline of the same scenarios
(``bench/partition_baseline.py``) inject these cuts; both live above the lab, so the cuts live
here. A cut is one nftables table in the node's namespace, which ``lift`` deletes whole.
"""

from __future__ import annotations

from cluster.lab.lab import Lab, LabError
from cluster.lab.topology import PEER_PORT

TABLE = "hamta_chaos"


def cut_from_zookeeper(lab: Lab, node: str) -> None:
    """Drop what ``node`` sends to the ZooKeeper servers; clients still reach it."""
    servers = ", ".join(host.split(":")[0] for host in lab.zookeeper_hosts.split(","))
    _apply(
        lab,
        node,
        f"table inet {TABLE} {{\n chain out {{\n  type filter hook output priority 0;\n"
        f"  ip daddr {{ {servers} }} tcp dport 2181 drop\n }}\n}}\n",
    )


def cut_peer_channel(lab: Lab, node: str) -> None:
    """Drop ``node``'s peer channel both ways (heartbeats, failsafe); all else still flows."""
    _apply(
        lab,
        node,
        f"table inet {TABLE} {{\n"
        f" chain in {{ type filter hook input priority 0; udp dport {PEER_PORT} drop; }}\n"
        f" chain out {{ type filter hook output priority 0; udp dport {PEER_PORT} drop; }}\n"
        "}\n",
    )


def cut_off(lab: Lab, node: str) -> None:
    """Drop everything ``node`` sends or receives on its ``eth0``."""
    _apply(
        lab,
        node,
        f"table inet {TABLE} {{\n"
        ' chain in { type filter hook input priority 0; iifname "eth0" drop; }\n'
        ' chain out { type filter hook output priority 0; oifname "eth0" drop; }\n'
        "}\n",
    )


def lift(lab: Lab, node: str) -> None:
    """Undo any cut of ``node``, whether or not there is one."""
    # The namespace keeps its rules when its processes die: lift them whatever happened.
    lab.exec(node, ["nft", "delete", "table", "inet", TABLE])


def _apply(lab: Lab, node: str, rules: str) -> None:
    done = lab.exec(node, ["nft", "-f", "-"], input=rules)
    if done.returncode != 0:
        raise LabError(f"nft on {node}: {done.stderr.strip()}")
