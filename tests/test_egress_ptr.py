"""The PTR check of the egress sources, against dnsmasq: a warning for each mismatch only."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamta.config import DnsConfig
from hamta.egress import EgressConfig
from hamta.egress_ptr import ptr_warnings
from tests.support.dns import DnsServer

SOURCES = {
    "ok": ("127.0.0.21", "ok.egress.test"),  # PTR and A agree
    "wrongptr": ("127.0.0.22", "b.egress.test"),  # the PTR names another host
    "noforward": ("127.0.0.23", "c.egress.test"),  # the name resolves elsewhere
    "noptr": ("127.0.0.24", "d.egress.test"),  # no PTR at all
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(
        a={"ok.egress.test": ["127.0.0.21"], "c.egress.test": ["127.0.0.99"]},
        ptr={"127.0.0.22": "other.egress.test", "127.0.0.23": "c.egress.test"},
    ) as server:
        yield server


def _egress(names: list[str]) -> EgressConfig:
    return EgressConfig.model_validate(
        {
            "sources": {n: {"address": SOURCES[n][0], "ehlo_name": SOURCES[n][1]} for n in names},
            "pools": {"p": {"sources": names}},
            "default_pool": "p",
        }
    )


def test_each_kind_of_mismatch_is_named_and_a_match_is_silent(dns_server: DnsServer) -> None:
    dns = DnsConfig(nameservers=[dns_server.nameserver], timeout=2)
    warnings = asyncio.run(ptr_warnings(_egress(list(SOURCES)), dns))
    assert len(warnings) == 3, warnings
    text = "\n".join(warnings)
    assert "ok.egress.test" not in text
    assert "the PTR of 127.0.0.22 names other.egress.test, not b.egress.test" in text
    assert "c.egress.test resolves to 127.0.0.99, not back to 127.0.0.23" in text
    assert "no PTR for 127.0.0.24 (NXDOMAIN)" in text


def test_config_check_warns_and_still_passes(dns_server: DnsServer, tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[dns]\nnameservers = ["{dns_server.nameserver}"]\n'
        '[delivery.egress]\ndefault_pool = "p"\n'
        '[delivery.egress.pools.p]\nsources = ["ok", "wrongptr"]\n'
        '[delivery.egress.sources.ok]\naddress = "127.0.0.21"\nehlo_name = "ok.egress.test"\n'
        '[delivery.egress.sources.wrongptr]\naddress = "127.0.0.22"\n'
        'ehlo_name = "b.egress.test"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "hamtactl", "config", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "warning: egress source wrongptr (127.0.0.22, EHLO b.egress.test)" in done.stderr
    assert "egress source ok " not in done.stderr
    assert ": ok (" in done.stdout
