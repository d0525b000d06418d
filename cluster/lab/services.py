"""The lab's shared services: three ZooKeeper servers, and the internet host's DNS and sink.

The ZooKeeper servers are started one by one without waiting (their JVMs warm up while the rest
of the lab is built), then :meth:`Services.wait` waits for a leader and for the DNS and the sink
to answer from the client's namespace.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, Final

from cluster.lab import dns, haproxy, probes, processes, tls_site
from cluster.lab.dnssec import ZoneError, unbound_argv
from cluster.lab.processes import ProcessRecord
from cluster.lab.site import LabError, LabSite, Launcher, log_tail
from cluster.lab.topology import (
    CLIENT,
    DNS_PORT,
    INTERNET,
    MAIL_DOMAINS,
    PROBE_DOMAIN,
    RESOLVER_PORT,
    SMTP_PORT,
    ZOOKEEPER_HOSTS,
    ZOOKEEPER_PORT,
)
from cluster.zookeeper import ServerSpec, ZooKeeperEnsemble, ZooKeeperError

TICK_MS: Final = 500  # ZooKeeper's tick: 2 s sessions are within its 2..20 ticks


class Services:
    """Starts and waits for the lab's services; holds the ZooKeeper servers it started."""

    def __init__(self, site: LabSite, launcher: Launcher) -> None:
        self._site = site
        self._launcher = launcher
        # Only in the process that ran ``up``: the servers' handles are its children.
        self._ensemble: ZooKeeperEnsemble | None = None

    @property
    def ensemble(self) -> ZooKeeperEnsemble:
        """The lab's ZooKeeper servers, in the process that brought the lab up."""
        if self._ensemble is None:
            raise LabError("the ZooKeeper servers belong to the process that ran 'lab up'")
        return self._ensemble

    def start_zookeeper(self) -> None:
        """Start the three servers, each in its host's namespace, and record them."""
        site = self._site
        topology = site.topology
        specs = [
            ServerSpec(index + 1, str(topology.address(host)), ZOOKEEPER_PORT)
            for index, host in enumerate(ZOOKEEPER_HOSTS)
        ]
        namespaces = {
            index + 1: topology.namespace(host) for index, host in enumerate(ZOOKEEPER_HOSTS)
        }
        ensemble = ZooKeeperEnsemble(
            specs, site.directory / "zookeeper", tick_ms=TICK_MS, netns=namespaces
        )
        self._ensemble = ensemble
        # Each server is started on its own (not ensemble.start(), which waits): the JVMs warm
        # up while the rest of the lab is built.
        for host, server in zip(ZOOKEEPER_HOSTS, ensemble.servers, strict=True):
            try:
                server.start()
            except ZooKeeperError as exc:
                raise LabError(str(exc)) from None
            pid = server.pid
            started = processes.start_time(pid) if pid is not None else None
            if pid is None or started is None:
                raise LabError(f"ZooKeeper on {host} exited at once:\n{server.log_tail()}")
            site.save(
                site.current_record().with_process(
                    ProcessRecord(
                        host, host, pid, started, tuple(server.command()), str(server.log_path)
                    )
                )
            )

    def start_internet(self) -> None:
        """Start the internet host's DNS (dnsmasq) and mail sink."""
        site = self._site
        host = INTERNET
        address = site.address(host)
        directory = site.directory / host
        directory.mkdir(parents=True, exist_ok=True)
        try:
            tls = tls_site.prepare(directory / "tls", site.topology)
        except ZoneError as exc:
            raise LabError(f"cannot make the lab's TLS policies: {exc}") from None
        config = directory / "dnsmasq.conf"
        config.write_text(dns.dnsmasq_config(site.topology))
        dns_log = directory / "dnsmasq.log"
        argv = dns.dnsmasq_argv(config, address, DNS_PORT, dns_log)
        try:
            self._launcher.spawn("dns", host, argv, directory / "dnsmasq.out", cwd=directory)
            sink = site.module_argv(
                "cluster.lab.sink",
                "--listen",
                f"{address}:{SMTP_PORT}",
                "--record",
                str(site.sink_record),
                # The monitors' round-trip probes land there (cluster.lab.monitors).
                "--mailbox",
                str(site.probe_mailbox),
                "--mailbox-domain",
                PROBE_DOMAIN,
                "--tls-cert",
                str(tls.sink_chain),
                "--tls-key",
                str(tls.sink_key),
            )
            site.sink_record.touch()
            self._launcher.spawn(
                "sink", host, sink, directory / "sink.log", env=site.env(), cwd=directory
            )
            self._launcher.spawn(
                "resolver", host, unbound_argv(tls.unbound_conf), directory / "unbound.log"
            )
            policy_host = site.module_argv(
                "cluster.lab.policy_host",
                "--listen",
                f"{address}:{tls_site.POLICY_PORT}",
                "--cert",
                str(tls.policy_cert),
                "--key",
                str(tls.policy_key),
                "--policies",
                str(tls.policies),
            )
            self._launcher.spawn(
                "policyhost", host, policy_host, directory / "policy_host.log", env=site.env()
            )
        except OSError as exc:
            raise LabError(f"cannot start the internet host's services: {exc}") from None

    def start_haproxy(self, deadline: float) -> None:
        """Start HAProxy on the client host in front of both nodes (``cluster.lab.haproxy``),
        and wait until it accepts connections."""
        site = self._site
        directory = site.directory / CLIENT
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "haproxy.cfg"
        config.write_text(haproxy.haproxy_config(site.topology))
        log = directory / "haproxy.log"
        try:
            self._launcher.spawn("haproxy", CLIENT, haproxy.haproxy_argv(config), log)
        except OSError as exc:
            raise LabError(f"cannot start haproxy: {exc}") from None
        client = site.namespace(CLIENT)

        def listening() -> bool:
            site.require_alive("haproxy")
            return probes.tcp_open(client, site.address(CLIENT), haproxy.HAPROXY_PORT)

        if not probes.wait_for(listening, max(0.0, deadline - time.monotonic())):
            raise LabError(f"haproxy does not listen; log:\n{log_tail(log)}")

    def wait(self, deadline: float) -> None:
        """Wait until ZooKeeper has a leader and the DNS and the sink answer from the client."""
        site = self._site
        client = site.namespace(CLIENT)
        inet = site.address(INTERNET)
        ensemble = self.ensemble
        try:
            for server in ensemble.servers:
                server.wait_serving(max(0.0, deadline - time.monotonic()))
        except ZooKeeperError as exc:
            raise LabError(f"ZooKeeper did not come up: {exc}") from None
        leader = probes.wait_for(ensemble.leader, max(0.0, deadline - time.monotonic()))
        if leader is None:
            raise LabError("the ZooKeeper ensemble serves but elected no leader")

        def answers(what: str, check: Callable[[], Any], name: str) -> None:
            def alive_and(check: Callable[[], Any] = check) -> Any:
                site.require_alive(name)
                return check()

            if not probes.wait_for(alive_and, max(0.0, deadline - time.monotonic())):
                process = site.recorded_process(name)
                log = process.log if process else ""
                raise LabError(f"{what} does not answer from the client; log:\n{log_tail(log)}")

        answers(
            f"the DNS server on {inet}:{DNS_PORT}",
            lambda: probes.dns_answer(client, inet, DNS_PORT, MAIL_DOMAINS[0], "MX"),
            "dns",
        )
        answers(
            f"the validating resolver on {inet}:{RESOLVER_PORT}",
            lambda: probes.dns_answer(client, inet, RESOLVER_PORT, tls_site.DANE_DOMAIN, "MX"),
            "resolver",
        )
        answers(
            f"the MTA-STS policy host on {inet}:{tls_site.POLICY_PORT}",
            lambda: probes.tcp_open(client, inet, tls_site.POLICY_PORT),
            "policyhost",
        )
        answers(
            f"the sink on {inet}:{SMTP_PORT}",
            lambda: probes.smtp_greeting(client, inet, SMTP_PORT),
            "sink",
        )

    def stop(self) -> None:
        """Forget the ZooKeeper servers (``down`` has ended them already: this only reaps)."""
        if self._ensemble is not None:
            with contextlib.suppress(ZooKeeperError):
                self._ensemble.stop()
            self._ensemble = None
