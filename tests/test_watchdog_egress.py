"""The watchdog takes the egress addresses off with the virtual IP when it fires.

Its ``ip`` runs in a namespace of this test's own (prefix ``he``, subnet 198.19.190.0/24).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fencing.watchdog import Arm, BadCommandError, Guard, encode, parse_command

EGRESS = ("198.19.190.101/32", "198.19.190.102/32")


def test_arm_carries_the_egress_addresses_and_refuses_bad_ones() -> None:
    arm = Arm(timeout=1.0, vip="198.19.190.100/24", interface="eth0", also=EGRESS)
    assert parse_command(encode(arm)) == arm
    line = {"cmd": "arm", "timeout": 1.0, "vip": "198.19.190.100/24", "interface": "eth0"}
    for also, message in (
        ("198.19.190.101/32", "also must be a list"),
        (["not-an-address"], "also: "),
        ([7], "also must be a list"),
    ):
        with pytest.raises(BadCommandError, match=message):
            parse_command(json.dumps({**line, "also": also}).encode())
    with pytest.raises(BadCommandError, match="also needs interface"):
        Arm(timeout=1.0, also=EGRESS)


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"he-wd-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(
            ["ip", "-n", name, "link", "add", "hwe0", "type", "veth", "peer", "name", "hwe1"],
            check=True,
        )
        for address in ("198.19.190.1/24", "198.19.190.100/24", *EGRESS):
            subprocess.run(["ip", "-n", name, "addr", "add", address, "dev", "hwe0"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


def held(namespace: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", namespace, "-j", "-4", "addr", "show", "dev", "hwe0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {entry["local"] for entry in json.loads(out)[0]["addr_info"]}


def test_firing_removes_the_vip_and_every_egress_address(namespace: str, tmp_path: Path) -> None:
    # The watchdog runs ``ip`` in the agent's namespace; here, this wrapper puts it in ours.
    wrapper = tmp_path / "ip"
    wrapper.write_text(f'#!/bin/sh\nexec ip -n {namespace} "$@"\n')
    wrapper.chmod(0o755)
    guard = Guard(agent_pid=os.getpid(), device=None, ip=str(wrapper))
    guard.handle(Arm(timeout=30.0, vip="198.19.190.100/24", interface="hwe0", also=EGRESS), 0.0)
    record = guard.fire("stdin_eof", 1.0)
    removed = [a["outcome"] for a in record["actions"] if a["action"] == "remove_egress"]
    assert removed == ["removed", "removed"], record["actions"]
    assert held(namespace) == {"198.19.190.1"}
    assert record["also"] == list(EGRESS)
