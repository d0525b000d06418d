"""ZooKeeper servers for the tests: cluster/zookeeper.py with loopback addresses and free ports.

A standalone server listens on 127.0.0.1; the three servers of an ensemble on 127.0.0.11 to
127.0.0.13, each on its own address so that killing one closes only its ports. Ticks are short
(200 ms) so that sessions of 2 s are allowed and elections take well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from cluster.zookeeper import ServerSpec, ZooKeeperEnsemble

from .ports import free_port

TEST_TICK_MS: Final = 200
STANDALONE_HOST: Final = "127.0.0.1"
ENSEMBLE_HOSTS: Final = ("127.0.0.11", "127.0.0.12", "127.0.0.13")


def _spec(server_id: int, address: str) -> ServerSpec:
    ports: list[int] = []
    while len(ports) < 3:  # a port just released may be handed out again: keep three distinct
        port = free_port(address)
        if port not in ports:
            ports.append(port)
    client, quorum, election = ports
    return ServerSpec(server_id, address, client, quorum, election)


def standalone(base_dir: Path, *, tick_ms: int = TEST_TICK_MS) -> ZooKeeperEnsemble:
    """One server on 127.0.0.1 (not started)."""
    return ZooKeeperEnsemble([_spec(1, STANDALONE_HOST)], base_dir, tick_ms=tick_ms)


def three_servers(base_dir: Path, *, tick_ms: int = TEST_TICK_MS) -> ZooKeeperEnsemble:
    """An ensemble of three on 127.0.0.11 to 127.0.0.13 (not started)."""
    specs = [_spec(index, address) for index, address in enumerate(ENSEMBLE_HOSTS, start=1)]
    return ZooKeeperEnsemble(specs, base_dir, tick_ms=tick_ms)
