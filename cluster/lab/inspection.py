"""Looking into a lab from outside: commands in a host's namespace, holders, relays, status.

Everything here reads the kernel's state (namespaces, addresses, mounts, processes), the lab's
record and what its processes answer; nothing changes the lab.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cluster.lab import loopdev, netns, probes, processes
from cluster.lab.alert_sink import read_record
from cluster.lab.site import LabSite
from cluster.lab.topology import (
    ADMIN_PORT,
    CLIENT,
    INTERFACE,
    NODES,
    PAIR_CLUSTER,
    ZOOKEEPER_HOSTS,
    ZOOKEEPER_PORT,
)


class Inspection:
    """Runs commands in the lab's namespaces and reports who holds what."""

    def __init__(self, site: LabSite) -> None:
        self._site = site

    def exec(
        self, host: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``host``'s namespace and wait (output captured as text by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        check = bool(kwargs.pop("check", False))
        done: subprocess.CompletedProcess[str] = subprocess.run(
            netns.exec_argv(self._site.namespace(host), argv), check=check, **kwargs
        )
        return done

    def run_module(
        self, host: str, module: str, args: Sequence[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """``python -m module args`` of this checkout in ``host``'s namespace, and wait."""
        argv = self._site.module_argv(module, *args)
        return self.exec(host, argv, timeout=timeout, env=self._site.env())

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``host``'s namespace; the caller waits for it."""
        started: subprocess.Popen[bytes] = subprocess.Popen(
            netns.exec_argv(self._site.namespace(host), argv), **kwargs
        )
        return started

    def node_pids(self, node: str) -> list[int]:
        """Every process in ``node``'s namespace (any host of the lab may be named)."""
        namespace = self._site.namespace(node)
        return netns.pids_in([namespace]).get(namespace, [])

    def vip_holders(self, pair: str = PAIR_CLUSTER) -> list[str]:
        """The nodes of ``pair`` whose ``eth0`` carries its virtual IP now (more than one is
        split brain)."""
        self._site.check_pair(pair)
        vip = self._site.topology.pair_vip(pair).ip
        return [
            node
            for node in self._site.topology.pair_nodes(pair)
            if any(a.ip == vip for a in netns.addresses(self._site.namespace(node), INTERFACE))
        ]

    def egress_holders(self) -> dict[str, list[str]]:
        """Each egress address of the pair and the nodes whose ``eth0`` carries it."""
        held = {
            node: {a.ip for a in netns.addresses(self._site.namespace(node), INTERFACE)}
            for node in NODES  # pair 1's nodes: only it has egress addresses
        }
        return {
            str(address): [node for node in NODES if address in held[node]]
            for address, _ in self._site.topology.egress
        }

    def spool_mounted_on(self, pair: str = PAIR_CLUSTER) -> list[str]:
        """The nodes of ``pair`` on which some process sees its shared disk mounted."""
        loop_device = self._site.pair_loop_device(pair)
        device = loopdev.device_number(loop_device) if loop_device else None
        if device is None:
            return []
        return [
            node
            for node in self._site.topology.pair_nodes(pair)
            if any(loopdev.mounted_in(pid, device) for pid in self.node_pids(node))
        ]

    def deliveries(self) -> list[dict[str, Any]]:
        """Every line the sink has recorded (one per delivered recipient), in order."""
        return read_record(self._site.sink_record)

    def delivered_ids(self) -> set[str]:
        """The ``X-Lab-Id`` values the sink has recorded."""
        return {str(d["x_lab_id"]) for d in self.deliveries() if d.get("x_lab_id")}

    def relay_state(self, node: str) -> str | None:
        """What ``node``'s relay says it is (standby, active, ...); None when it does not answer."""
        answer = probes.http_json(
            self._site.namespace(node), self._site.address(node), ADMIN_PORT, "/health/live"
        )
        state = answer.get("state") if answer else None
        return str(state) if state is not None else None

    def relay_ready(self, node: str) -> bool | None:
        """What ``node``'s relay says of its readiness; None when it does not answer."""
        answer = probes.http_json(
            self._site.namespace(node), self._site.address(node), ADMIN_PORT, "/health/ready"
        )
        ready = answer.get("ready") if answer else None
        return bool(ready) if ready is not None else None

    def cluster_status(
        self, timeout: float = 15.0, pair: str = PAIR_CLUSTER
    ) -> dict[str, Any] | None:
        """``hamta cluster status --json`` (of ``pair``) run from the client namespace; None if
        it fails."""
        config = self._site.directory / self._site.topology.pair_nodes(pair)[0] / "agent.toml"
        if not config.exists():
            return None
        argv = self._site.module_argv(
            "hamtactl", "cluster", "status", "--json", "--config", str(config)
        )
        try:
            done = self.exec(CLIENT, argv, timeout=timeout, env=self._site.env())
        except subprocess.TimeoutExpired:
            return None
        if done.returncode != 0:
            return None
        try:
            parsed = json.loads(done.stdout)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None

    def status(self, *, cluster: bool = True) -> dict[str, Any]:
        """The lab as data: hosts with their processes, ZooKeeper, VIP, spool and roles."""
        site = self._site
        found = site.read_record()
        topology = site.topology
        pids = netns.pids_in(topology.namespaces)
        hosts: dict[str, Any] = {}
        for host in topology.hosts:
            namespace = topology.namespace(host)
            hosts[host] = {
                "namespace": namespace,
                "address": str(topology.address(host)),
                "exists": netns.exists(namespace),
                "processes": [
                    {
                        "pid": pid,
                        "what": describe(processes.cmdline(pid)),
                        "cmdline": processes.cmdline(pid),
                    }
                    for pid in pids.get(namespace, [])
                ],
            }
        zookeeper = {
            host: probes.zookeeper_mode(
                topology.namespace(host), str(topology.address(host)), ZOOKEEPER_PORT
            )
            if hosts[host]["exists"]
            else None
            for host in ZOOKEEPER_HOSTS
        }
        up = found is not None
        return {
            "directory": str(site.directory),
            "up": up,
            "prefix": topology.prefix,
            "subnet": str(topology.subnet),
            "vip": str(topology.vip),
            "zookeeper_hosts": topology.zookeeper_hosts,
            "credentials": str(site.credentials_path),
            "loop_device": found.loop_device if found else None,
            "hosts": hosts,
            "zookeeper": zookeeper,
            "vip_holders": self.vip_holders(),
            "egress_holders": self.egress_holders(),
            "spool_mounted_on": self.spool_mounted_on() if up else [],
            "relays": {node: self.relay_state(node) for node in topology.nodes},
            "cluster": self.cluster_status() if up and cluster else None,
            # Every pair (``lab up --pairs N``): its nodes, virtual IP and who holds it.
            "pairs": {
                pair: {
                    "nodes": list(topology.pair_nodes(pair)),
                    "vip": str(topology.pair_vip(pair)),
                    "vip_holders": self.vip_holders(pair),
                    "spool_mounted_on": self.spool_mounted_on(pair) if up else [],
                }
                for pair in topology.pair_names
            },
        }


def describe(argv: Iterable[str]) -> str:
    """A short name for a lab process: zookeeper, dnsmasq, sink, agent, relay, or its program."""
    args = list(argv)
    if not args:
        return "?"
    joined = " ".join(args)
    if "QuorumPeerMain" in joined:
        return "zookeeper"
    if "cluster.lab.sink" in args:
        return "sink"
    if "cluster.lab.client" in args:
        return "client"
    if "agent" in args and "hamtactl" in args:
        return "agent"
    if "serve" in args:
        return "relay"
    return Path(args[0]).name
