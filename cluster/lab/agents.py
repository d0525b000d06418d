"""The pair's agents: their configuration, their start, and which node is active.

Each node's agent (``hamta agent``) runs under ``ip netns exec`` in its node's namespace, which
also gives it a private mount namespace as on a machine of its own; it starts its relay, and the
pair elects its active node through ZooKeeper. The active node is the one that holds the virtual
IP alone and answers SMTP on it from the client.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from cluster.coordination_layout import Credentials
from cluster.lab import configs, probes
from cluster.lab.inspection import Inspection
from cluster.lab.site import AGENT_PREFIX, LabError, LabSite, Launcher, log_tail
from cluster.lab.submission import SubmissionFiles
from cluster.lab.tls_site import TlsSite
from cluster.lab.topology import CLIENT, DOMAIN, INTERFACE, INTERNET, PAIR_CLUSTER, SMTP_PORT


class Agents:
    """Configures and starts the nodes' agents, and waits for one node to be active."""

    def __init__(self, site: LabSite, launcher: Launcher, inspection: Inspection) -> None:
        self._site = site
        self._launcher = launcher
        self._inspection = inspection

    def fence_command(self, pair: str = PAIR_CLUSTER) -> list[str]:
        """The command ``pair``'s agents run to fence their peer (``{peer}`` is filled in).

        It powers the peer off: every process of it killed, the VIP removed; ``start_agent``
        powers it on again. ``cluster.lab.fence`` imports only the standard library: the fence
        is on the failover's critical path.
        """
        site = self._site
        loop_device = site.pair_loop_device(pair)
        return site.module_argv(
            "cluster.lab.fence",
            "--namespace",
            f"{site.topology.prefix}-{{peer}}",
            "--vip",
            str(site.topology.pair_vip(pair)),
            # Pair 1's egress addresses go with its VIP (the extra pairs have none).
            *(
                arg
                for address, _ in (site.topology.egress if pair == PAIR_CLUSTER else ())
                for arg in ("--also", str(address))
            ),
            "--interface",
            INTERFACE,
            *(["--device", loop_device] if loop_device else []),
        )

    def write_node_configs(self, node: str) -> None:
        """``node``'s relay.toml and agent.toml (the lab's own), and its mount point."""
        site = self._site
        node_dir = site.directory / node
        (node_dir / "mnt").mkdir(parents=True, exist_ok=True)
        relay = {
            section: dict(keys)
            for section, keys in configs.relay_config(
                site.topology,
                node,
                node_dir,
                node_dir / "mnt" / "spool",
                tls_ca=TlsSite(site.directory / INTERNET / "tls").ca_cert,
            ).items()
        }
        # Submission on 587 and 465 besides 25, one password file for the pair (a probe
        # account in <lab dir>/submission-account.json): the lab shows AUTH work and refuse.
        files = SubmissionFiles(site.directory)
        files.ensure([f"{name}.{DOMAIN}" for name in site.topology.nodes])
        for section, keys in files.relay_sections(SMTP_PORT).items():
            relay.setdefault(section, {}).update(keys)
        relay["smtp"].pop("listen", None)  # the listeners name their addresses
        (node_dir / "relay.toml").write_text(configs.render_toml(relay))
        self.configure(node, {})

    def configure(self, node: str, overrides: configs.Sections) -> Path:
        """Write ``node``'s agent configuration: the lab's, with ``overrides`` section by section.

        A section's keys replace the lab's (``{"fencing": {}}`` keeps the section as it is, a
        ``None`` value drops the key, e.g. ``{"fencing": {"commands": None}}`` for no STONITH).
        It takes effect when the agent starts next.
        """
        site = self._site
        pair = site.pair_of(node)
        node_dir = site.directory / node
        # With several pairs each pair's root was made by the administrator with READ for the
        # fleet's reader, and the agents keep that ACL on what they create (docs/fleet.md).
        reader = (
            Credentials.from_file(site.reader_credentials_path).digest_id
            if site.topology.pairs > 1
            else ""
        )
        agent = configs.agent_config(
            site.topology,
            node,
            node_dir,
            credentials=site.pair_credentials(pair),
            device=site.pair_loop_device(pair),
            fence_command=self.fence_command(pair),
            peer_secret=site.pair_peer_secret(pair),
            fleet_reader=reader,
        )
        merged = {section: dict(keys) for section, keys in agent.items()}
        for section, keys in overrides.items():
            target = merged.setdefault(section, {})
            for key, value in keys.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value
        path = node_dir / "agent.toml"
        path.write_text(configs.render_toml(merged))
        return path

    def start(self, node: str, env: Mapping[str, str] | None = None) -> None:
        """Start ``node``'s agent (which starts its relay); LabError if the node still runs.

        ``env`` adds to the agent's environment (e.g. libfaketime's, for a skewed clock).
        """
        site = self._site
        site.check_node(node)
        site.current_record()
        running = self._inspection.node_pids(node)
        deadline = time.monotonic() + 2.0
        while running and time.monotonic() < deadline:
            # A look into the namespace from outside (pyroute2's NetNS helper, as the split-brain
            # sampler uses) is a process there for a few milliseconds: not a node still running.
            time.sleep(0.05)
            running = self._inspection.node_pids(node)
        if running:
            raise LabError(f"{node} still runs processes {running}; kill it first")
        node_dir = site.node_dir(node)
        argv = site.module_argv("hamtactl", "agent", "--config", str(node_dir / "agent.toml"))
        try:
            self._launcher.spawn(
                f"{AGENT_PREFIX}{node}",
                node,
                argv,
                node_dir / "agent.out",
                env={**site.env(), **(env or {})},
                cwd=node_dir,
            )
        except OSError as exc:
            raise LabError(f"cannot start the agent of {node}: {exc}") from None

    def active_node(self, timeout: float = 2.0, *, pair: str = PAIR_CLUSTER) -> str | None:
        """The node of ``pair`` that holds its virtual IP alone and answers SMTP on it from the
        client."""
        holders = self._inspection.vip_holders(pair)
        if len(holders) != 1:
            return None
        site = self._site
        vip = str(site.topology.pair_vip(pair).ip)
        greeting = probes.smtp_greeting(site.namespace(CLIENT), vip, SMTP_PORT, timeout)
        return holders[0] if greeting else None

    def wait_active(
        self, timeout: float = 30.0, *, other_than: str | None = None, pair: str = PAIR_CLUSTER
    ) -> str:
        """Wait until one node of ``pair`` is active (and, with ``other_than``, not that one);
        return it."""
        site = self._site
        site.check_pair(pair)
        nodes = site.topology.pair_nodes(pair)

        def check() -> str | None:
            records = site.current_record().processes
            agents = [p for p in records if p.name in {f"{AGENT_PREFIX}{n}" for n in nodes}]
            if agents and not any(p.alive() for p in agents):
                logs = "\n".join(f"{p.log}:\n{log_tail(p.log)}" for p in agents)
                raise LabError(f"every agent has exited:\n{logs}")
            node = self.active_node(pair=pair)
            return node if node is not None and node != other_than else None

        node = probes.wait_for(check, timeout, interval=0.2)
        if node is None:
            logs = "\n".join(
                f"{name}: {site.node_dir(name) / 'agent.log'}:\n"
                f"{log_tail(site.node_dir(name) / 'agent.log', 8)}"
                for name in nodes
            )
            raise LabError(
                f"no node of {pair} became active within {timeout:g}s (VIP on "
                f"{self._inspection.vip_holders(pair) or 'no'} node); agent logs:\n{logs}"
            )
        return node
