"""The namespace lab: built for real (namespaces, bridge, loop device, ZooKeeper, DNS, sink).

The lab under test has the prefix ``hlt`` and the subnet 198.19.240.0/24, so that a user's lab
(``hamta``, 198.18.0.0/24) on the same machine is never touched. It is built without agents
(``up(agents=False)``): what is tested here is the lab itself; the pair's failover is tested
with the agent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.config import load_agent_config
from cluster.lab import netns as lab_netns
from cluster.lab import processes
from cluster.lab.configs import render_toml
from cluster.lab.lab import Lab, LabError
from cluster.lab.loopdev import attached_to
from cluster.lab.topology import HOSTS, NODES, Topology, TopologyError
from hamta.config import load_config

PREFIX = "hlt"
SUBNET = "198.19.240.0/24"
INET = "198.19.240.41"
VIP = "198.19.240.100"
PYTHON = sys.executable


def make_lab(directory: Path, prefix: str = PREFIX, subnet: str = SUBNET) -> Lab:
    """A lab description beside any user's lab, after clearing what a crashed run left."""
    # A test run killed half-way may have left namespaces of this prefix behind.
    Lab(directory.parent / "leftovers", prefix=prefix, subnet=subnet).down()
    return Lab(directory, prefix=prefix, subnet=subnet)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab (no agents) shared by the tests that only look at it or clean up after them."""
    built = make_lab(tmp_path_factory.mktemp("lab") / "lab")
    try:
        built.up(wait=60.0, agents=False, monitors=False)
        yield built
    finally:
        built.down()


def in_client(lab: Lab, code: str) -> str:
    """Run Python ``code`` in the client's namespace; its standard output."""
    done = lab.exec("client", [PYTHON, "-c", code], timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_in_namespace(lab: Lab, host: str, pids: list[int]) -> None:
    """Wait until ``pids`` run inside ``host``'s namespace (ip netns exec has entered it)."""
    deadline = time.monotonic() + 10
    while not set(pids) <= set(lab.node_pids(host)):
        assert time.monotonic() < deadline, f"{pids} never entered {host}"
        time.sleep(0.02)


def lab_leftovers(lab: Lab, pids: list[int], device: str, image: Path) -> list[str]:
    """What of a lab is still there after ``down``: namespaces, processes, loop device."""
    found = [name for name in lab.topology.namespaces if lab_netns.exists(name)]
    found += [f"pid {pid}" for pid in pids if processes.start_time(pid) is not None]
    if device and device in attached_to(image):
        found.append(device)
    return found


# ------------------------------------------------------------------ without root


def test_topology_stays_in_the_benchmarking_range() -> None:
    topology = Topology.build("hamta", "198.18.0.0/24")
    assert str(topology.address("zk1")) == "198.18.0.11"
    assert str(topology.address("inet")) == "198.18.0.41"
    assert str(topology.vip) == "198.18.0.100/24"
    assert topology.zookeeper_hosts == "198.18.0.11:2181,198.18.0.12:2181,198.18.0.13:2181"
    assert topology.namespaces[0] == "hamta-sw"
    assert set(topology.namespaces[1:]) == {f"hamta-{host}" for host in HOSTS}
    for subnet in ("10.0.0.0/24", "192.168.1.0/24", "198.20.0.0/24", "198.18.0.0/26"):
        with pytest.raises(TopologyError):
            Topology.build("hamta", subnet)
    for prefix in ("", "Hamta", "ham-ta", "averyverylongprefix"):
        with pytest.raises(TopologyError):
            Topology.build(prefix, "198.18.0.0/24")
    with pytest.raises(LabError, match="outside"):
        Lab(Path("unused"), subnet="10.1.2.0/24")


def test_load_without_a_lab_says_so(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="no lab is up"):
        Lab.load(tmp_path)


def test_toml_rendering_round_trips() -> None:
    import tomllib  # noqa: PLC0415 - only this test reads TOML back

    sections = {"a": {"s": 'quote " and \\ back', "n": 3, "l": [["x", "{peer}"]], "p": Path("/x")}}
    assert tomllib.loads(render_toml(sections)) == {
        "a": {"s": 'quote " and \\ back', "n": 3, "l": [["x", "{peer}"]], "p": "/x"}
    }


# ------------------------------------------------------------------ a lab that is up


@pytest.mark.root
def test_every_host_has_its_namespace_and_address(lab: Lab) -> None:
    for name in lab.topology.namespaces:
        assert lab_netns.exists(name), name
    for host in HOSTS:
        address = lab.topology.interface(host)
        assert lab_netns.addresses(lab.namespace(host), "eth0") == [address]
        # Loopback is up in every namespace: the relay's admin endpoint lives there.
        assert lab_netns.addresses(lab.namespace(host), "lo")
    # The switch holds the bridge and no address; the root namespace got no interface.
    assert lab_netns.addresses(lab.topology.switch, "br0") == []
    root = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    assert not any(f": {host}@" in root.stdout for host in HOSTS)


@pytest.mark.root
def test_zookeeper_serves_with_one_leader(lab: Lab) -> None:
    status = lab.status(cluster=False)
    modes = sorted(mode or "-" for mode in status["zookeeper"].values())
    assert modes == ["follower", "follower", "leader"]
    # ...and the client reaches every server over the bridge.
    answer = in_client(
        lab,
        "import socket\n"
        f"for host in {lab.zookeeper_hosts.split(',')!r}:\n"
        "    a, p = host.split(':')\n"
        "    with socket.create_connection((a, int(p)), timeout=3) as s:\n"
        "        s.sendall(b'ruok'); print(s.recv(10).decode())\n",
    )
    assert answer.split() == ["imok", "imok", "imok"]


@pytest.mark.root
def test_internet_dns_answers_mx_for_the_lab_domains_only(lab: Lab) -> None:
    answer = in_client(
        lab,
        "import json, dns.resolver\n"
        "r = dns.resolver.Resolver(configure=False)\n"
        f"r.nameservers = [{INET!r}]; r.lifetime = 3\n"
        "out = {d: [x.to_text() for x in r.resolve(d, 'MX')]\n"
        "       for d in ('a.lab.test', 'b.lab.test', 'c.lab.test')}\n"
        "out['mx'] = [x.to_text() for x in r.resolve('mx.lab.test', 'A')]\n"
        "try:\n"
        "    r.resolve('example.com', 'A'); out['other'] = 'answered'\n"
        "except dns.resolver.NXDOMAIN:\n"
        "    out['other'] = 'nxdomain'\n"
        "print(json.dumps(out))\n",
    )
    assert json.loads(answer) == {
        "a.lab.test": ["10 mx.lab.test."],
        "b.lab.test": ["10 mx.lab.test."],
        "c.lab.test": ["10 mx.lab.test."],
        "mx": [INET],
        "other": "nxdomain",
    }


@pytest.mark.root
def test_sink_records_mail_sent_from_the_client(lab: Lab) -> None:
    done = lab.exec(
        "client",
        [
            PYTHON,
            "-m",
            "cluster.lab.client",
            "--to",
            f"{INET}:25",
            "--count",
            "3",
            "--domain",
            "b.lab.test",
            "--size",
            "2000",
            "--run-id",
            "direct",
        ],
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["acked"] == 3
    assert {"direct-0", "direct-1", "direct-2"} <= lab.delivered_ids()
    line = next(d for d in lab.deliveries() if d["x_lab_id"] == "direct-1")
    assert line["rcpt"] == "user1@b.lab.test"
    assert line["mail_from"] == "lab@client.lab.test"
    assert line["message_id"] == "<direct-1@client.lab.test>"
    assert 2000 <= line["size"] < 2100
    assert line["at"] > time.time() - 60


@pytest.mark.root
def test_shared_disk_is_an_ext4_loop_device_with_a_spool(lab: Lab) -> None:
    device = lab.loop_device
    assert device.startswith("/dev/loop")
    assert attached_to(lab.image_path) == [device]
    blkid = subprocess.run(
        ["blkid", "-o", "value", "-s", "TYPE", device], capture_output=True, text=True, check=False
    )
    assert blkid.stdout.strip() == "ext4"
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /", device], capture_output=True, text=True, check=False
    )
    assert " spool" in listing.stdout
    assert lab.image_path.stat().st_blocks * 512 < 64 * 1024 * 1024  # sparse
    assert lab.spool_mounted_on() == []


@pytest.mark.root
def test_node_configurations_are_valid(lab: Lab) -> None:
    for node in NODES:
        relay = load_config(lab.node_dir(node) / "relay.toml")
        # 25 (relay), 587 and 465 (submission: tests/test_lab_submission.py)
        assert relay.smtp.listen == ["0.0.0.0:25", "0.0.0.0:587", "0.0.0.0:465"]
        # The internet host's validating resolver (DANE), and the lab's CA for MTA-STS.
        assert relay.dns.nameservers == [f"{INET}:5353"] and relay.dns.dnssec
        assert relay.tls_policy.ca_file == lab.directory / "inet" / "tls" / "ca.crt"
        assert relay.control.socket == lab.node_dir(node) / "relay.sock"
        agent = load_agent_config(lab.node_dir(node) / "agent.toml")
        assert agent.agent.node == node
        assert agent.agent.zookeeper == lab.zookeeper_hosts
        assert agent.agent.credentials == lab.credentials_path
        other = next(peer for peer in NODES if peer != node)
        assert agent.agent.peers == {other: f"{lab.address(other)}:7946"}
        assert agent.agent.peer_secret_file == lab.peer_secret_path
        assert agent.agent.failsafe
        assert agent.storage.driver == "blockdev"
        assert agent.storage.device == Path(lab.loop_device)
        assert agent.storage.mountpoint == lab.node_dir(node) / "mnt"
        assert agent.vip.address == f"{VIP}/24"
        assert agent.fencing.commands == [
            [
                PYTHON,
                "-m",
                "cluster.lab.fence",
                "--namespace",
                f"{PREFIX}-{{peer}}",
                "--vip",
                f"{VIP}/24",
                # The egress addresses (out1, out2) go with the VIP: the fence drops them too.
                "--also",
                "198.19.240.111",
                "--also",
                "198.19.240.112",
                "--interface",
                "eth0",
                "--device",
                lab.loop_device,
            ]
        ]
    assert lab.credentials_path.stat().st_mode & 0o777 == 0o600
    assert lab.peer_secret_path.stat().st_mode & 0o777 == 0o600
    user, _, password = lab.credentials_path.read_text().strip().partition(":")
    assert user and len(password) >= 20


@pytest.mark.root
def test_a_second_lab_of_the_same_prefix_or_directory_is_refused(lab: Lab, tmp_path: Path) -> None:
    with pytest.raises(LabError, match="already up"):
        Lab(lab.directory, prefix="hlw", subnet="198.19.243.0/24").up(agents=False)
    with pytest.raises(LabError, match="exist already"):
        Lab(tmp_path, prefix=PREFIX, subnet=SUBNET).up(agents=False)
    assert Lab.load(lab.directory).status(cluster=False)["up"]


@pytest.mark.root
def test_send_reaches_whoever_holds_the_vip(lab: Lab, tmp_path: Path) -> None:
    # A stand-in for an active node: the VIP on node1's eth0 and a sink listening on it.
    record = tmp_path / "node1-sink.jsonl"
    try:
        added = lab.exec("node1", ["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"])
        assert added.returncode == 0, added.stderr
        assert lab.vip_holders() == ["node1"]
        lab.popen(
            "node1",
            [PYTHON, "-m", "cluster.lab.sink", "--listen", f"{VIP}:25", "--record", str(record)],
        )
        assert lab.wait_active(20.0) == "node1"
        result = lab.send(5, size=512, domain="c.lab.test", connections=2)
        assert result.all_acked and result.sent == 5, result
        recorded = {json.loads(line)["x_lab_id"] for line in record.read_text().splitlines()}
        assert recorded == set(result.ids_acked)
    finally:
        lab.kill_node("node1")
        lab.fence("node1")
    assert lab.vip_holders() == []
    assert lab.node_pids("node1") == []


@pytest.mark.root
def test_fence_powers_the_node_off_and_drops_the_vip(lab: Lab) -> None:
    try:
        lab.exec("node2", ["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"], check=True)
        relay = lab.popen("node2", [PYTHON, "-c", "import time; time.sleep(120)", "serve"])
        other = lab.popen("node2", ["sleep", "120"])
        wait_in_namespace(lab, "node2", [relay.pid, other.pid])
        assert sorted(lab.node_pids("node2")) == sorted([relay.pid, other.pid])
        # As the peer's agent runs it: from inside node1, in a mount namespace of its own.
        fence = [arg.format(peer="node2") for arg in lab.fence_command()]
        os.kill(other.pid, signal.SIGSTOP)  # a frozen process is powered off as well
        done = lab.exec("node1", fence, timeout=30)
        assert done.returncode == 0, done.stderr
        assert relay.wait(5) == -signal.SIGKILL
        assert other.wait(5) == -signal.SIGKILL
        assert lab.vip_holders() == []
        assert lab.node_pids("node2") == []
        lab.fence("node2")  # nothing left to fence: still fine
    finally:
        lab.kill_node("node2")
        lab.fence("node2")


@pytest.mark.root
def test_spool_mounts_stay_private_to_their_node(lab: Lab, tmp_path: Path) -> None:
    mountpoint = lab.node_dir("node2") / "mnt"
    script = f"mount {lab.loop_device} {mountpoint} && echo mounted && exec sleep 120"
    holder = lab.popen("node2", ["sh", "-c", script], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"mounted"
        assert lab.spool_mounted_on() == ["node2"]
        # ip netns exec gave it a mount namespace of its own: the host does not see the mount.
        assert str(mountpoint) not in Path("/proc/self/mountinfo").read_text()
        lab.kill_node("node2")
        assert holder.wait(5) == -signal.SIGKILL
        assert lab.spool_mounted_on() == []
    finally:
        lab.kill_node("node2")
        if holder.stdout is not None:
            holder.stdout.close()


# ------------------------------------------------------------------ with agents


@pytest.mark.root
def test_the_pair_elects_one_active_node_that_relays_to_the_sink(tmp_path: Path) -> None:
    lab = make_lab(tmp_path / "lab", "hlx", "198.19.244.0/24")
    try:
        lab.up(wait=60.0, monitors=False)
        active = lab.active_node()
        assert active in NODES
        assert lab.vip_holders() == [active]
        assert lab.spool_mounted_on() == [active]
        result = lab.send(10, domain="a.lab.test")
        assert result.all_acked and result.sent == 10, result
        deadline = time.monotonic() + 30
        while not set(result.ids_acked) <= lab.delivered_ids():
            assert time.monotonic() < deadline, "acknowledged mail never reached the sink"
            time.sleep(0.2)
        # `hamta lab hostile`: the chaos suite's hostile sessions, each refused or answered.
        hostile = subprocess.run(
            [
                PYTHON,
                "-m",
                "hamtactl",
                "lab",
                "hostile",
                "--dir",
                str(tmp_path / "lab"),
                "--idle",
                "50",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert hostile.returncode == 0, hostile.stdout + hostile.stderr
        assert "ehlo-header-injection" in hostile.stdout and "as it must be" in hostile.stdout
        assert lab.active_node() == active
        pids = [pid for node in NODES for pid in lab.node_pids(node)]
        assert len(pids) >= 4  # an agent and its relay on each node
        device, image = lab.loop_device, lab.image_path
    finally:
        lab.down()
    assert lab_leftovers(lab, pids, device, image) == []


# ------------------------------------------------------------------ down


@pytest.mark.root
def test_down_leaves_nothing_behind_and_twice_is_fine(tmp_path: Path) -> None:
    # Its own prefix and subnet: the module's lab is still up.
    lab = make_lab(tmp_path / "lab", "hlu", "198.19.241.0/24")
    try:
        lab.up(wait=60.0, agents=False)  # the monitors too: down must end them as well
        device, image = lab.loop_device, lab.image_path
        pids = [pid for host in HOSTS for pid in lab.node_pids(host)]
        # Three ZooKeeper servers, dnsmasq, the sink, two monitors and their alert receiver, the
        # validating resolver (unbound) and the MTA-STS policy host.
        assert len(pids) == 10
    finally:
        lab.down()
    assert lab_leftovers(lab, pids, device, image) == []
    assert not (tmp_path / "lab" / "lab.json").exists()
    assert not image.exists()
    assert (tmp_path / "lab" / "zookeeper" / "zk1" / "zookeeper.log").exists()  # logs stay
    lab.down()
    Lab(tmp_path / "lab", prefix="hlu", subnet="198.19.241.0/24").down()
    with pytest.raises(LabError):
        Lab.load(tmp_path / "lab")


@pytest.mark.root
def test_down_from_another_process_after_a_crash(tmp_path: Path) -> None:
    lab = make_lab(tmp_path / "lab", "hlv", "198.19.242.0/24")
    try:
        lab.up(wait=60.0, agents=False, monitors=False)
        device, image = lab.loop_device, lab.image_path
        recorded = json.loads((tmp_path / "lab" / "lab.json").read_text())["processes"]
        # A process nobody recorded (an operator's shell, say) inside the lab.
        stray = lab.popen("client", ["sleep", "300"])
        wait_in_namespace(lab, "client", [stray.pid])
        pids = [p["pid"] for p in recorded] + [stray.pid]
        # The crash: every recorded process dies at once; namespaces and the disk stay.
        for process in recorded:
            os.kill(process["pid"], signal.SIGKILL)
        assert processes.wait_gone([p["pid"] for p in recorded], 10.0) == set()
        down = subprocess.run(
            [PYTHON, "-m", "hamtactl", "lab", "down", "--dir", str(tmp_path / "lab")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert down.returncode == 0, down.stderr
        assert stray.wait(5) != 0
    finally:
        lab.down()
    assert lab_leftovers(lab, pids, device, image) == []
    assert not (tmp_path / "lab" / "lab.json").exists()
