"""The agent's configuration: every mistake is named with its key, and nothing starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cluster.config import ConfigError, load_agent_config, parse_agent_config
from cluster.decision_data import Step, Takeover
from tests.support.relay import HAMTA

GOOD = """
[agent]
node = "mx1"
cluster = "mail"
zookeeper = "198.18.0.11:2181,198.18.0.12:2181"
session_timeout = "2s"
relay_config = "/etc/hamta/relay.toml"
min_failover_interval = "5s"
step_timeouts = { storage = "90s" }

[storage]
driver = "blockdev"
device = "/dev/loop7"
mountpoint = "/var/spool/hamta"

[vip]
address = "198.18.0.100/24"

[fencing]
commands = [["fence_ipmilan", "--ip", "bmc-{peer}", "--action", "off"]]
"""


COMMANDS = 'commands = [["fence_ipmilan"'


def test_a_good_configuration_becomes_a_policy() -> None:
    config = parse_agent_config(GOOD)
    policy = config.policy()
    assert policy.node == "mx1"
    assert policy.min_failover_interval == 5.0
    assert policy.timeout(Step.STORAGE) == 90.0
    assert policy.timeout(Step.FENCE) == 20.0  # fencing.timeout's default
    assert policy.relay_start_limit == 3
    assert config.storage.options()["device"] == Path("/dev/loop7")
    assert config.fencing.commands[0][2] == "bmc-{peer}"
    assert policy.takeover is Takeover.FENCE_OR_LEASE and policy.lease_grace == 2.0
    strict = parse_agent_config(
        GOOD.replace("[fencing]", '[fencing]\ntakeover = "fence-only"\nlease_grace = "5s"')
    ).policy()
    assert strict.takeover is Takeover.FENCE_ONLY and strict.lease_grace == 5.0
    # Silent servers count as a cut after a quarter of the session (cluster.failsafe.cut_off).
    assert policy.zookeeper_patience == 0.5
    longer = parse_agent_config(GOOD.replace('session_timeout = "2s"', 'session_timeout = "6s"'))
    assert longer.policy().zookeeper_patience == 1.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('node = "mx1"', 'nod = "mx1"'), "agent.nod: unknown key"),
        (('session_timeout = "2s"', 'session_timeout = "two"'), "agent.session_timeout"),
        (('session_timeout = "2s"', 'session_timeout = "0s"'), "agent.session_timeout"),
        (('zookeeper = "198.18.0.11:2181,198.18.0.12:2181"', 'zookeeper = "zk:99999"'), "port"),
        (('node = "mx1"', 'node = "mx/1"'), "agent.node"),
        (
            ('zookeeper = "198.18.0.11:2181,198.18.0.12:2181"', 'zookeeper = "zk:2181/a//b"'),
            "agent.zookeeper: invalid chroot /a//b",
        ),
        (('driver = "blockdev"', 'driver = "nfs"'), "storage.driver"),
        (('device = "/dev/loop7"\n', ""), "storage.device and storage.mountpoint are required"),
        (('storage = "90s"', 'storage = "-1s"'), "agent.step_timeouts.storage"),
        (('storage = "90s"', 'mount = "9s"'), "agent.step_timeouts.mount"),
        (("[vip]", "[vips]"), "vips: unknown key"),
        (('relay_config = "/etc/hamta/relay.toml"\n', ""), "agent.relay_config: Field required"),
        (("[agent]", "[agent"), "not valid TOML"),
        (
            (
                'commands = [["fence_ipmilan"',
                'agents = [{ type = "ssh" }]\ncommands = [["fence_ipmilan"',
            ),
            "fencing.agents: fencing agent 0 (ssh)",
        ),
        (
            (
                'commands = [["fence_ipmilan"',
                'agents = [{ type = "power" }]\ncommands = [["fence_ipmilan"',
            ),
            "fencing.agents",
        ),
        (("[fencing]", '[fencing]\ntakeover = "lease-only"'), "fencing.takeover"),
        (("[vip]", '[watchdog]\ntimeout = "2s"\n[vip]'), "watchdog.timeout (2s) must be shorter"),
        (("[vip]", "[watchdog]\nenable = false\n[vip]"), "watchdog.enable: unknown key"),
        (("[vip]", '[watchdog]\nstart_timeout = "0s"\n[vip]'), "watchdog.start_timeout"),
        (("[fencing]", '[fencing]\nlease_grace = "-2s"'), "fencing.lease_grace"),
        (
            (
                'commands = [["fence_ipmilan", "--ip", "bmc-{peer}", "--action", "off"]]',
                'takeover = "fence-only"',
            ),
            "takeover = 'fence-only' needs fencing.agents or fencing.commands",
        ),
    ],
)
def test_each_mistake_is_named(change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(ConfigError) as error:
        parse_agent_config(GOOD.replace(old, new), "agent.toml")
    assert message in str(error.value)
    assert str(error.value).startswith("agent.toml:")


def test_stonith_agents_are_configured_in_order() -> None:
    text = GOOD.replace(
        'commands = [["fence_ipmilan"',
        'agents = [{ type = "ipmi", host = "bmc-{node}", username = "admin", '
        'password_file = "/etc/hamta/bmc.pw" }, { type = "libvirt", domain = "mx-{node}" }]\n'
        'commands = [["fence_ipmilan"',
    )
    config = parse_agent_config(text)
    assert [entry["type"] for entry in config.fencing.agents] == ["ipmi", "libvirt"]


def test_unreadable_files_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_agent_config(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_agent_config(binary)


def test_hamta_agent_refuses_a_broken_file_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD.replace('driver = "blockdev"', 'driver = "floppy"'))
    done = subprocess.run(
        [*HAMTA, "agent", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "storage.driver" in done.stderr
