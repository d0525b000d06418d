#!/usr/bin/env python3
"""The monitor: time from a fault to its alert at a webhook receiver, and the cost of 200 checks.

What is measured
    One real ``hamta monitor run`` process watches four things, each by its own check, with a
    webhook notifier (escalation step at 0 s) pointed at a receiver run by this script:

    * **port blocked**: an SMTP peer in the network namespace ``hh5mon`` (a veth pair on
      198.19.225.0/24); the fault is an nftables rule there dropping port 25 (a firewall
      change: connections hang, nothing refuses). Without root or nft, the peer is stopped
      instead (a closed port) and the output says so.
    * **certificate expired**: a STARTTLS peer restarted with an expired certificate (tls check).
    * **MX changed**: dnsmasq restarted with the domain's MX pointing at an exchange that has no
      address (dns check). A change to an exchange that resolves is a change event, not an
      alert: the dns check stays up.
    * **relay stopped**: a real ``hamta serve`` killed (SIGKILL; smtp check on its port).

    The four faults are made together once every check is up; each figure is the time from
    its fault to the first ``trigger`` POST naming its check, set against interval x threshold
    (the checks' own figures; the alerting tick, 1 s by default, comes on top).

    Then the cost: one monitor running ``--checks`` smtp and tls checks (half each) against
    four local peers at ``--load-interval`` for ``--load-seconds``: CPU seconds a minute (utime +
    stime from /proc/PID/stat after a first round) and the largest resident set (VmHWM).

Output
    A table of the faults, the cost, and last one JSON line with every figure.

Usage
    .venv/bin/python bench/monitor_alerts.py [--quick] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor_faults import NS_ADDRESS, Certificates, Dnsmasq, Namespace, Peer, Receiver, Relay
from relay_common import (
    BenchError,
    child_env,
    free_ports,
    say,
    scratch_directory,
    stop_child,
    vm_kib,
)

REPO = Path(__file__).resolve().parent.parent
NAME = "mx.bench.test"
POLL_SECONDS = 0.05
TICKS = os.sysconf("SC_CLK_TCK")


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def monitor_toml(workdir: Path, listen: str, checks: list[dict[str, Any]], extra: str) -> str:
    lines = [
        f'[server]\nlisten = "{listen}"',
        f'[store]\npath = "{workdir / "monitor.sqlite"}"',
        f'[log]\nfile = "{workdir / "monitor.log"}"',
        extra,
    ]
    for check in checks:
        lines.append("[[checks]]")
        lines += [f"{key} = {_toml(value)}" for key, value in check.items()]
    return "\n".join(lines) + "\n"


class Monitor:
    """``hamta monitor run`` on ``checks``; its /api/checks, its pid for /proc."""

    def __init__(self, workdir: Path, checks: list[dict[str, Any]], extra: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        listen = f"127.0.0.1:{free_ports('127.0.0.1', 1, set())[0]}"
        self.url = f"http://{listen}"
        self.config = workdir / "monitor.toml"
        self.config.write_text(monitor_toml(workdir, listen, checks, extra))
        argv = [sys.executable, "-m", "hamtactl", "monitor", "run", "--config", str(self.config)]
        self.stderr = open(workdir / "stderr", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, cwd=REPO, env=child_env(), stderr=self.stderr)

    def states(self) -> dict[str, str]:
        if self.proc.poll() is not None:
            raise BenchError(f"monitor exited with {self.proc.returncode}; see {self.config}")
        try:
            with urllib.request.urlopen(self.url + "/api/checks", timeout=5) as response:
                rows = json.load(response)["checks"]
        except OSError:
            return {}
        return {row["name"]: row["state"] for row in rows}

    def stop(self) -> None:
        if self.proc.poll() is None:
            stop_child(self.proc, signal.SIGTERM)
        self.stderr.close()


def wait(predicate: Callable[[], bool], limit: float, what: str) -> None:
    """Poll ``predicate`` (the monitor and the receiver are other processes and threads)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"{what} after {limit:g}s")
        time.sleep(POLL_SECONDS)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


def faults(workdir: Path, interval: float, threshold: int, timeout: float) -> dict[str, Any]:
    """Fault to alert, for the four faults at once; the figures by fault."""
    certs = Certificates(workdir)
    valid = certs.issue("valid", NAME, -1, 90)
    expired = certs.issue("expired", NAME, -400, -30)
    why_not = Namespace.usable()
    namespace = Namespace() if why_not is None else None
    blocked_how = "nftables drop in netns hh5mon" if namespace else f"closed port ({why_not})"
    ports = free_ports("127.0.0.1", 4, set())
    tls_peer = Peer(workdir / "tls-peer.log", "127.0.0.1", ports[0])
    dnsmasq = Dnsmasq(workdir, ports[1])
    relay = Relay(workdir / "relay", ports[2], ports[3])
    mx_good = ["mx-host=bench.test,mx1.bench.test,10", "host-record=mx1.bench.test,192.0.2.10"]
    mx_bad = ["mx-host=bench.test,mx2.bench.test,10", "host-record=mx1.bench.test,192.0.2.10"]
    common = {"interval": f"{interval}s", "timeout": f"{timeout}s", "failure_threshold": threshold}
    with Receiver() as receiver:
        if namespace is not None:
            namespace.__enter__()
        blocked_peer = (
            Peer(workdir / "peer.log", NS_ADDRESS, 25, netns="hh5mon")
            if namespace
            else Peer(workdir / "peer.log", "127.0.0.1", free_ports("127.0.0.1", 1, set(ports))[0])
        )
        monitor: Monitor | None = None
        try:
            blocked_peer.start()
            tls_peer.start(valid)
            dnsmasq.start(mx_good)
            relay.start()
            checks: list[dict[str, Any]] = [
                {"name": "port-blocked", "kind": "smtp", "host": blocked_peer.host}
                | {"port": blocked_peer.port, **common},
                {"name": "cert-expired", "kind": "tls", **common}
                | {"endpoint": f"starttls://127.0.0.1:{tls_peer.port}"}
                | {"server_name": NAME, "ca_file": str(certs.ca_file)},
                {"name": "mx-changed", "kind": "dns", "domain": "bench.test", **common},
                {"name": "relay-stopped", "kind": "smtp", "host": "127.0.0.1"}
                | {"port": relay.port, **common},
            ]
            extra = (
                f'[dns]\nnameservers = ["127.0.0.1:{dnsmasq.port}"]\n'
                f'[notifiers.hook]\nkind = "webhook"\nurl = "{receiver.url}"\n'
                '[[escalation]]\nafter = "0s"\nnotifiers = ["hook"]'
            )
            monitor = Monitor(workdir / "monitor", checks, extra)
            names = [c["name"] for c in checks]
            wait(
                lambda: all(monitor.states().get(n) == "up" for n in names),
                30 + interval * 3,
                "not every check up",
            )
            receiver.forget()
            at: dict[str, float] = {}
            at["port-blocked"] = time.monotonic()
            if namespace is not None:
                namespace.block(25)
            else:
                blocked_peer.stop()
            at["cert-expired"] = time.monotonic()
            tls_peer.stop()
            tls_peer.start(expired)
            at["mx-changed"] = time.monotonic()
            dnsmasq.stop()
            dnsmasq.start(mx_bad)
            at["relay-stopped"] = time.monotonic()
            relay.kill()
            wait(
                lambda: all(receiver.trigger(n) is not None for n in names),
                interval * threshold * 3 + timeout + 10,
                "not every fault alerted",
            )
            states = monitor.states()
        finally:
            if monitor is not None:
                monitor.stop()
            relay.kill()
            dnsmasq.stop()
            tls_peer.stop()
            blocked_peer.stop()
            if namespace is not None:
                namespace.__exit__(None, None, None)
    rows = {}
    for name in names:
        alerted = receiver.trigger(name)
        assert alerted is not None
        rows[name] = {"alert_s": round(alerted - at[name], 2), "state": states.get(name)}
    return {"blocked_by": blocked_how, "bound_s": interval * threshold, "faults": rows}


def load(workdir: Path, count: int, interval: float, seconds: float) -> dict[str, Any]:
    """One monitor with ``count`` checks on four peers: CPU seconds a minute, max RSS."""
    certs = Certificates(workdir)
    valid = certs.issue("valid", NAME, -1, 90)
    ports = free_ports("127.0.0.1", 4, set())
    peers = [Peer(workdir / f"peer-{port}.log", "127.0.0.1", port) for port in ports]
    checks: list[dict[str, Any]] = []
    common = {"interval": f"{interval}s", "timeout": f"{min(interval, 5)}s"}
    for number in range(count):
        port = ports[number % 4]
        if number % 2 == 0:
            checks.append({"name": f"smtp-{number}", "kind": "smtp", "host": "127.0.0.1"})
            checks[-1] |= {"port": port, "starttls": True, "ca_file": str(certs.ca_file)}
        else:
            checks.append({"name": f"tls-{number}", "kind": "tls"})
            checks[-1] |= {"endpoint": f"starttls://127.0.0.1:{port}"}
            checks[-1] |= {"ca_file": str(certs.ca_file)}
        checks[-1] |= {"server_name": NAME, **common}
    monitor: Monitor | None = None
    try:
        for peer in peers:
            peer.start(valid)
        monitor = Monitor(workdir / "monitor", checks)
        names = [c["name"] for c in checks]
        wait(
            lambda: all(monitor.states().get(n) == "up" for n in names),
            30 + interval * 3,
            "not every check up",
        )
        start_cpu, start = cpu_seconds(monitor.proc.pid), time.monotonic()
        # The measuring window itself (no synchronisation): the monitor runs unobserved.
        time.sleep(seconds)
        used, spent = cpu_seconds(monitor.proc.pid) - start_cpu, time.monotonic() - start
        rss = vm_kib(monitor.proc.pid, "VmHWM") or 0
        states = monitor.states()
    finally:
        if monitor is not None:
            monitor.stop()
        for peer in peers:
            peer.stop()
    up = sum(1 for name in names if states.get(name) == "up")
    return {
        "checks": count,
        "interval_s": interval,
        "window_s": round(spent, 1),
        "cpu_s_per_min": round(used / spent * 60, 2),
        "max_rss_mib": round(rss / 1024, 1),
        "up": up,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: short intervals")
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--load-interval", type=float, default=10.0)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    interval, threshold, timeout = (1.0, 2, 0.8) if args.quick else (5.0, 3, 2.0)
    count, every, seconds = (
        (20, 2.0, 6.0) if args.quick else (args.checks, args.load_interval, args.load_seconds)
    )
    with scratch_directory(args.workdir, "hamta-bench-monitor-", args.keep) as workdir:
        say(f"faults: interval {interval:g}s x threshold {threshold}, timeout {timeout:g}s")
        found = faults(workdir / "faults", interval, threshold, timeout)
        say(f"load: {count} checks every {every:g}s for {seconds:g}s")
        cost = load(workdir / "load", count, every, seconds)
    print(f"{'fault':<16} {'alert after':>12} {'interval x threshold':>21}  state")
    for name, row in found["faults"].items():
        print(f"{name:<16} {row['alert_s']:>11.2f}s {found['bound_s']:>20.1f}s  {row['state']}")
    print(f"port blocked by: {found['blocked_by']}")
    print(
        f"{cost['checks']} checks every {cost['interval_s']:g}s: "
        f"{cost['cpu_s_per_min']} CPU s/min, max RSS {cost['max_rss_mib']} MiB,"
        f" {cost['up']} up, over {cost['window_s']}s"
    )
    summary = {
        "quick": args.quick,
        "interval_s": interval,
        "failure_threshold": threshold,
        "bound_s": found["bound_s"],
        "blocked_by": found["blocked_by"],
        **{f"{name}_alert_s": row["alert_s"] for name, row in found["faults"].items()},
        **{f"load_{key}": value for key, value in cost.items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"monitor bench: {exc}", file=sys.stderr)
        sys.exit(1)
