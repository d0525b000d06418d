"""The smtp, submission, smtps and tls checks against real aiosmtpd peers and real certificates.

The certificates come from a CA made with openssl for this module: valid, expiring in 10 days,
expired, and for another host name. The checks trust that CA through ``ca_file``.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.checks import run_check
from monitor.config import parse_monitor_config
from monitor.observation import CheckContext, Observation, SystemClock
from monitor.verdicts import Outcome
from tests.support.monitor_peers import SmtpPeer, TestCa, render_checks, server_context

NAME = "mx.hamta.test"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ca = TestCa(tmp_path_factory.mktemp("ca"))
    return {
        "ca": ca.cert,
        "valid": ca.issue("valid", NAME, -1, 90),
        "soon": ca.issue("soon", NAME, -80, 10),
        "expired": ca.issue("expired", NAME, -400, -30),
        "other": ca.issue("other", "other.hamta.test", -1, 90),
    }


def observe(**check: Any) -> Observation:
    """Run one check defined by ``check`` (the keys of a [[checks]] table) once."""
    config = parse_monitor_config(render_checks([{"name": "c", **check}]))
    clock = SystemClock()
    return asyncio.run(run_check(config.checks[0], CheckContext(clock.time()), clock))


@pytest.fixture
def starttls_peer(certs: dict[str, Any]) -> Iterator[SmtpPeer]:
    with SmtpPeer(starttls=server_context(*certs["valid"])) as peer:
        yield peer


def test_smtp_banner_ehlo_and_starttls(starttls_peer: SmtpPeer, certs: dict[str, Any]) -> None:
    common = {"kind": "smtp", "host": "127.0.0.1", "port": starttls_peer.port}
    plain = observe(**common)
    assert plain.outcome is Outcome.SUCCESS, plain.detail
    assert plain.detail.startswith("220") and plain.seconds < 5
    tls = observe(**common, starttls=True, ca_file=str(certs["ca"]), server_name=NAME)
    assert tls.outcome is Outcome.SUCCESS, tls.detail
    assert tls.facts["tls_version"] in ("TLSv1.2", "TLSv1.3") and "STARTTLS" in tls.detail
    # Without the CA the chain is not trusted: the check says so.
    untrusted = observe(**common, starttls=True, server_name=NAME)
    assert untrusted.outcome is Outcome.FAILURE
    assert "certificate not trusted" in untrusted.detail


def test_smtp_without_starttls_when_it_is_required() -> None:
    with SmtpPeer() as peer:
        seen = observe(kind="smtp", host="127.0.0.1", port=peer.port, starttls=True)
    assert seen.outcome is Outcome.FAILURE and seen.detail == "STARTTLS not offered"


def test_submission_auth_after_tls_and_a_real_login(certs: dict[str, Any], tmp_path: Path) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("s3cret\n")
    bad.write_text("wrong\n")
    context = server_context(*certs["valid"])
    with SmtpPeer(starttls=context, users={"probe": "s3cret"}) as peer:
        common = {
            "kind": "submission",
            "host": "127.0.0.1",
            "port": peer.port,
            "ca_file": str(certs["ca"]),
            "server_name": NAME,
        }
        advertised = observe(**common)
        login = observe(**common, login={"username": "probe", "password_file": str(good)})
        refused = observe(**common, login={"username": "probe", "password_file": str(bad)})
    assert advertised.outcome is Outcome.SUCCESS, advertised.detail
    assert "AUTH" in advertised.detail and "LOGIN" in str(advertised.facts["auth_methods"])
    assert login.outcome is Outcome.SUCCESS and "login as probe ok" in login.detail
    assert refused.outcome is Outcome.FAILURE and "refused" in refused.detail


def test_submission_without_auth_fails(starttls_peer: SmtpPeer, certs: dict[str, Any]) -> None:
    seen = observe(
        kind="submission",
        host="127.0.0.1",
        port=starttls_peer.port,
        ca_file=str(certs["ca"]),
        server_name=NAME,
    )
    assert seen.outcome is Outcome.FAILURE and seen.detail == "AUTH not advertised after TLS"


def test_smtps_implicit_tls(certs: dict[str, Any]) -> None:
    with SmtpPeer(implicit=server_context(*certs["valid"]), users={"probe": "x"}) as peer:
        seen = observe(
            kind="smtps",
            host="127.0.0.1",
            port=peer.port,
            ca_file=str(certs["ca"]),
            server_name=NAME,
        )
        tls = observe(
            kind="tls",
            endpoint=f"tls://127.0.0.1:{peer.port}",
            ca_file=str(certs["ca"]),
            server_name=NAME,
        )
    assert seen.outcome is Outcome.SUCCESS, seen.detail
    assert seen.facts["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert tls.outcome is Outcome.SUCCESS, tls.detail


def tls_check(certs: dict[str, Any], which: str, **extra: Any) -> Observation:
    with SmtpPeer(starttls=server_context(*certs[which], **extra)) as peer:
        return observe(
            kind="tls",
            endpoint=f"starttls://127.0.0.1:{peer.port}",
            ca_file=str(certs["ca"]),
            server_name=NAME,
        )


def test_tls_valid_certificate(certs: dict[str, Any]) -> None:
    seen = tls_check(certs, "valid")
    assert seen.outcome is Outcome.SUCCESS, seen.detail
    assert 89 < float(seen.facts["days_to_expiry"] or 0) <= 90
    assert seen.facts["expiry_warning_days"] is None


def test_tls_certificate_expiring_in_ten_days_warns(certs: dict[str, Any]) -> None:
    seen = tls_check(certs, "soon")
    assert seen.outcome is Outcome.WARNING, seen.detail
    assert seen.facts["expiry_warning_days"] == 14 and "within 14 days" in seen.detail


def test_tls_expired_certificate_is_expired_not_down(certs: dict[str, Any]) -> None:
    seen = tls_check(certs, "expired")
    assert seen.outcome is Outcome.EXPIRED, seen.detail
    assert -31 < float(seen.facts["days_to_expiry"] or 0) < -29
    assert "expired 30.0 days ago" in seen.detail


def test_tls_wrong_host_name(certs: dict[str, Any]) -> None:
    seen = tls_check(certs, "other")
    assert seen.outcome is Outcome.FAILURE
    assert "Hostname mismatch" in seen.detail or "host name" in seen.detail.lower()


def test_tls_below_1_2_is_refused(certs: dict[str, Any]) -> None:
    try:
        context = server_context(*certs["valid"], maximum=ssl.TLSVersion.TLSv1)
    except ssl.SSLError as exc:
        pytest.skip(f"this OpenSSL cannot serve TLS 1.0: {exc}")
    with SmtpPeer(starttls=context) as peer:
        if not _tls10_client_works(peer.port):
            pytest.skip("this OpenSSL cannot negotiate TLS 1.0 even when both ends allow it")
        seen = observe(
            kind="tls",
            endpoint=f"starttls://127.0.0.1:{peer.port}",
            ca_file=str(certs["ca"]),
            server_name=NAME,
        )
    assert seen.outcome is Outcome.FAILURE
    assert "TLS handshake failed" in seen.detail and "TLS ≥ 1.2" in seen.detail
    assert "it negotiates TLSv1 " in seen.detail  # what the peer would have used is reported


def test_tls_weak_ciphers_are_refused(certs: dict[str, Any]) -> None:
    seen = tls_check(certs, "valid", weak_only=True)
    assert seen.outcome is Outcome.FAILURE
    assert "strong ciphers; it negotiates TLSv1.2 ECDHE-ECDSA-AES128-SHA" in seen.detail


def _tls10_client_works(port: int) -> bool:
    """Whether a client that allows TLS 1.0 gets a handshake from the peer (local OpenSSL)."""
    import smtplib  # noqa: PLC0415 - the plain library client, for this probe only

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.set_ciphers("ALL:@SECLEVEL=0")
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            client.starttls(context=context)
            return True
    except (ssl.SSLError, OSError, smtplib.SMTPException):
        return False
