"""The deployment's files (ansible/, vagrant/) render into configurations hamta accepts.

The roles' templates are rendered by Ansible itself (``ansible/render-config.yml``, which
writes what ``site.yml`` would install into a directory), for the example inventory and for
the Vagrant cluster's, and every rendered ``relay.toml`` and ``agent.toml`` is loaded by
hamta's own configuration code, and checked by ``hamta config check``. ``ansible-lint``
(production profile) and ``ansible-playbook --syntax-check`` run on every playbook. Each
test is skipped where its tool (Debian's ansible, ansible-lint, drbd-utils, ruby) is absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from cluster.config import AgentConfig, load_agent_config
from cluster.coordination_layout import Credentials
from cluster.lab.vagrant import Pair, VagrantCluster, VagrantError, libvirtd_config, parse_recap
from hamta.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE_DIR = ROOT / "ansible"
VAGRANT_DIR = ROOT / "vagrant"
EXAMPLE_INVENTORY = ANSIBLE_DIR / "inventory.example"
FLEET_INVENTORY = ANSIBLE_DIR / "inventory.fleet-example"
VAGRANT_INVENTORY = VAGRANT_DIR / "inventory"
VAGRANT_PAIRS_INVENTORY = VAGRANT_DIR / "inventory-pairs"
PLAYBOOKS = [
    ANSIBLE_DIR / "site.yml",
    ANSIBLE_DIR / "switchover.yml",
    ANSIBLE_DIR / "rolling-upgrade.yml",
    ANSIBLE_DIR / "render-config.yml",
    VAGRANT_DIR / "provision.yml",
    VAGRANT_DIR / "mx-sink.yml",
]
# Extra variables outrank the inventories' vault lookups, so rendering writes no secret file.
TEST_SECRETS = {
    "vault_hamta_zookeeper_password": "test-zookeeper-password",
    "vault_drbd_shared_secret": "test-drbd-secret",
    "vault_hamta_peer_secret": "test-peer-channel-secret",
}
# The fleet example's: a password per pair, and the fleet's administrator's.
FLEET_SECRETS: dict[str, object] = {
    "vault_hamta_zookeeper_passwords": {"mail1": "test-mail1", "mail2": "test-mail2"},
    "vault_hamta_fleet_admin_password": "test-fleet-admin",
    "vault_hamta_peer_secrets": {
        "mail1": "test-mail1-peer-secret",
        "mail2": "test-mail2-peer-secret",
    },
}
ANSIBLE_TIMEOUT = 120.0

needs_ansible = pytest.mark.skipif(
    shutil.which("ansible-playbook") is None, reason="Debian's ansible is not installed"
)


def _ansible(argv: Sequence[str], cwd: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(cwd / "ansible.cfg"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_STDOUT_CALLBACK": "default",
    }
    return subprocess.run(
        list(argv),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=ANSIBLE_TIMEOUT,
        check=False,
    )


def render(inventory: Path, out: Path, tmp: Path, extra: dict[str, object] | None = None) -> Path:
    """Render every host's files with ``render-config.yml``; return the output directory."""
    variables = {"render_dir": str(out), **TEST_SECRETS, **(extra or {})}
    done = _ansible(
        [
            "ansible-playbook",
            "-i",
            str(inventory),
            "render-config.yml",
            "-e",
            json.dumps(variables),
        ],
        ANSIBLE_DIR,
        tmp,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The example inventory's files, rendered once for the module."""
    if shutil.which("ansible-playbook") is None:
        pytest.skip("Debian's ansible is not installed")
    tmp = tmp_path_factory.mktemp("example")
    yield render(EXAMPLE_INVENTORY, tmp / "rendered", tmp)


@pytest.fixture(scope="module")
def vagrant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The Vagrant cluster's files, rendered once for the module."""
    if shutil.which("ansible-playbook") is None:
        pytest.skip("Debian's ansible is not installed")
    tmp = tmp_path_factory.mktemp("vagrant")
    yield render(VAGRANT_INVENTORY, tmp / "rendered", tmp)


def relay_and_agent(rendered: Path, node: str) -> tuple[Config, AgentConfig]:
    """The node's relay.toml and agent.toml, loaded as hamta loads them."""
    return (
        load_config(rendered / node / "relay.toml"),
        load_agent_config(rendered / node / "agent.toml"),
    )


def zoo_cfg(rendered: Path, host: str) -> dict[str, str]:
    """``key=value`` lines of a rendered zoo.cfg."""
    lines = (rendered / host / "zoo.cfg").read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    return {key: value for key, value in pairs}


# ---------------------------------------------------------------- the example inventory


@pytest.mark.parametrize("node", ["mx1", "mx2"])
def test_the_example_renders_configs_that_hamta_accepts(example: Path, node: str) -> None:
    relay, agent = relay_and_agent(example, node)
    assert agent.agent.node == node
    assert agent.agent.cluster == "mail"
    assert agent.agent.session_timeout == 3.0
    assert agent.agent.credentials == Path("/etc/hamta/zk-credentials")
    assert agent.agent.relay_config == Path("/etc/hamta/relay.toml")
    assert agent.agent.relay_command[:2] == ["/opt/hamta/bin/hamta", "serve"]
    assert sorted(agent.agent.zookeeper.split(",")) == [
        "198.51.100.11:2181",
        "198.51.100.12:2181",
        "198.51.100.13:2181",
    ]
    assert agent.storage.driver == "drbd"
    assert agent.storage.resource == "r0"
    assert agent.storage.device == Path("/dev/drbd0")
    assert agent.vip.address == "192.0.2.25/24"
    # The peer channel to the pair's other host (failsafe; fast takeover with a fence agent).
    addresses = {"mx1": "198.51.100.11:7946", "mx2": "198.51.100.12:7946"}
    assert agent.agent.peer_address == addresses.pop(node)
    assert agent.agent.peers == addresses
    assert agent.agent.peer_secret_file == Path("/etc/hamta/peer-secret")
    # The agent activates the relay on <mountpoint>/<spool>; standalone, spool.path is that.
    assert relay.spool.path == agent.storage.mountpoint / agent.storage.spool  # type: ignore[operator]
    assert relay.control.socket == Path("/run/hamta/relay/relay.sock")
    assert (relay.node.user, relay.node.group) == ("hamta", "hamta")
    assert relay.smtp.listen == ["0.0.0.0:25"]
    assert [str(net) for net in relay.smtp.relay_networks] == ["192.0.2.0/24", "127.0.0.0/8"]


def test_hamta_config_check_accepts_the_rendered_relay_toml(example: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hamtactl", "config", "check", str(example / "mx1/relay.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert ": ok" in done.stdout


def test_the_ensemble_allows_the_agents_session(example: Path) -> None:
    _, agent = relay_and_agent(example, "mx1")
    session_ms = agent.agent.session_timeout * 1000
    servers = set()
    for host, myid in (("mx1", "1"), ("mx2", "2"), ("arbiter", "3")):
        cfg = zoo_cfg(example, host)
        # ZooKeeper clamps a session into these bounds without a word.
        assert int(cfg["minSessionTimeout"]) <= session_ms <= int(cfg["maxSessionTimeout"])
        assert 2 * int(cfg["tickTime"]) <= int(cfg["minSessionTimeout"])
        assert int(cfg["tickTime"]) <= 1000  # expiry checked once a tick
        servers.add(frozenset((k, v) for k, v in cfg.items() if k.startswith("server.")))
        assert cfg[f"server.{myid}"].startswith(cfg["clientPortAddress"] + ":")
    assert len(servers) == 1  # every server lists the same ensemble
    assert len(next(iter(servers))) == 3


def test_the_drbd_resource_is_protocol_c_fenced_by_hamta_and_never_discards(
    example: Path,
) -> None:
    text = (example / "mx1/r0.res").read_text()
    assert "protocol C;" in text
    assert "fencing resource-only;" in text
    fast = "/opt/hamta/bin/python -m cluster.fence_marker --dir /var/lib/hamta/drbd-fence -- "
    assert f'fence-peer "{fast}/opt/hamta/bin/hamta drbd fence-peer --config' in text
    for handler, action in (
        ("after-resync-target", "unfence"),
        ("split-brain", "split-brain"),
    ):
        assert (
            f'{handler} "/opt/hamta/bin/hamta drbd {action} --config /etc/hamta/agent.toml";'
            in text
        )
    policies = re.findall(r"after-sb-[0-2]pri (\S+);", text)
    assert policies == ["disconnect"] * 3
    assert re.findall(r"address (\S+);", text) == ["198.51.100.11:7789", "198.51.100.12:7789"]


@pytest.mark.skipif(
    not Path("/usr/lib/drbd/drbdadm-84").exists(), reason="drbd-utils is not installed"
)
def test_drbdadm_parses_the_rendered_resource(example: Path) -> None:
    # The nodes run the in-tree 8.4 module, so drbdadm hands its work to drbdadm-84.
    done = subprocess.run(
        ["/usr/lib/drbd/drbdadm-84", "-c", str(example / "mx1/r0.res"), "dump", "r0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # This host is neither mx1 nor mx2: parsed, then refused for this host (exit 1), where a
    # syntax error would exit 10.
    assert "Parse error" not in done.stderr
    assert done.returncode == 0 or "not defined in your config (for this host)" in done.stderr


def test_the_agents_unit_keeps_its_mounts_visible_and_its_capabilities_few(
    example: Path,
) -> None:
    unit = (example / "mx1/hamta-agent.service").read_text()
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#"
    )
    assert set(settings["CapabilityBoundingSet"].split()) == {
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_ADMIN",
        "CAP_NET_BIND_SERVICE",
        "CAP_KILL",
        # The relay gives up root (hamta/privileges.py); its spool and log become its user's.
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_CHOWN",
        # [agent] nice raises the agent's priority (the Vagrant cluster logged it refused).
        "CAP_SYS_NICE",
    }
    # systemd sets a RuntimeDirectory's owner and mode again before each command: the relay
    # makes its control directory (root:hamta 0770) itself, in a /run/hamta all may search.
    for unit_text in (unit, (example / "mx1/hamta-relay.service").read_text()):
        lines = unit_text.splitlines()
        assert "RuntimeDirectory=hamta" in lines and "RuntimeDirectoryMode=0755" in lines
        assert not [line for line in lines if line.startswith("ExecStartPre=")]
    assert settings["Restart"] == "always"
    assert settings["KillMode"] == "mixed"
    assert settings["ExecStart"] == "/opt/hamta/bin/hamta agent --config /etc/hamta/agent.toml"
    # A private mount namespace would hide the spool the agent mounts (see the unit).
    for option in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert option not in settings
    assert "Conflicts" in settings and settings["Conflicts"] == "hamta-relay.service"
    # The relay, its child, inherits it: 1,024 open files do not hold max_connections' 1,000.
    assert int(settings["LimitNOFILE"]) >= 65536
    relay = (example / "mx1/hamta-relay.service").read_text()
    assert "\nLimitNOFILE=65536\n" in relay


@needs_ansible
def test_any_key_and_any_string_reach_hamta_intact(tmp_path: Path) -> None:
    tricky = 'a "quoted" \\ back\\slash, ünïcode, {braces} [brackets]'
    rendered = render(
        EXAMPLE_INVENTORY,
        tmp_path / "rendered",
        tmp_path,
        {
            "hamta_relay_settings": {
                "node": {"workers": 2},
                "delivery": {"limits": {"max_connections": 5}, "starttls": "off"},
            },
            "hamta_agent_settings": {"agent": {"step_timeouts": {"storage": "60s"}}},
            "hamta_fencing_agents": [
                {
                    "type": "ipmi",
                    "host": "bmc-{node}",
                    "username": "admin",
                    "password_file": "/etc/hamta/secrets/bmc",
                }
            ],
            "hamta_fencing_commands": [["/bin/echo", tricky, "{peer}"]],
            "hamta_fencing_takeover": "fence-only",
            "hamta_watchdog_device": "/dev/watchdog",
        },
    )
    relay, agent = relay_and_agent(rendered, "mx2")
    assert relay.node.workers == 2
    assert relay.delivery.limits.max_connections == 5
    assert relay.delivery.starttls == "off"
    assert relay.smtp.listen == ["0.0.0.0:25"]  # the generated keys survive the merge
    assert agent.fencing.commands == [["/bin/echo", tricky, "{peer}"]]
    assert agent.fencing.agents[0]["host"] == "bmc-{node}"
    assert agent.fencing.takeover.value == "fence-only"
    assert agent.watchdog.device == Path("/dev/watchdog")
    assert agent.agent.step_timeouts  # {storage: 60s}


# ---------------------------------------------------------------- a fleet of two pairs


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fleet example's files (two pairs on one ensemble), rendered once for the module."""
    if shutil.which("ansible-playbook") is None:
        pytest.skip("Debian's ansible is not installed")
    tmp = tmp_path_factory.mktemp("fleet")
    yield render(FLEET_INVENTORY, tmp / "rendered", tmp, FLEET_SECRETS)


@pytest.mark.parametrize(
    ("node", "pair", "vip", "peers"),
    [
        ("mx1", "mail1", "192.0.2.25/24", ["198.51.100.11:7789", "198.51.100.12:7789"]),
        ("mx2", "mail1", "192.0.2.25/24", ["198.51.100.11:7789", "198.51.100.12:7789"]),
        ("mx3", "mail2", "192.0.2.26/24", ["198.51.100.13:7789", "198.51.100.14:7789"]),
        ("mx4", "mail2", "192.0.2.26/24", ["198.51.100.13:7789", "198.51.100.14:7789"]),
    ],
)
def test_each_pair_of_the_fleet_renders_its_own_cluster_on_the_one_ensemble(
    fleet: Path, node: str, pair: str, vip: str, peers: list[str]
) -> None:
    _relay, agent = relay_and_agent(fleet, node)
    assert agent.agent.cluster == pair
    assert agent.vip.address == vip
    assert agent.agent.fleet_reader == "fleet-reader:Ave0kzgkZcGrCjAct53Pw17vPFY="
    assert sorted(agent.agent.zookeeper.split(",")) == [
        "198.51.100.21:2181",
        "198.51.100.22:2181",
        "198.51.100.23:2181",
    ]
    # The peer channel and DRBD join the pair's two hosts, never across pairs.
    others = {address.replace(":7789", ":7946") for address in peers} - {agent.agent.peer_address}
    assert set(agent.agent.peers.values()) == others and len(others) == 1
    text = (fleet / node / "r0.res").read_text()
    assert re.findall(r"address (\S+);", text) == peers
    assert zoo_cfg(fleet, "zk1")["server.3"] == "198.51.100.23:2888:3888"


@needs_ansible
@pytest.mark.parametrize("playbook", ["site.yml", "rolling-upgrade.yml"])
def test_the_fleet_playbooks_parse_with_two_pairs(playbook: str, tmp_path: Path) -> None:
    done = _ansible(
        ["ansible-playbook", "--syntax-check", "-i", str(FLEET_INVENTORY), playbook],
        ANSIBLE_DIR,
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_ansible
@pytest.mark.parametrize(("order", "refused"), [("1234", False), ("1324", True)])
def test_the_rolling_upgrade_refuses_two_hosts_of_different_pairs_together(
    order: str, refused: bool, tmp_path: Path
) -> None:
    """Its first play (on this machine, no host reached) checks that every two hosts are a pair;
    with the hosts in a good order the upgrade goes on (and fails here, finding no hamta)."""
    pair = {"1": "mail1", "2": "mail1", "3": "mail2", "4": "mail2"}
    hosts = "".join(
        f"    mx{n}: {{ansible_connection: local, hamta_pair_group: {pair[n]}, "
        f"hamta_install_dir: {tmp_path}/none}}\n"
        for n in order
    )
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(
        f"all:\n  children:\n    hamta:\n      hosts:\n{hosts}".replace("\n    mx", "\n        mx")
    )
    done = _ansible(
        ["ansible-playbook", "-i", str(inventory), "rolling-upgrade.yml"], ANSIBLE_DIR, tmp_path
    )
    assert done.returncode != 0  # no hamta to upgrade here, either way
    assert ("list each pair's two hosts together" in done.stdout) is refused, done.stdout
    assert ("Read the pair's status" in done.stdout) is not refused, done.stdout


# ---------------------------------------------------------------- the Vagrant cluster


def test_the_vagrant_cluster_renders_configs_that_hamta_accepts(vagrant: Path) -> None:
    for node in ("mx1", "mx2"):
        relay, agent = relay_and_agent(vagrant, node)
        assert agent.vip.address == "198.19.101.100/24"
        assert agent.vip.interface == "eth1"
        assert relay.delivery.routes == {"example.test": "[198.19.101.13]:25"}
        assert relay.node.hostname == f"{node}.hamta.test"
        # The peer channel with the libvirt fence agent: the fast takeover is on.
        assert agent.policy().fast_takeover and agent.policy().failsafe_peers
    text = (vagrant / "mx1/r0.res").read_text()
    assert "disk /dev/vdb;" in text
    assert 'shared-secret "test-drbd-secret";' in text
    assert zoo_cfg(vagrant, "arbiter")["server.3"] == "198.19.101.13:2888:3888"


@needs_ansible
@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (1, [Pair("vagrant", ("mx1", "mx2"), "198.19.101.100")]),
        (
            2,
            [
                Pair("vagrant1", ("mx1", "mx2"), "198.19.101.100"),
                Pair("vagrant2", ("mx3", "mx4"), "198.19.101.101"),
            ],
        ),
    ],
)
def test_the_vagrant_harness_reads_its_pairs_from_the_inventory(
    pairs: int, expected: list[Pair], tmp_path: Path
) -> None:
    """cluster.lab.vagrant's machines, pairs and VIPs: those the playbooks deploy, no copy."""
    machines = VagrantCluster(ROOT, tmp_path, pairs=pairs)
    assert list(machines.inventory.pairs) == expected
    assert sorted(machines.machines) == sorted(["arbiter", *(n for p in expected for n in p.nodes)])
    assert machines.inventory.addresses["arbiter"] == "198.19.101.13"
    last = machines.pair(expected[-1].name)
    assert (last.vip, last.mail_nodes, last.pair_name) == (
        expected[-1].vip,
        expected[-1].nodes,
        expected[-1].name,
    )
    assert (machines.vip, machines.mail_nodes) == (expected[0].vip, expected[0].nodes)
    with pytest.raises(VagrantError, match="no pair 'vagrant3'"):
        machines.pair("vagrant3")


def test_every_vagrant_address_is_in_the_benchmarking_range() -> None:
    # 198.18.0.0/15 only: never vagrant-libvirt's default private range.
    text = "\n".join(
        path.read_text()
        for path in [
            VAGRANT_DIR / "Vagrantfile",
            *sorted(VAGRANT_INVENTORY.rglob("*.yml")),
            *sorted(VAGRANT_PAIRS_INVENTORY.rglob("*.yml")),
        ]
    )
    addresses = re.findall(r"\b(\d{1,3})\.(\d{1,3})\.\d{1,3}\.\d{1,3}\b", text)
    assert addresses
    for first, second in addresses:
        assert (first, second) in {("198", "18"), ("198", "19"), ("127", "0"), ("255", "255")}


@needs_ansible
def test_the_vagrant_fleet_renders_two_pairs_on_the_one_ensemble(tmp_path: Path) -> None:
    """HAMTA_PAIRS=2: its inventory (not booted here: no KVM, and TCG guests are too slow)."""
    extra: dict[str, object] = {
        "vault_hamta_fleet_admin_password": "test-fleet-admin",
        "vault_hamta_fleet_reader_password": "test-fleet-reader",
    }
    rendered = render(VAGRANT_PAIRS_INVENTORY, tmp_path / "rendered", tmp_path, extra)
    # The reader's id the inventory computes with openssl is the one hamta derives.
    reader = Credentials("fleet-reader", "test-fleet-reader").digest_id
    vips = {}
    for node, pair in (("mx1", "vagrant1"), ("mx2", "vagrant1"), ("mx3", "vagrant2")):
        _relay, agent = relay_and_agent(rendered, node)
        assert agent.agent.cluster == pair
        assert agent.agent.fleet_reader == reader
        vips[node] = agent.vip.address
        assert sorted(agent.agent.zookeeper.split(",")) == [
            "198.19.101.11:2181",
            "198.19.101.12:2181",
            "198.19.101.13:2181",
        ]
    assert vips == {
        "mx1": "198.19.101.100/24",
        "mx2": "198.19.101.100/24",
        "mx3": "198.19.101.101/24",
    }
    text = (rendered / "mx4/r0.res").read_text()
    assert re.findall(r"address (\S+);", text) == ["198.19.101.14:7789", "198.19.101.15:7789"]


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is not installed")
@pytest.mark.parametrize(
    ("pairs", "machines"),
    [("1", "mx1,mx2,arbiter inventory"), ("2", "mx1,mx2,mx3,mx4,arbiter inventory-pairs")],
)
def test_the_vagrantfile_takes_hamta_pairs(pairs: str, machines: str) -> None:
    script = (
        "module Vagrant; def self.configure(*); end; end; load 'Vagrantfile'; "
        "puts MACHINES.map { |m| m[:name] }.join(',') + ' ' + INVENTORY"
    )
    done = subprocess.run(
        ["ruby", "-e", script],
        cwd=VAGRANT_DIR,
        env={**os.environ, "HAMTA_PAIRS": pairs},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.stdout.strip() == machines, done.stderr


# ---------------------------------------------------------------- lint


@needs_ansible
@pytest.mark.parametrize("playbook", PLAYBOOKS, ids=lambda path: path.name)
def test_playbook_syntax(playbook: Path, tmp_path: Path) -> None:
    inventory = VAGRANT_INVENTORY if playbook.parent == VAGRANT_DIR else EXAMPLE_INVENTORY
    done = _ansible(
        ["ansible-playbook", "--syntax-check", "-i", str(inventory), playbook.name],
        playbook.parent,
        tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("ansible-lint") is None, reason="ansible-lint is not installed")
@pytest.mark.parametrize("directory", [ANSIBLE_DIR, VAGRANT_DIR], ids=["ansible", "vagrant"])
def test_ansible_lint_production_profile(directory: Path, tmp_path: Path) -> None:
    done = _ansible(
        ["ansible-lint", "--profile", "production", "--offline", "--nocolor"], directory, tmp_path
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]


def test_build_box_is_valid_bash() -> None:
    done = subprocess.run(
        ["bash", "-n", str(VAGRANT_DIR / "build-box")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert os.access(VAGRANT_DIR / "build-box", os.X_OK)


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is not installed")
def test_the_vagrantfile_is_valid_ruby() -> None:
    done = subprocess.run(
        ["ruby", "-c", str(VAGRANT_DIR / "Vagrantfile")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_parse_recap() -> None:
    """The vagrant harness reads changed and failed counts per host from PLAY RECAP."""
    output = (
        "PLAY RECAP *********\n"
        "arbiter                    : ok=40   changed=0    unreachable=0    failed=0    skipped=3\n"
        "mx1                        : ok=61   changed=2    unreachable=1    failed=0    skipped=5\n"
    )
    changed, failed = parse_recap(output)
    assert changed == {"arbiter": 0, "mx1": 2}
    assert failed == {"arbiter": 0, "mx1": 1}


# ---------------------------------------------------------------- secrets out of sight

# What a task may show of a secret: a module's arguments (in -v output and the callback's
# logs), a template's diff (--diff), or drbdsetup commands carrying --shared-secret.
_SECRET_USE = re.compile(
    r"shared_secret|_password|super_digest|secret_files|resource\.res\.j2"
    r"|drbdadm (--dry-run )?adjust"
)


def _tasks(path: Path) -> list[str]:
    """The tasks of a role's tasks file, as text, one block each."""
    blocks = re.split(r"\n(?=- name: )", path.read_text())
    return [block for block in blocks if block.startswith("- name: ")]


def test_every_task_handling_a_secret_hides_it_with_no_log() -> None:
    unhidden = []
    for path in sorted((ANSIBLE_DIR / "roles").glob("*/tasks/*.yml")):
        for task in _tasks(path):
            if "ansible.builtin.assert:" in task:
                continue  # evaluates a secret's length; prints only its fail_msg
            # Comments and the task's name say what it is about, and a condition is shown as
            # written, not evaluated: only its arguments count.
            body = "\n".join(
                line
                for line in task.splitlines()[1:]
                if not line.strip().startswith(("#", "when:"))
            )
            if _SECRET_USE.search(body) and "no_log: true" not in body:
                unhidden.append(f"{path.relative_to(ANSIBLE_DIR)}: {task.splitlines()[0]}")
    assert unhidden == []


@needs_ansible
def test_zookeepers_super_digest_is_on_no_command_line(tmp_path: Path) -> None:
    digest = "super:cHJpdmF0ZS1kaWdlc3Q="
    rendered = render(
        EXAMPLE_INVENTORY,
        tmp_path / "rendered",
        tmp_path,
        {"vault_zookeeper_super_digest": digest},
    )
    unit = (rendered / "arbiter" / "zookeeper.service").read_text()
    assert digest not in unit and "superDigest" not in unit and "EnvironmentFile" not in unit
    # The JVM reads it from an @argfile (0640 root:zookeeper, written by the role).
    assert "@/etc/zookeeper/hamta/secret.jvmargs" in unit


def test_the_vagrant_libvirtd_listens_where_the_fence_agent_connects_and_nowhere_else(
    tmp_path: Path,
) -> None:
    settings = dict(
        (key.strip(), value.strip().strip('"'))
        for key, _, value in (
            line.partition("=") for line in libvirtd_config(tmp_path / "log").splitlines()
        )
    )
    fence_uri = re.search(
        r"uri: qemu\+tcp://([\d.]+)/system",
        (VAGRANT_INVENTORY / "group_vars/all.yml").read_text(),
    )
    assert fence_uri is not None
    # TCP without authentication: on the cluster network's host address, which the guests'
    # libvirt fence agent uses, never on every address (the management network included).
    assert settings["auth_tcp"] == "none" and settings["listen_tcp"] == "1"
    assert settings["listen_addr"] == fence_uri.group(1) == "198.19.101.1"
