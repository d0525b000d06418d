"""HAProxy in the lab: Debian's ``haproxy`` on the client host, in front of both nodes' SMTP.

TCP mode for the mail, and each agent's HTTP API for the health check (``option httpchk GET
/active``): only the node that serves answers 200, so HAProxy sends clients there and, after a
failover, to the new active node within its check interval. ``measure_switch`` times that: from
the kill of the active node to the first SMTP greeting through HAProxy from the other one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cluster.lab import probes
from cluster.lab.topology import API_PORT, CLIENT, DOMAIN, NODES, SMTP_PORT, Topology

#: Where HAProxy takes SMTP on the client host (25 is the client's own business).
HAPROXY_PORT: Final = 2525
#: HAProxy's check interval in the lab: short, so that its switch is seen quickly.
CHECK_INTERVAL_MS: Final = 200


def haproxy_config(topology: Topology) -> str:
    """The configuration: a TCP front end on the client, the nodes checked on their API."""
    servers = "\n".join(
        f"    server {node} {topology.address(node)}:{SMTP_PORT} "
        f"check port {API_PORT} addr {topology.address(node)}"
        for node in NODES
    )
    return f"""global
    log stdout format raw local0 info
    maxconn 2000

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 60s
    timeout server 60s

frontend smtp
    bind {topology.address(CLIENT)}:{HAPROXY_PORT}
    default_backend relays

backend relays
    mode tcp
    option httpchk GET /active
    http-check expect status 200
    # One failed check takes a node out and closes its sessions; one good one brings it in.
    default-server inter {CHECK_INTERVAL_MS}ms fall 1 rise 1 on-marked-down shutdown-sessions
{servers}
"""


def haproxy_argv(config: Path) -> list[str]:
    """HAProxy in the foreground (``-db``): the lab's launcher records and ends it."""
    return ["haproxy", "-db", "-f", str(config)]


@dataclass(frozen=True, slots=True)
class Switch:
    """One failover seen through HAProxy."""

    old: str
    new: str
    active_s: float  # from the kill until the new node's /active answered 200
    switch_s: float  # from the kill until HAProxy's first greeting came from the new node


def greeting_node(topology: Topology, namespace: str) -> str | None:
    """Which node greets an SMTP client through HAProxy (None: nobody)."""
    line = probes.smtp_greeting(namespace, str(topology.address(CLIENT)), HAPROXY_PORT, 1.0)
    if line is None:
        return None
    return next((node for node in NODES if f" {node}.{DOMAIN}" in line), None)


def serving(topology: Topology, namespace: str, node: str) -> bool:
    """Whether ``node``'s agent answers 200 on /active (its body says ``serving``)."""
    body = probes.http_json(namespace, str(topology.address(node)), API_PORT, "/active", 1.0)
    return bool(body and body.get("serving"))


def measure_switch(
    topology: Topology,
    namespace: str,
    kill: Callable[[str], None],
    old: str,
    *,
    timeout: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> Switch:
    """Kill ``old`` (the active node) and time the new node's /active and HAProxy's switch."""
    new = next(node for node in NODES if node != old)
    started = clock()
    kill(old)
    active_s: float | None = None
    while clock() - started < timeout:
        if active_s is None and serving(topology, namespace, new):
            active_s = clock() - started
        if greeting_node(topology, namespace) == new:
            switch_s = clock() - started
            return Switch(old, new, active_s if active_s is not None else switch_s, switch_s)
        time.sleep(0.02)
    raise TimeoutError(f"HAProxy did not send clients to {new} within {timeout:g}s")
