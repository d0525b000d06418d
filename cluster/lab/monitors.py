"""The lab's check locations: a ``hamta monitor`` on the internet host and one on the client.

Each watches the service as its clients see it, from its own namespace: the VIP's SMTP (the
service check), each node's own address on port 25 (the passive node's refusals are "standby",
the cluster says which is passive), each node's relay admin endpoint (health and queue), the
round trip of a probe message through the VIP to the internet host's probe mailbox, and the
lab's DNS; each knows the cluster through the lab's
ZooKeeper and credentials (``[cluster]``) and publishes its verdicts there under its location.
They start in the background (``lab up`` does not wait for them) and are recorded in
``lab.json`` like every process of the lab, so ``down`` ends them. ``verdicts`` reads each
one's store with ``hamta monitor status --json`` (the lab never imports the monitor).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Final

from cluster.lab import processes
from cluster.lab.alert_sink import read_record
from cluster.lab.configs import render_toml
from cluster.lab.site import LabError, LabSite, Launcher
from cluster.lab.topology import (
    ADMIN_PORT,
    ALERTS_PORT,
    CLIENT,
    DNS_PORT,
    DOMAIN,
    INTERNET,
    MAIL_DOMAINS,
    NODES,
    PROBE_DOMAIN,
    SMTP_PORT,
)

LOCATIONS: Final = (INTERNET, CLIENT)
STOP_GRACE: Final = 5.0  # a monitor's graceful stop ends its ZooKeeper session: its znode goes
_FAST: Final = {"interval": "1s", "timeout": "0.9s", "failure_threshold": 1, "success_threshold": 1}


def monitor_dir(site: LabSite, location: str) -> Path:
    return site.directory / f"monitor-{location}"


def monitor_config(site: LabSite, location: str, failure_threshold: int = 1) -> str:
    """``monitor.toml`` of the monitor at ``location`` (a host of the lab); a check is down
    after ``failure_threshold`` failures in a row."""
    directory = monitor_dir(site, location)
    topology = site.topology
    head = render_toml(
        {
            "server": {"listen": "127.0.0.1:8026"},
            "store": {"path": directory / "monitor.sqlite"},
            "log": {"file": directory / "monitor.log"},
            "dns": {"nameservers": [f"{site.address(INTERNET)}:{DNS_PORT}"]},
            "cluster": {
                "zookeeper": topology.zookeeper_hosts,
                "cluster": "lab",
                "credentials": site.credentials_path,
                "poll_every": "1s",
                "publish_every": "5s",
                "failover_grace": "10s",
            },
        }
    )
    vip = str(topology.vip.ip)
    checks: list[dict[str, Any]] = [
        {"name": "vip-smtp", "kind": "smtp", "host": vip, "port": SMTP_PORT, "service": True},
        *(
            {"name": f"{node}-smtp", "kind": "smtp", "host": site.address(node), "node": node}
            for node in NODES
        ),
        {"name": "dns", "kind": "dns", "domain": MAIL_DOMAINS[0], "interval": "5s"},
        # Each relay's admin endpoint (on its node's address, cluster.lab.configs): readiness,
        # queue depth, deferrals; a warm standby answers 503 "standby", which is no outage.
        *(
            {
                "name": f"{node}-relay",
                "kind": "relay",
                "url": f"http://{site.address(node)}:{ADMIN_PORT}",
                "node": node,
                "interval": "2s",
                "timeout": "1.5s",
            }
            for node in NODES
        ),
        round_trip_check(site, location),
    ]
    defaults = {**_FAST, "failure_threshold": failure_threshold}
    body = "".join(
        "[[checks]]\n" + render_toml({"_": {**defaults, **check}}).split("\n", 1)[1]
        for check in checks
    )
    # Every incident goes at once to the lab's alert receiver on the internet host, the URL
    # naming this location (cluster.lab.alert_sink): the chaos report times them.
    alerting = render_toml(
        {
            "notifiers.lab": {"kind": "webhook", "url": alert_url(site, location)},
            "alerting": {"tick": "0.5s", "retry_wait": "0.5s"},
        }
    )
    escalation = '[[escalation]]\nafter = "0s"\nnotifiers = ["lab"]\n\n'
    return f"location = {json.dumps(location)}\n{head}{alerting}{escalation}{body}"


def alert_url(site: LabSite, location: str) -> str:
    return f"http://{site.address(INTERNET)}:{ALERTS_PORT}/{location}"


def read_alerts(site: LabSite) -> list[dict[str, Any]]:
    """The monitors' notifications the alert receiver recorded, oldest first."""
    return read_record(site.alert_record)


def round_trip_check(site: LabSite, location: str) -> dict[str, Any]:
    """A probe through the VIP to ``LOCATION@probe.lab.test``: the sink's probe mailbox on the
    internet host (cluster.lab.sink), a folder per location, so that each monitor removes only
    its own probes. Followed in the mailbox only: the relay's log is on whichever node is
    active. Lab-suited times: a probe every 10 s, delivered within 8 s (the relay retries after
    1 s in the lab), two failures in a row before it is down (a failover can hold one probe)."""
    return {
        "name": "round-trip",
        "kind": "round_trip",
        "host": str(site.topology.vip.ip),
        "port": SMTP_PORT,
        "sender": f"monitor-{location}@{DOMAIN}",
        "recipient": f"{location}@{PROBE_DOMAIN}",
        "mailbox": site.probe_mailbox / location,
        "interval": "10s",
        "timeout": "8s",
        "degraded_after": "3s",
        "poll": "200ms",
        "failure_threshold": 2,
    }


class Monitors:
    """Writes the monitors' configurations, starts them, and reads their verdicts."""

    def __init__(self, site: LabSite, launcher: Launcher) -> None:
        self._site = site
        self._launcher = launcher

    def start(self, failure_threshold: int = 1) -> None:
        """Start the alert receiver and both monitors in their namespaces, without waiting."""
        site = self._site
        receiver = site.module_argv(
            "cluster.lab.alert_sink",
            "--listen",
            f"{site.address(INTERNET)}:{ALERTS_PORT}",
            "--record",
            str(site.alert_record),
        )
        site.alert_record.parent.mkdir(parents=True, exist_ok=True)
        site.alert_record.touch()
        try:
            self._launcher.spawn(
                "alerts",
                INTERNET,
                receiver,
                site.alert_record.with_suffix(".out"),
                env=site.env(),
                cwd=site.alert_record.parent,
            )
        except OSError as exc:
            raise LabError(f"cannot start the alert receiver on {INTERNET}: {exc}") from None
        for location in LOCATIONS:
            directory = monitor_dir(site, location)
            directory.mkdir(parents=True, exist_ok=True)
            # The round trip's folder of the probe mailbox: there before the first probe lands.
            (site.probe_mailbox / location).mkdir(parents=True, exist_ok=True)
            config = directory / "monitor.toml"
            config.write_text(monitor_config(site, location, failure_threshold))
            argv = site.module_argv("hamtactl", "monitor", "run", "--config", str(config))
            try:
                self._launcher.spawn(
                    f"monitor-{location}",
                    location,
                    argv,
                    directory / "monitor.out",
                    env=site.env(),
                    cwd=directory,
                )
            except OSError as exc:
                raise LabError(f"cannot start the monitor on {location}: {exc}") from None

    def stop(self) -> None:
        """End both monitors (their znodes go with their sessions) and the alert receiver, which
        ``start`` starts again; their stores and records stay."""
        found = self._site.read_record()
        records = found.processes if found is not None else ()
        names = {"alerts"} | {f"monitor-{location}" for location in LOCATIONS}
        pids = [record.pid for record in processes.live(records) if record.name in names]
        processes.end(pids, STOP_GRACE)
        self._launcher.reap()

    def verdicts(self, timeout: float = 15.0) -> dict[str, Any]:
        """Each location's checks as ``hamta monitor status --json`` reads them from its store."""
        site = self._site
        found: dict[str, Any] = {}
        for location in LOCATIONS:
            config = monitor_dir(site, location) / "monitor.toml"
            if not config.exists():
                found[location] = None
                continue
            argv = site.module_argv("hamtactl", "monitor", "status", "--json", "--config")
            try:
                done = subprocess.run(
                    [*argv, str(config)],
                    env=site.env(),
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                )
                found[location] = json.loads(done.stdout) if done.returncode == 0 else None
            except (OSError, subprocess.TimeoutExpired, ValueError):
                found[location] = None
        return found


def format_verdicts(verdicts: dict[str, Any]) -> list[str]:
    """One table: a row per check, a column per location."""
    locations = list(verdicts)
    names: list[str] = []
    for rows in verdicts.values():
        for row in rows or []:
            if row["name"] not in names:
                names.append(row["name"])
    if not names:
        return ["monitors: no verdicts yet (" + ", ".join(locations) + ")"]
    width = max(len(name) for name in names) + 2
    lines = ["monitors:", " " * (width + 2) + "".join(f"{loc:<10}" for loc in locations)]
    for name in names:
        cells = []
        for location in locations:
            states = {row["name"]: row["state"] for row in verdicts[location] or []}
            cells.append(f"{states.get(name, '-'):<10}")
        lines.append(f"  {name:<{width}}" + "".join(cells))
    return lines + _round_trips(verdicts)


def _round_trips(verdicts: dict[str, Any]) -> list[str]:
    """The round trip's last probe from each location: how far it went, and in what time."""
    lines = []
    for location, rows in verdicts.items():
        for row in rows or []:
            if row.get("kind") != "round_trip":
                continue
            last = row.get("last") or {}
            facts = last.get("facts") or {}
            steps = [
                f"{step} {facts[key]:.2f}s"
                for step, key in (
                    ("accepted", "accepted_seconds"),
                    ("arrived", "arrived_seconds"),
                )
                if isinstance(facts.get(key), int | float)
            ]
            shown = ", ".join(steps)
            if row["state"] not in ("up", "degraded") or not shown:
                # Where the probe stopped: refused, queued, deferred, never arrived.
                shown = "; ".join(p for p in (shown, str(last.get("detail") or "")) if p)
            lines.append(
                f"  round trip from {location}: {row['state']} ({shown or 'no probe yet'})"
            )
    return lines
