"""The configuration files of the lab's nodes: the relay's ``relay.toml`` and the agent's.

Both are written as TOML from plain dictionaries; the values are only strings, integers, lists
and tables, and JSON's string syntax is valid TOML, which keeps the writer to a few lines.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cluster.lab.site import CONTROL_SOCKET
from cluster.lab.topology import (
    ADMIN_PORT,
    API_PORT,
    DNS_PORT,
    DOMAIN,
    INTERFACE,
    INTERNET,
    PAIR_CLUSTER,
    PEER_PORT,
    RESOLVER_PORT,
    SMTP_PORT,
    Topology,
)

Sections = Mapping[str, Mapping[str, Any]]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, Mapping):
        items = ", ".join(f"{json.dumps(str(k))} = {_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_toml(sections: Sections) -> str:
    """``{section: {key: value}}`` as a TOML document (dotted section names for sub-tables)."""
    lines: list[str] = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_value(value)}" for key, value in keys.items()]
        lines.append("")
    return "\n".join(lines)


def relay_config(
    topology: Topology, node: str, node_dir: Path, spool: Path, *, tls_ca: Path | None = None
) -> Sections:
    """The relay of ``node``: SMTP on every address, DNS from the lab, delivery on port 25.

    ``spool`` is where the active node finds the spool inside the mounted shared disk; the agent
    hands that path to the relay when it activates it. With ``tls_ca`` (the lab's CA,
    cluster.lab.tls_site), the relay resolves through the internet host's validating resolver
    (DANE) and trusts that CA for MTA-STS.
    """
    sections: dict[str, dict[str, Any]] = {
        # The lab runs as root in its namespaces, with spools and sockets in root's directories:
        # it keeps root on purpose (tests/test_privileges.py checks the drop to a user).
        "node": {"hostname": f"{node}.{DOMAIN}", "stop_timeout": "5s", "user": "root"},
        "smtp": {
            "listen": [f"0.0.0.0:{SMTP_PORT}"],
            "relay_networks": [str(topology.subnet), "127.0.0.0/8"],
        },
        "spool": {"path": spool, "segment_size": "16m", "journal_size": "16m", "min_free": "16m"},
        "dns": {"nameservers": [f"{topology.address(INTERNET)}:{DNS_PORT}"], "timeout": "2s"},
        "delivery": {
            "port": SMTP_PORT,
            "connect_timeout": "5s",
            "command_timeout": "30s",
        },
        "retry": {"first_delay": "1s", "max_delay": "10s"},
        # On the node's own lab address, not loopback: the check locations (the monitors on
        # inet and client) read its health and queue from outside. Every route is a GET (health,
        # queue, domains, metrics, the dashboard): nothing there changes the relay.
        "admin": {"listen": f"{topology.address(node)}:{ADMIN_PORT}"},
        "control": {"socket": node_dir / CONTROL_SOCKET},
        "log": {"file": node_dir / "relay.log"},
    }
    if topology.pair_of(node) == PAIR_CLUSTER:
        # Pair 1 sends from two egress sources in one pool; the agent moves their addresses
        # with the VIP. The extra pairs (lab up --pairs) send from their nodes' addresses.
        sections["delivery"]["egress"] = {
            "sources": {
                name.split(".")[0]: {"address": str(address), "ehlo_name": name}
                for address, name in topology.egress
            },
            "pools": {"lab": {"sources": [n.split(".")[0] for _, n in topology.egress]}},
            "default_pool": "lab",
        }
    if tls_ca is not None:
        resolver = f"{topology.address(INTERNET)}:{RESOLVER_PORT}"
        sections["dns"] = {"nameservers": [resolver], "timeout": "2s", "dnssec": True}
        sections["tls_policy"] = {"ca_file": tls_ca}
    return sections


def agent_config(
    topology: Topology,
    node: str,
    node_dir: Path,
    *,
    credentials: Path,
    device: str,
    fence_command: Sequence[str],
    peer_secret: Path,
    fleet_reader: str = "",
) -> Sections:
    """The agent of ``node``: the lab's ensemble, the loop device, the VIP and the lab's fence,
    and the peer channel to the other node of its pair (heartbeats, failsafe).

    ``fleet_reader`` (a lab of several pairs): the digest id given READ on the pair's znodes.
    """
    pair = topology.pair_of(node)
    peers = {
        other: f"{topology.address(other)}:{PEER_PORT}"
        for other in topology.pair_nodes(pair)
        if other != node
    }
    reader = {"fleet_reader": fleet_reader} if fleet_reader else {}
    return {
        "agent": {
            "node": node,
            "cluster": pair,
            "zookeeper": topology.zookeeper_hosts,
            "session_timeout": "2s",
            "peer_address": f"{topology.address(node)}:{PEER_PORT}",
            "peers": peers,
            "peer_secret_file": peer_secret,
            "credentials": credentials,
            "relay_config": node_dir / "relay.toml",
            "state_dir": node_dir,
            "log_file": node_dir / "agent.log",
            **reader,
        },
        "storage": {
            "driver": "blockdev",
            "device": device,
            "mountpoint": node_dir / "mnt",
            "spool": "spool",
        },
        "vip": {"address": str(topology.pair_vip(pair)), "interface": INTERFACE},
        "fencing": {"commands": [list(fence_command)]},
        "probe": {"port": SMTP_PORT, "timeout": "5s"},
        # Open to the lab's hosts for reads (HAProxy's check, curl from the client); changes
        # need a token, which the lab does not set: they are refused (401), as they should be.
        "api": {
            "listen": f"{topology.address(node)}:{API_PORT}",
            "read_networks": [str(topology.subnet)],
        },
    }
