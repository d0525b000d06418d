"""The ensemble's load with N pairs on it: znodes, watches, connections, requests per second.

For each N (default 1, 2, 4) a fresh three-server ensemble (cluster/zookeeper.py, on loopback
addresses 127.0.0.31-33 and free ports) gets a fleet root and N pairs created by the
administrator (cluster/fleet.py), and each pair two agents' coordinators with the pair's own
credentials and the fleet reader's READ. Each coordinator does what an agent does against
ZooKeeper at the agent's default rates: it publishes its member znode every heartbeat (1 s) and
reads the cluster (``view()``: leader, epoch, members, pause, switchover) every health interval
(0.5 s), its watches installed at start; node1, the leader, advances its pulse every
``peer_timeout / 4`` (0.25 s) and node2 watches it (``cluster.coordination_pulse``; ``--pulse
off``: as before the pulse). After a warm-up, ``mntr`` on every server gives the counts, and the
packets the servers received (and sent: answers and watch events) over the window give the
requests per second.

These are coordinators, not whole agents (no relay, no storage): the ZooKeeper traffic is the
agent's, which is what the ensemble sees. Run as root or not; it uses no namespace.

    python bench/fleet.py [--pairs 1,2,4] [--window 10] [--pulse on|off]

Prints a line per N and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kazoo.client import KazooClient

from cluster.coordination import Coordinator
from cluster.coordination_layout import Credentials
from cluster.decision_data import Member, Role
from cluster.fleet import create_pair, fleet_root
from cluster.zookeeper import ServerSpec, ZooKeeperEnsemble, four_letter_word

ADDRESSES = ("127.0.0.31", "127.0.0.32", "127.0.0.33")
ADMIN = Credentials("fleet-admin", "bench-admin")
READER = Credentials("fleet-reader", "bench-reader")
HEARTBEAT = 1.0
HEALTH_INTERVAL = 0.5
PULSE_INTERVAL = 0.25  # peer_timeout (1 s) / 4


def free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


def ensemble(base: Path) -> ZooKeeperEnsemble:
    specs = []
    for index, address in enumerate(ADDRESSES, start=1):
        ports: list[int] = []
        while len(ports) < 3:
            port = free_port(address)
            if port not in ports:
                ports.append(port)
        specs.append(ServerSpec(index, address, *ports))
    return ZooKeeperEnsemble(specs, base, tick_ms=200)


def mntr(servers: ZooKeeperEnsemble) -> list[dict[str, str]]:
    answers = []
    for spec in servers.specs:
        lines = four_letter_word(spec.address, spec.client_port, "mntr").splitlines()
        answers.append(dict(line.split("\t", 1) for line in lines if "\t" in line))
    return answers


def agent_loop(coordinator: Coordinator, node: str, stop: threading.Event) -> None:
    published = 0.0
    while not stop.is_set():
        now = time.monotonic()
        if now - published >= HEARTBEAT:
            coordinator.publish_member(Member(node, Role.PASSIVE, heartbeat=time.time()))
            published = now
        coordinator.view()
        stop.wait(HEALTH_INTERVAL)


def pulse_loop(coordinator: Coordinator, stop: threading.Event) -> None:
    """The leader's pulse, at the agent's default rate."""
    beat = 0
    while not stop.is_set():
        beat += 1
        coordinator.pulse(1, beat)
        stop.wait(PULSE_INTERVAL)


def measure(pairs: int, window: float, base: Path, *, pulse: bool = True) -> dict[str, Any]:
    with ensemble(base) as servers:
        root = fleet_root(servers.hosts)[1]
        admin = KazooClient(hosts=servers.hosts, auth_data=[ADMIN.auth])
        admin.start(timeout=30)
        names = [f"pair{index}" for index in range(1, pairs + 1)]
        owners = {name: Credentials(name, f"{name}-secret") for name in names}
        for name in names:
            create_pair(
                admin,
                root,
                name,
                admin=ADMIN,
                owner=owners[name].digest_id,
                readers=[READER.digest_id],
            )
        admin.stop()
        admin.close()
        coordinators = []
        for name in names:
            for node in ("node1", "node2"):
                coordinator = Coordinator(
                    servers.hosts,
                    name,
                    node,
                    credentials=owners[name],
                    readers=[READER.digest_id],
                )
                coordinator.start(30)
                if pulse and node == "node2":
                    coordinator.watch_pulses(["node1"])
                coordinators.append((coordinator, node))
        stop = threading.Event()
        threads = [
            threading.Thread(target=agent_loop, args=(c, n, stop), daemon=True)
            for c, n in coordinators
        ]
        if pulse:
            threads += [
                threading.Thread(target=pulse_loop, args=(c, stop), daemon=True)
                for c, n in coordinators
                if n == "node1"
            ]
        for thread in threads:
            thread.start()
        time.sleep(3.0)  # warm-up: every member published, every watch set
        before, started = mntr(servers), time.monotonic()
        time.sleep(window)
        after, elapsed = mntr(servers), time.monotonic() - started
        stop.set()
        for thread in threads:
            thread.join()
        for coordinator, _node in coordinators:
            coordinator.stop()
    received = sum(
        int(a["zk_packets_received"]) - int(b["zk_packets_received"])
        for a, b in zip(after, before, strict=True)
    )
    sent = sum(
        int(a["zk_packets_sent"]) - int(b["zk_packets_sent"])
        for a, b in zip(after, before, strict=True)
    )
    return {
        "pairs": pairs,
        "sessions": len(coordinators),
        "znodes": max(int(answer["zk_znode_count"]) for answer in after),
        "watches": sum(int(answer["zk_watch_count"]) for answer in after),
        "connections": sum(int(answer["zk_num_alive_connections"]) for answer in after),
        "requests_per_s": round(received / elapsed, 1),
        "sent_per_s": round(sent / elapsed, 1),  # answers and watch events
        "pulse": pulse,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="1,2,4", help="the values of N, comma-separated")
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured per N")
    parser.add_argument(
        "--pulse", choices=("on", "off"), default="on", help="the leader's pulse (issue 17)"
    )
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        for pairs in (int(value) for value in args.pairs.split(",")):
            result = measure(pairs, args.window, Path(tmp) / f"n{pairs}", pulse=args.pulse == "on")
            print(
                f"N={pairs}: {result['sessions']} sessions, {result['znodes']} znodes, "
                f"{result['watches']} watches, {result['requests_per_s']} requests/s, "
                f"{result['sent_per_s']} packets sent/s",
                flush=True,
            )
            results.append(result)
    print(json.dumps({"bench": "fleet", "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
