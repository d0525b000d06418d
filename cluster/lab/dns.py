"""The lab's DNS: dnsmasq on the "internet" host, answering for the lab's mail domains only.

Each mail domain (and the monitors' probe domain) has an MX pointing at ``mx.lab.test``, whose
A record is the internet host (where the sink listens). Every host of the lab also gets
``<host>.lab.test``. dnsmasq reads no resolv.conf and no hosts file, and ``address=/#/`` makes
every other name NXDOMAIN instead of a query forwarded upstream: nothing the lab's relays ask
can leave the lab.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from cluster.lab.topology import (
    DOMAIN,
    INTERNET,
    MAIL_DOMAINS,
    MX_NAME,
    PROBE_DOMAIN,
    Topology,
)

DNSMASQ: Final = "/usr/sbin/dnsmasq"


def dnsmasq_config(topology: Topology) -> str:
    """The text of the lab's dnsmasq configuration file."""
    lines = [
        "# hamta lab: answers only for the lab's names; everything else is NXDOMAIN.",
        "no-resolv",
        "no-hosts",
        "address=/#/",
    ]
    lines += [f"mx-host={domain},{MX_NAME},10" for domain in (*MAIL_DOMAINS, PROBE_DOMAIN)]
    lines.append(f"host-record={MX_NAME},{topology.address(INTERNET)}")
    lines += [f"host-record={host}.{DOMAIN},{topology.address(host)}" for host in topology.hosts]
    # A host-record brings its PTR too: the egress names are forward-confirmed.
    lines += [f"host-record={name},{address}" for address, name in topology.egress]
    return "\n".join(lines) + "\n"


def dnsmasq_argv(config: Path, listen: str, port: int, log: Path) -> list[str]:
    """dnsmasq's command line: in the foreground (its pid is ours to end), on ``listen`` only."""
    return [
        DNSMASQ,
        "--keep-in-foreground",
        f"--conf-file={config}",
        "--bind-interfaces",
        f"--listen-address={listen}",
        f"--port={port}",
        "--pid-file=",
        f"--log-facility={log}",
        "--log-queries",
    ]
