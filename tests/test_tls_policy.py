"""Outbound TLS policy against real peers: unbound validating an ldns-signed zone (DANE), an
HTTPS policy host with a test CA (MTA-STS), aiosmtpd MX sinks with and without STARTTLS.

One relay serves every case (a domain per case, docs/tls-policy.md lists them); each test sends
to its domain and reads the outcome from the sinks and the relay's JSON events.
"""

from __future__ import annotations

import asyncio
import email
import gzip
import hashlib
import json
import smtplib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncresolver
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hamta.config import DnsConfig
from hamta.durable_files import write_durably
from hamta.eventlog import get_logger
from hamta.mta_sts import MtaSts
from hamta.routing import configured_resolver
from hamta.tls_reports import TlsReports
from tests.support import RecordingSink, free_port
from tests.support.dnssec import ValidatingResolver
from tests.support.pki import HttpsServer, TestCa
from tests.support.relay import RelayProcess

# Loopback addresses of this file's servers (none of the other tests use 127.19.175.0/24).
TLS_MX = "127.19.175.10"  # STARTTLS, a certificate from the test CA for the names below
PLAIN_MX = "127.19.175.11"  # no STARTTLS
POLICY_HOST = "127.19.175.20"  # HTTPS: MTA-STS policies
RESOLVER = "127.19.175.53"
CA_NAMES = ["mx.good.dane.test", "mx.ta.dane.test", "mx.sts.test", "mx.plain.test"]


def _spki_sha256(cert: Path) -> str:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    spki = loaded.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _cert_sha256(cert: Path) -> str:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    return hashlib.sha256(loaded.public_bytes(Encoding.DER)).hexdigest()


def _mx(domain: str, host: str, ip: str) -> list[str]:
    return [f"{domain}. IN MX 10 {host}.", f"{host}. IN A {ip}"]


RUA_MAIL = "mailto:tlsrpt@reports.test"
RUA_HTTPS = "https://mta-sts.sts.test/tlsrpt"


@dataclass
class World:
    relay: RelayProcess
    tls_sink: RecordingSink
    plain_sink: RecordingSink
    https: HttpsServer
    resolver: ValidatingResolver
    ca: TestCa


STS_ENFORCE = "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmx: *.stsgood.test\nmax_age: 86400\n"
STS_OTHER_MX = "version: STSv1\nmode: enforce\nmx: mx.elsewhere.test\nmax_age: 86400\n"
STS_TESTING = "version: STSv1\nmode: testing\nmx: mx.ststesting.test\nmax_age: 86400\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("tlspolicy")
    ca = TestCa(base / "ca")
    mx_cert, mx_key, mx_chain = ca.issue("mx", CA_NAMES)
    web_cert, web_key, _ = ca.issue(
        "web",
        [
            "mta-sts.sts.test",
            "mta-sts.ststesting.test",
            "mta-sts.stsother.test",
            "mta-sts.stsrouted.test",
        ],
    )
    port = free_port(TLS_MX)
    ee = _spki_sha256(mx_cert)
    signed = [
        *_mx("good.dane.test", "mx.good.dane.test", TLS_MX),
        f"_{port}._tcp.mx.good.dane.test. IN TLSA 3 1 1 {ee}",
        *_mx("full.dane.test", "mx.full.dane.test", TLS_MX),
        f"_{port}._tcp.mx.full.dane.test. IN TLSA 3 0 1 {_cert_sha256(mx_cert)}",
        *_mx("ta.dane.test", "mx.ta.dane.test", TLS_MX),
        f"_{port}._tcp.mx.ta.dane.test. IN TLSA 2 0 1 {_cert_sha256(ca.cert)}",
        *_mx("bad.dane.test", "mx.bad.dane.test", TLS_MX),
        f"_{port}._tcp.mx.bad.dane.test. IN TLSA 3 1 1 {'00' * 32}",
        *_mx("notls.dane.test", "mx.notls.dane.test", PLAIN_MX),
        f"_{port}._tcp.mx.notls.dane.test. IN TLSA 3 1 1 {ee}",
        *_mx("unusable.dane.test", "mx.unusable.dane.test", TLS_MX),
        f"_{port}._tcp.mx.unusable.dane.test. IN TLSA 1 1 1 {'00' * 32}",
        *_mx("none.dane.test", "mx.none.dane.test", TLS_MX),
        *_mx("bogus.dane.test", "mx.bogus.dane.test", TLS_MX),
    ]
    # Added after signing: no valid signature, so unbound answers SERVFAIL (bogus).
    tamper = [f"_{port}._tcp.mx.bogus.dane.test. 60 IN TLSA 3 1 1 {ee}"]
    sts = f"mta-sts.{{}}. IN A {POLICY_HOST}"
    unsigned = {
        "plain.test": [*_mx("plain.test", "mx.plain.test", TLS_MX)],
        "clear.test": [*_mx("clear.test", "mx.clear.test", PLAIN_MX)],
        "wrongname.test": [*_mx("wrongname.test", "mx.wrongname.test", TLS_MX)],
        "sts.test": [
            *_mx("sts.test", "mx.sts.test", TLS_MX),
            '_mta-sts.sts.test. IN TXT "v=STSv1; id=20261207"',
            sts.format("sts.test"),
            f'_smtp._tls.sts.test. IN TXT "v=TLSRPTv1; rua={RUA_MAIL},{RUA_HTTPS}"',
        ],
        "stsother.test": [
            *_mx("stsother.test", "mx.stsother.test", TLS_MX),
            '_mta-sts.stsother.test. IN TXT "v=STSv1; id=1"',
            sts.format("stsother.test"),
        ],
        "stsrouted.test": [
            '_mta-sts.stsrouted.test. IN TXT "v=STSv1; id=1"',
            sts.format("stsrouted.test"),
        ],
        "ststesting.test": [
            *_mx("ststesting.test", "mx.ststesting.test", TLS_MX),
            '_mta-sts.ststesting.test. IN TXT "v=STSv1; id=1"',
            sts.format("ststesting.test"),
        ],
    }
    pages = {
        ("mta-sts.sts.test", "/.well-known/mta-sts.txt"): (200, "text/plain", STS_ENFORCE),
        ("mta-sts.stsother.test", "/.well-known/mta-sts.txt"): (200, "text/plain", STS_OTHER_MX),
        ("mta-sts.ststesting.test", "/.well-known/mta-sts.txt"): (200, "text/plain", STS_TESTING),
        ("mta-sts.stsrouted.test", "/.well-known/mta-sts.txt"): (200, "text/plain", STS_OTHER_MX),
    }
    resolver = ValidatingResolver(
        base / "dns", {"dane.test": signed}, unsigned, {"dane.test": tamper}, listen=RESOLVER
    )
    with (
        resolver,
        RecordingSink(host=TLS_MX, port=port, tls_cert=mx_chain, tls_key=mx_key) as tls_sink,
        RecordingSink(host=PLAIN_MX, port=port) as plain_sink,
        HttpsServer(POLICY_HOST, 443, web_cert, web_key, pages) as https,
    ):
        config: dict[str, dict[str, Any]] = {
            "dns": {"nameservers": [resolver.nameserver], "dnssec": True},
            "delivery": {
                "port": port,
                "routes": {"stsrouted.test": f"[{TLS_MX}]:{port}"},
                "domains": {
                    "clear.test": {"tls": "required"},
                    "plain.test": {"tls": "verify"},
                    "wrongname.test": {"tls": "verify"},
                    "none.dane.test": {"tls": "dane"},
                },
            },
            "retry": {"first_delay": "1h"},
            "tls_policy": {"ca_file": str(ca.cert)},
        }
        relay = RelayProcess(base / "relay", config)
        relay.start(timeout=60.0)  # a loaded shared machine starts slowly
        try:
            yield World(relay, tls_sink, plain_sink, https, resolver, ca)
        finally:
            relay.stop()


def _send(world: World, domain: str) -> str:
    with smtplib.SMTP("127.0.0.1", world.relay.port, timeout=10) as client:
        client.sendmail("a@origin.test", [f"x@{domain}"], f"Subject: {domain}\r\n\r\nhi\r\n")
    return domain


def _outcome(world: World, domain: str, timeout: float = 15.0) -> dict[str, Any]:
    """The first Delivery or TransientFailure event for ``domain``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in world.relay.events():
            if event.get("event") in ("Delivery", "TransientFailure", "Bounce") and (
                event.get("domain") == domain
            ):
                return event
        time.sleep(0.1)  # the relay's log is a file another process writes: nothing to await
    raise AssertionError(f"no outcome for {domain}: {world.relay.events()[-5:]}")


def _delivered_over(world: World, sink: RecordingSink, domain: str) -> bool:
    event = _outcome(world, domain)
    assert event["event"] == "Delivery", event
    (message,) = [m for m in sink.messages if m.rcpt_tos == (f"x@{domain}",)]
    return message.tls


def _deferred(world: World, domain: str) -> str:
    event = _outcome(world, domain)
    assert event["event"] == "TransientFailure", event
    assert event["enhanced_code"] == "4.7.5", event
    assert not [m for m in world.tls_sink.messages if m.rcpt_tos == (f"x@{domain}",)]
    assert not [m for m in world.plain_sink.messages if m.rcpt_tos == (f"x@{domain}",)]
    return str(event["response"])


def test_dane_ee_spki_sha256_match_delivers_over_tls(world: World) -> None:
    assert _delivered_over(world, world.tls_sink, _send(world, "good.dane.test"))
    met = [e for e in world.relay.events("TlsPolicyMet") if e["mx_host"] == "mx.good.dane.test"]
    assert met[0]["policy"] == "DANE" and met[0]["policy_type"] == "tlsa"


def test_dane_ee_full_certificate_match_delivers(world: World) -> None:
    assert _delivered_over(world, world.tls_sink, _send(world, "full.dane.test"))


def test_dane_ta_matches_the_issuer_in_the_chain(world: World) -> None:
    assert _delivered_over(world, world.tls_sink, _send(world, "ta.dane.test"))


def test_dane_mismatch_defers(world: World) -> None:
    reason = _deferred(world, _send(world, "bad.dane.test"))
    assert "no TLSA record matches" in reason


def test_dane_without_starttls_defers(world: World) -> None:
    reason = _deferred(world, _send(world, "notls.dane.test"))
    assert "STARTTLS not offered" in reason


def test_dane_bogus_tlsa_lookup_defers(world: World) -> None:
    reason = _deferred(world, _send(world, "bogus.dane.test"))
    assert "TLSA lookup for mx.bogus.dane.test failed" in reason
    failure = [
        e for e in world.relay.events("TlsPolicyFailure") if e["domain"] == "bogus.dane.test"
    ]
    assert failure[0]["result_type"] == "dnssec-invalid"


def test_dane_only_unusable_records_means_tls_unauthenticated(world: World) -> None:
    # RFC 7672 2.2: PKIX-EE (1) is not for SMTP; TLS is still mandatory (the name does not match).
    assert _delivered_over(world, world.tls_sink, _send(world, "unusable.dane.test"))


def test_tls_dane_mode_without_tlsa_defers(world: World) -> None:
    reason = _deferred(world, _send(world, "none.dane.test"))
    assert "no DNSSEC-validated TLSA record" in reason


def test_required_without_starttls_defers_never_clear(world: World) -> None:
    reason = _deferred(world, _send(world, "clear.test"))
    assert "STARTTLS not offered" in reason
    failure = [e for e in world.relay.events("TlsPolicyFailure") if e["domain"] == "clear.test"]
    assert failure[0]["result_type"] == "starttls-not-supported"
    status, metrics = world.relay.get("/metrics")
    assert status == 200
    line = (
        'hamta_tls_policy_sessions_total{outcome="starttls-not-supported",policy="no-policy-found"}'
    )
    assert line.encode() in metrics


def test_verify_with_trusted_certificate_delivers(world: World) -> None:
    assert _delivered_over(world, world.tls_sink, _send(world, "plain.test"))


def test_verify_name_mismatch_defers(world: World) -> None:
    reason = _deferred(world, _send(world, "wrongname.test"))
    assert "certificate" in reason.lower()


def test_mta_sts_enforce_delivers_verified_and_caches_on_the_spool(world: World) -> None:
    assert _delivered_over(world, world.tls_sink, _send(world, "sts.test"))
    cached = json.loads((world.relay.spool / "mta-sts" / "sts.test.json").read_text())
    assert cached["id"] == "20261207" and "mode: enforce" in cached["policy"]
    assert ("mta-sts.sts.test", "/.well-known/mta-sts.txt") in world.https.requests


def test_mta_sts_enforce_mx_not_in_policy_defers(world: World) -> None:
    reason = _deferred(world, _send(world, "stsother.test"))
    assert "not in the MTA-STS policy" in reason


def test_mta_sts_does_not_apply_to_a_static_route(world: World) -> None:
    # The domain's enforce policy names other MX hosts; mail routed to a smarthost goes there.
    assert _delivered_over(world, world.tls_sink, _send(world, "stsrouted.test"))


def test_mta_sts_testing_sends_despite_a_failed_check(world: World) -> None:
    # The certificate does not name mx.ststesting.test: reported, then sent (RFC 8461 5).
    assert _delivered_over(world, world.tls_sink, _send(world, "ststesting.test"))
    failed = [
        e for e in world.relay.events("StartTlsFailed") if e["mx_host"] == "mx.ststesting.test"
    ]
    assert failed and failed[0]["policy"] == "MTA-STS testing"


def test_tls_reports_are_counted_durably_and_sent_to_each_rua(world: World, tmp_path: Path) -> None:
    """RFC 8460: a day's counts, read back by another process (the next node), sent once the
    day is over: gzipped JSON by POST to the https rua, a multipart/report to the mailto one."""
    day = 1796601600.0  # 2026-12-07 00:00 UTC
    now = [day + 3600]
    dns_config = DnsConfig(nameservers=[world.resolver.nameserver])
    resolver = configured_resolver(dns.asyncresolver.Resolver, dns_config)
    tls = ssl.create_default_context(cafile=str(world.ca.cert))
    directory = tmp_path / "tlsrpt"

    def reports() -> TlsReports:
        return TlsReports(
            directory,
            "w0",
            "relay.test",
            resolver,
            tls,
            lambda: now[0],
            get_logger(),
            sender="postmaster@relay.test",
        )

    policy = ["version: STSv1", "mode: enforce", "mx: mx.sts.test", "max_age: 86400"]
    first = reports()
    for _ in range(3):
        first.record("sts.test", "sts", policy, "")
    first.record("sts.test", "sts", policy, "", failure="certificate-host-mismatch", ip="192.0.2.1")
    first.flush()
    queued: list[tuple[bytes, str, list[str]]] = []

    async def enqueue(body: bytes, sender: str, recipients: list[str]) -> None:
        queued.append((body, sender, recipients))

    second = reports()  # after a failover: what the first one wrote
    assert asyncio.run(second.send_due(enqueue)) == 0  # the day is not over
    now[0] = day + 86400 + 60  # over, but another worker may not have flushed the day yet
    assert asyncio.run(second.send_due(enqueue)) == 0
    now[0] = day + 86400 + 180
    assert asyncio.run(second.send_due(enqueue)) == 2
    assert asyncio.run(reports().send_due(enqueue)) == 0  # sent once
    ((host, _, ctype, body),) = [p for p in world.https.posts if p[1] == "/tlsrpt"]
    assert (host, ctype) == ("mta-sts.sts.test", "application/tlsrpt+gzip")
    report = json.loads(gzip.decompress(body))
    assert report["date-range"]["start-datetime"] == "2026-12-07T00:00:00Z"
    (entry,) = report["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert entry["policy"]["policy-domain"] == "sts.test"
    assert entry["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 1,
    }
    assert entry["failure-details"] == [
        {
            "result-type": "certificate-host-mismatch",
            "receiving-mx-hostname": "",
            "receiving-ip": "192.0.2.1",
            "failed-session-count": 1,
        }
    ]
    ((message, sender, recipients),) = queued
    assert sender == "postmaster@relay.test" and recipients == ["tlsrpt@reports.test"]
    parsed = email.message_from_bytes(message)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "tlsrpt"
    assert parsed["TLS-Report-Domain"] == "sts.test"
    (attached,) = [p for p in parsed.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    payload = attached.get_payload(decode=True)
    assert isinstance(payload, bytes) and json.loads(gzip.decompress(payload)) == report


def test_relay_counts_policy_sessions_on_the_spool(world: World) -> None:
    """The relay's own counts, written when it stops (the last test: it stops the relay)."""
    _delivered_over(world, world.tls_sink, _send(world, "sts.test"))
    _deferred(world, _send(world, "stsother.test"))
    world.relay.stop()
    (counts,) = (world.relay.spool / "tlsrpt").glob("*.w0.json")
    data = json.loads(counts.read_text())
    (sts,) = data["sts.test"].values()
    assert sts["type"] == "sts" and sts["success"] >= 1
    (other,) = data["stsother.test"].values()
    assert other["failures"] and not other["success"]
    (dane,) = data["good.dane.test"].values()
    assert dane["type"] == "tlsa" and dane["success"] == 1


def test_mta_sts_fetches_again_on_a_new_id_or_near_expiry_only(
    world: World, tmp_path: Path
) -> None:
    """RFC 8461 3.3/5.1: a cached policy whose id the TXT record still names, far from expiry,
    is used as it is; a new id, or a policy near its max_age, is fetched again."""
    dns_config = DnsConfig(nameservers=[world.resolver.nameserver])
    resolver = configured_resolver(dns.asyncresolver.Resolver, dns_config)
    tls = ssl.create_default_context(cafile=str(world.ca.cert))
    now = 5_000_000.0
    fetches = ("mta-sts.sts.test", "/.well-known/mta-sts.txt")

    def policy_with(cached_id: str, expires: float) -> str:
        record = {"id": cached_id, "policy": STS_ENFORCE, "fetched": now - 10, "expires": expires}
        write_durably(tmp_path, "sts.test.json", json.dumps(record).encode())
        before = world.https.requests.count(fetches)
        found = asyncio.run(
            MtaSts(tmp_path, resolver, tls, lambda: now, get_logger()).policy("sts.test")
        )
        assert found.policy is not None and found.policy.mode == "enforce"
        return "fetched" if world.https.requests.count(fetches) > before else "cached"

    assert policy_with("20261207", now + 80000) == "cached"
    assert policy_with("old", now + 80000) == "fetched"  # the id changed
    assert policy_with("20261207", now + 100) == "fetched"  # refreshed before it expires
    stored = json.loads((tmp_path / "sts.test.json").read_text())
    assert stored["id"] == "20261207" and stored["expires"] == now + 86400
