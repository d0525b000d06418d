"""The pure rules of outbound TLS (hamta.tls_policy) and the MTA-STS cache across a failover."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import dns.asyncresolver
import pytest

from hamta.config import ConfigError, DnsConfig, parse_config
from hamta.durable_files import write_durably
from hamta.eventlog import get_logger
from hamta.mta_sts import MtaSts
from hamta.routing import configured_resolver
from hamta.tls_policy import (
    DaneLookup,
    PolicyError,
    StsPolicy,
    Tlsa,
    decide,
    parse_sts_policy,
    sts_record_id,
)
from tests.support import free_port

ENFORCE = StsPolicy("enforce", ("mx.example.test", "*.pool.example.test"), 86400, "1")
TESTING = StsPolicy("testing", ("mx.example.test",), 86400, "1")
EE = Tlsa(3, 1, 1, b"\x01" * 32)
PKIX_EE = Tlsa(1, 1, 1, b"\x01" * 32)
NO_DANE = DaneLookup("insecure")


def test_policy_parses_with_crlf_and_several_mx() -> None:
    text = (
        "version: STSv1\r\nmode: enforce\r\nmx: MX.Example.test.\r\nmx: *.pool.test\r\n"
        "max_age: 604800\r\n"
    )
    policy = parse_sts_policy(text, "abc")
    assert policy == StsPolicy("enforce", ("mx.example.test", "*.pool.test"), 604800, "abc")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("mode: enforce\nmx: a.test\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n", "max_age"),
        ("version: STSv1\nmode enforce\n", "key: value"),
    ],
)
def test_bad_policies_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(PolicyError, match=why):
        parse_sts_policy(text)


def test_max_age_is_capped_at_a_year() -> None:
    policy = parse_sts_policy("version: STSv1\nmode: none\nmax_age: 99999999\n")
    assert policy.max_age == 31557600


def test_mx_patterns_match_exactly_or_one_leftmost_label() -> None:
    assert ENFORCE.matches("MX.example.test.")
    assert ENFORCE.matches("a.pool.example.test")
    assert not ENFORCE.matches("a.b.pool.example.test")
    assert not ENFORCE.matches("pool.example.test")
    assert not ENFORCE.matches("mx2.example.test")


def test_sts_txt_record_id_rules() -> None:
    assert sts_record_id(["v=STSv1; id=20261207;"]) == "20261207"
    assert sts_record_id(["v=spf1 -all", "v=STSv1; id=a1"]) == "a1"
    assert sts_record_id(["v=STSv1; id=1", "v=STSv1; id=2"]) is None  # RFC 8461 3.1
    assert sts_record_id([]) is None
    with pytest.raises(PolicyError):
        sts_record_id(["v=STSv1; id=not-alphanumeric!"])


@pytest.mark.parametrize(
    ("mode", "dane", "sts", "level", "refused"),
    [
        ("off", DaneLookup("records", (EE,)), ENFORCE, "off", False),
        ("opportunistic", NO_DANE, None, "may", False),
        ("opportunistic", DaneLookup("records", (EE,)), ENFORCE, "dane", False),  # DANE first
        ("opportunistic", DaneLookup("records", (PKIX_EE,)), None, "encrypt", False),
        ("opportunistic", DaneLookup("failed", error="SERVFAIL"), None, "dane", True),
        ("opportunistic", DaneLookup("none"), ENFORCE, "verify", False),
        ("opportunistic", NO_DANE, TESTING, "verify", False),
        ("required", NO_DANE, None, "encrypt", False),
        ("verify", NO_DANE, None, "verify", False),
        ("dane", DaneLookup("none"), None, "dane", True),
        ("dane", NO_DANE, None, "dane", True),
        ("dane", DaneLookup("records", (EE,)), None, "dane", False),
    ],
)
def test_decision_table(
    mode: str, dane: DaneLookup, sts: StsPolicy | None, level: str, refused: bool
) -> None:
    requirement = decide(mode, "mx.example.test", dane, sts)
    assert requirement.level == level
    assert bool(requirement.refuse) == refused


def test_mta_sts_mx_mismatch_refuses_in_enforce_and_reports_in_testing() -> None:
    enforce = decide("opportunistic", "other.test", NO_DANE, ENFORCE)
    assert "not in the MTA-STS policy" in enforce.refuse
    testing = decide("opportunistic", "other.test", NO_DANE, TESTING)
    assert not testing.refuse and testing.level == "may" and not testing.enforce


def test_cached_policy_serves_the_next_node_when_dns_is_down(tmp_path: Path) -> None:
    """The node taking over reads the policy the old one cached on the spool volume, and
    applies it although nothing answers DNS (RFC 8461 5.1)."""
    text = "version: STSv1\nmode: enforce\nmx: mx.example.test\nmax_age: 86400\n"
    record = {"id": "7", "policy": text, "fetched": 1000.0, "expires": 1000.0 + 86400}
    write_durably(tmp_path, "example.test.json", json.dumps(record).encode())
    dead = DnsConfig(nameservers=[f"127.0.0.1:{free_port(udp=True)}"], timeout=0.5)
    resolver = configured_resolver(dns.asyncresolver.Resolver, dead)
    tls = ssl.create_default_context()
    sts = MtaSts(tmp_path, resolver, tls, lambda: 5000.0, get_logger())
    found = asyncio.run(sts.policy("example.test"))
    assert found.policy is not None and found.policy.mode == "enforce"
    assert "lookup failed" in found.error
    # Expired: no longer applies.
    late = MtaSts(tmp_path, resolver, tls, lambda: 1000.0 + 86401, get_logger())
    assert late.cached("example.test") is None


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('[delivery.domains."x.test"]\ntls = "dane"\n', "needs \\[dns\\] dnssec = true"),
        ('[delivery]\nstarttls = "strict"\n', "delivery.starttls"),
        ("[dns]\ndnssec = true\n", "dnssec = true needs nameservers"),
        ('[tls_policy]\nca_file = "/nonexistent/ca.pem"\n', "cannot load CA certificates"),
    ],
)
def test_tls_settings_are_validated_with_a_clear_message(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_config(text)


def test_tls_settings_accepted() -> None:
    config = parse_config(
        '[dns]\nnameservers = ["127.0.0.1:53"]\ndnssec = true\n'
        '[delivery.domains."x.test"]\ntls = "dane"\n[delivery.domains."y.test"]\ntls = "off"\n'
    )
    assert config.delivery.domains["x.test"].tls == "dane"
    assert config.delivery.starttls == "opportunistic"
