"""The dns and auth_records checks against dnsmasq; a changed MX is a change event, stored.

The DKIM keys are generated with hamta's own keygen and configured in a relay TOML file that
the monitor reads through hamta.config, as an operator's monitor.toml would point at it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hamta import eventlog
from hamta.dkim_signing import SigningKey, generate_key, txt_strings
from hamtactl import main
from monitor.checks import run_check
from monitor.config import load_monitor_config, relay_dkim_keys
from monitor.engine import Engine
from monitor.metrics import MonitorMetrics
from monitor.observation import CheckContext, Observation, SystemClock
from monitor.store import Store
from monitor.verdicts import Outcome
from tests.support.monitor_peers import RecordsDnsServer, render_checks
from tests.support.relay import read_events

DOMAIN = "example.test"
RECORDS: dict[str, Any] = {
    "mx": {DOMAIN: [(10, "mx1.example.test")]},
    "a": {
        "mx1.example.test": ["127.0.0.11"],
        "mx2.example.test": ["127.0.0.12"],
        # host-record also serves the PTR: 127.0.0.77 is forward-confirmed as relay.example.test
        "relay.example.test": ["127.0.0.77"],
    },
    # 127.0.0.78 claims a name that does not resolve back to it
    "ptr": {"78.0.0.127.in-addr.arpa": "liar.example.test"},
}


@pytest.fixture
def dns() -> Iterator[RecordsDnsServer]:
    with RecordsDnsServer(**RECORDS) as server:
        yield server


def write_config(
    tmp_path: Path, dns: RecordsDnsServer, *checks: dict[str, Any], **top: Any
) -> Path:
    path = tmp_path / "monitor.toml"
    text = render_checks(
        list(checks),
        top=top,
        dns={"nameservers": [dns.nameserver]},
        store={"path": str(tmp_path / "monitor.sqlite")},
        log={"file": str(tmp_path / "monitor.log")},
    )
    path.write_text(text)
    return path


DNS_CHECK = {
    "name": "dns",
    "kind": "dns",
    "domain": DOMAIN,
    "timeout": "3s",
    "egress": [{"address": "127.0.0.77", "ehlo_name": "relay.example.test"}],
}


async def _two_runs(config_path: Path, dns: RecordsDnsServer) -> tuple[Observation, Observation]:
    config = load_monitor_config(config_path)
    eventlog.configure("info", config.log.file)
    store = Store(config.store.path)
    engine = Engine(
        config.checks,
        store,
        MonitorMetrics(config.checks),
        eventlog.get_logger(component="monitor"),
        SystemClock(),
        nameservers=tuple(config.dns.nameservers),
    )
    try:
        first = await engine.run_once(config.checks[0])
        await asyncio.to_thread(
            dns.replace, **{**RECORDS, "mx": {DOMAIN: [(10, "mx2.example.test")]}}
        )
        second = await engine.run_once(config.checks[0])
        assert await store.answers("dns") == second.observation.answers
        stored = await store.observations("dns")
    finally:
        await store.close()
    assert [row["changes"] for row in stored] == [[], list(second.observation.changes)]
    return first.observation, second.observation


def test_dns_mx_change_is_an_event(
    tmp_path: Path, dns: RecordsDnsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, dns, DNS_CHECK)
    first, second = asyncio.run(_two_runs(path, dns))
    # `monitor check` compares with the answers the engine stored (and stores nothing).
    dns.replace(**{**RECORDS, "mx": {DOMAIN: [(20, "mx1.example.test")]}})
    assert main(["monitor", "check", "dns", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "changed: MX example.test: 10 mx2.example.test. → 20 mx1.example.test." in out
    assert first.outcome is Outcome.SUCCESS, first.detail
    assert first.answers["MX example.test"] == ["10 mx1.example.test."]
    assert first.answers["PTR 127.0.0.77"] == ["relay.example.test."]
    assert first.changes == ()
    assert second.outcome is Outcome.SUCCESS, second.detail
    assert "MX example.test: 10 mx1.example.test. → 10 mx2.example.test." in second.changes
    logged = read_events(tmp_path / "monitor.log", "DnsAnswerChanged")
    assert any("mx2.example.test" in event["change"] for event in logged), logged


def observe(path: Path, name: str) -> Observation:
    config = load_monitor_config(path)
    check = config.check(name)
    assert check is not None
    keys = relay_dkim_keys(config.relay_config) if config.relay_config else []
    clock = SystemClock()
    context = CheckContext(clock.time(), tuple(config.dns.nameservers), tuple(keys))
    return asyncio.run(run_check(check, context, clock))


def test_dns_failures_name_the_record(tmp_path: Path, dns: RecordsDnsServer) -> None:
    liar = {
        **DNS_CHECK,
        "name": "liar",
        "egress": [{"address": "127.0.0.78", "ehlo_name": "liar.example.test"}],
    }
    wrong_name = {
        **DNS_CHECK,
        "name": "wrong",
        "egress": [{"address": "127.0.0.77", "ehlo_name": "mx1.example.test"}],
    }
    no_mx = {**DNS_CHECK, "name": "nomx", "domain": "nothing.test", "egress": []}
    path = write_config(tmp_path, dns, liar, wrong_name, no_mx)
    seen = observe(path, "liar")
    assert seen.outcome is Outcome.FAILURE
    assert seen.detail == "liar.example.test does not resolve back to 127.0.0.78"
    seen = observe(path, "wrong")
    assert seen.detail == "PTR of 127.0.0.77 is relay.example.test, not mx1.example.test"
    assert observe(path, "nomx").detail == "no MX for nothing.test"


# ------------------------------------------------------------------ auth_records


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SigningKey]:
    directory = tmp_path_factory.mktemp("dkim")
    return {
        "rsa": generate_key(directory, DOMAIN, "s2026", "rsa-sha256"),
        "ed": generate_key(directory, DOMAIN, "ed2026", "ed25519-sha256"),
        "other": generate_key(directory, "other.test", "s1", "rsa-sha256"),
    }


def relay_toml(tmp_path: Path, keys: list[SigningKey]) -> Path:
    path = tmp_path / "hamta.toml"
    tables = [
        f'[[dkim.keys]]\ndomain = "{k.domain}"\nselector = "{k.selector}"\n'
        f'key = "{k.path}"\nalgorithm = "{k.algorithm}"\n'
        for k in keys
    ]
    path.write_text("\n".join(tables))
    return path


def auth_records(keys: dict[str, SigningKey], **change: list[Any]) -> dict[str, Any]:
    txt: dict[str, list[Any]] = {
        DOMAIN: ["v=spf1 a mx include:_spf.example.test -all"],
        f"_spf.{DOMAIN}": ["v=spf1 ip4:192.0.2.0/24 exists:%{i}.x.example.test -all"],
        f"_dmarc.{DOMAIN}": ["v=DMARC1; p=quarantine; rua=mailto:dmarc@example.test"],
        # Split into 255-byte strings, as a zone file must; the key is compared, not the text.
        keys["rsa"].dns_name: [txt_strings(keys["rsa"].txt_value)],
        keys["ed"].dns_name: [keys["ed"].txt_value],
        f"_mta-sts.{DOMAIN}": ["v=STSv1; id=20261207"],
        f"_smtp._tls.{DOMAIN}": ["v=TLSRPTv1; rua=mailto:tls@example.test"],
    }
    return {**RECORDS, "txt": {k: v for k, v in {**txt, **change}.items() if v}}


AUTH_CHECK = {"name": "auth", "kind": "auth_records", "domain": DOMAIN, "timeout": "3s"}


def test_auth_records_all_good(tmp_path: Path, keys: dict[str, SigningKey]) -> None:
    relay = relay_toml(tmp_path, [keys["rsa"], keys["ed"], keys["other"]])
    with RecordsDnsServer(**auth_records(keys)) as dns:
        seen = observe(write_config(tmp_path, dns, AUTH_CHECK, relay_config=str(relay)), "auth")
    assert seen.outcome is Outcome.SUCCESS, seen.detail
    assert seen.facts["spf_lookups"] == 4  # a, mx, include, and exists inside the include
    assert seen.facts["dmarc_policy"] == "quarantine"
    assert seen.facts["dkim_keys"] == 2  # other.test's key is another domain's check
    assert seen.facts["mta_sts"] == "v=STSv1; id=20261207"
    assert "TLS-RPT published" in seen.detail


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("wrong_dkim", "DKIM s2026._domainkey.example.test: published key is not the relay's"),
        ("no_dkim", "DKIM ed2026._domainkey.example.test: no record"),
        ("ed_as_rsa", "DKIM ed2026._domainkey.example.test: published key is not the relay's"),
        ("spf_11", "SPF needs 11 DNS lookups (at most 10)"),
        ("two_spf", "SPF of example.test: 2 v=spf1 records, not 1"),
        ("bad_spf", "SPF of example.test: bad term 'mx:'"),
        ("no_dmarc", "DMARC: 0 records"),
    ],
)
def test_auth_records_problems(
    tmp_path: Path, keys: dict[str, SigningKey], change: str, expected: str
) -> None:
    chain = {f"l{i}.{DOMAIN}": [f"v=spf1 a include:l{i + 1}.{DOMAIN} -all"] for i in range(4)}
    chain[f"l4.{DOMAIN}"] = ["v=spf1 a -all"]
    changes: dict[str, dict[str, list[Any]]] = {
        # The relay's rsa key record carries another key (a rotation published half-way).
        "wrong_dkim": {keys["rsa"].dns_name: [txt_strings(keys["other"].txt_value)]},
        "no_dkim": {keys["ed"].dns_name: []},
        "ed_as_rsa": {keys["ed"].dns_name: [keys["ed"].txt_value.replace("ed25519", "rsa")]},
        # a, include:l0 (2) + l0..l3: a, include (8) + l4: a (1) = 11
        "spf_11": {DOMAIN: [f"v=spf1 a include:l0.{DOMAIN} -all"], **chain},
        "two_spf": {DOMAIN: ["v=spf1 -all", "v=spf1 a -all"]},
        "bad_spf": {DOMAIN: ["v=spf1 mx: -all"]},
        "no_dmarc": {f"_dmarc.{DOMAIN}": ["not dmarc"]},
    }
    relay = relay_toml(tmp_path, [keys["rsa"], keys["ed"]])
    with RecordsDnsServer(**auth_records(keys, **changes[change])) as dns:
        seen = observe(write_config(tmp_path, dns, AUTH_CHECK, relay_config=str(relay)), "auth")
    assert seen.outcome is Outcome.FAILURE
    assert expected in seen.detail, seen.detail
