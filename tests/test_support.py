"""The test-support servers themselves: real dnsmasq, aiosmtpd and smtp-sink on loopback."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from tests.support import (
    DnsServer,
    PostfixSmtpSink,
    RecordingSink,
    free_port,
    make_self_signed,
)
from tests.support.relay import RelayProcess

MESSAGE = b"From: a@origin.test\r\nTo: b@dest.test\r\nSubject: hi\r\n\r\nbody\r\n.leading dot\r\n"


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(
        mx={"example.test": [(20, "mx2.example.test"), (10, "mx1.example.test.")]},
        a={"mx1.example.test": ["127.0.0.5"], "aonly.test": ["127.0.0.6", "127.0.0.7"]},
        aaaa={"mx1.example.test": ["::1"], "v6only.test": ["::1"]},
        null_mx=["nomail.test"],
    ) as server:
        yield server


@pytest.fixture
def sink() -> Iterator[RecordingSink]:
    with RecordingSink("127.0.0.5") as server:
        yield server


def _unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- DnsServer ------------------------------------------------------------------------------


def test_dns_nameserver_format(dns_server: DnsServer) -> None:
    assert dns_server.running
    assert dns_server.nameserver == f"127.0.0.1:{dns_server.port}"


@pytest.mark.parametrize("tcp", [False, True])
def test_dns_mx_in_preference_order(dns_server: DnsServer, tcp: bool) -> None:
    answer = dns_server.resolver().resolve("example.test", "MX", tcp=tcp)
    records = sorted((r.preference, r.exchange.to_text()) for r in answer)
    assert records == [(10, "mx1.example.test."), (20, "mx2.example.test.")]


def test_dns_a_and_aaaa(dns_server: DnsServer) -> None:
    resolver = dns_server.resolver()
    assert [r.to_text() for r in resolver.resolve("mx1.example.test", "A")] == ["127.0.0.5"]
    assert [r.to_text() for r in resolver.resolve("mx1.example.test", "AAAA")] == ["::1"]
    assert sorted(r.to_text() for r in resolver.resolve("aonly.test", "A")) == [
        "127.0.0.6",
        "127.0.0.7",
    ]
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve("v6only.test", "A")


def test_dns_null_mx(dns_server: DnsServer) -> None:
    query = dns.message.make_query("nomail.test", "MX")
    response = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=2)
    assert response.rcode() == dns.rcode.NOERROR
    (rrset,) = response.answer
    assert rrset.rdtype == dns.rdatatype.MX
    assert [(r.preference, r.exchange) for r in rrset] == [(0, dns.name.root)]
    assert rrset.to_text() == "nomail.test. 0 IN MX 0 ."
    # The null-MX domain exists, it just has no address.
    with pytest.raises(dns.resolver.NoAnswer):
        dns_server.resolver().resolve("nomail.test", "A")


def test_dns_a_only_domain_has_empty_mx(dns_server: DnsServer) -> None:
    query = dns.message.make_query("aonly.test", "MX")
    response = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=2)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    with pytest.raises(dns.resolver.NoAnswer):
        dns_server.resolver().resolve("aonly.test", "MX")


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("unknown.test", "MX"),
        ("unknown.test", "A"),
        ("sub.example.test", "MX"),  # records do not cover subdomains
        ("example.com", "A"),  # a real name, still not forwarded anywhere
    ],
)
def test_dns_unknown_is_nxdomain(dns_server: DnsServer, name: str, rdtype: str) -> None:
    query = dns.message.make_query(name, rdtype)
    response = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=2)
    assert response.rcode() == dns.rcode.NXDOMAIN
    with pytest.raises(dns.resolver.NXDOMAIN):
        dns_server.resolver().resolve(name, rdtype)


def test_dns_stop_ends_process() -> None:
    server = DnsServer(a={"x.test": ["127.0.0.9"]}, listen="127.0.0.2")
    with server:
        assert server.nameserver.startswith("127.0.0.2:")
        assert [r.to_text() for r in server.resolver().resolve("x.test", "A")] == ["127.0.0.9"]
        proc = server._proc
        assert proc is not None
    assert proc.poll() is not None
    assert not server.running


def test_dns_rejects_non_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        DnsServer(listen="192.0.2.1")


# -- RecordingSink --------------------------------------------------------------------------


def test_sink_records_message(sink: RecordingSink) -> None:
    with smtplib.SMTP(sink.host, sink.port, local_hostname="client.test") as client:
        refused = client.sendmail("a@origin.test", ["b@dest.test", "c@dest.test"], MESSAGE)
    assert refused == {}
    assert sink.wait_for(1, timeout=5)
    (message,) = sink.messages
    assert message.mail_from == "a@origin.test"
    assert message.rcpt_tos == ("b@dest.test", "c@dest.test")
    assert message.data == MESSAGE  # dot-stuffing undone, CRLF kept
    assert message.peer_host == "127.0.0.1"
    assert message.tls is False
    assert sink.count == 1
    assert sink.connections == 1


def test_sink_reuses_one_connection(sink: RecordingSink) -> None:
    with smtplib.SMTP(sink.host, sink.port) as client:
        client.sendmail("a@origin.test", ["b@dest.test"], MESSAGE)
        client.sendmail("a@origin.test", ["c@dest.test"], MESSAGE)
    assert sink.wait_for(2, timeout=5)
    assert [m.rcpt_tos for m in sink.messages] == [("b@dest.test",), ("c@dest.test",)]
    assert sink.connections == 1
    with smtplib.SMTP(sink.host, sink.port) as client:
        client.noop()
    assert sink.wait_for_connections(2, timeout=5)
    sink.clear()
    assert (sink.count, sink.connections) == (0, 0)


def test_sink_scripted_recipient_replies(sink: RecordingSink) -> None:
    with smtplib.SMTP(sink.host, sink.port) as client:
        client.ehlo()
        client.mail("a@origin.test")
        assert client.rcpt("reject-me@dest.test") == (550, b"5.1.1 No such user")
        assert client.rcpt("defer1@dest.test") == (451, b"4.3.0 Try again later")
        assert client.rcpt("full@dest.test") == (552, b"5.2.2 Mailbox full")
        assert client.rcpt("ok@dest.test")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    assert sink.wait_for(1, timeout=5)
    assert sink.messages[0].rcpt_tos == ("ok@dest.test",)


def test_sink_data_reply_and_slow() -> None:
    with RecordingSink("127.0.0.5", data_reply="451 4.7.1 throttled", slow_seconds=0.2) as sink:
        with smtplib.SMTP(sink.host, sink.port) as client:
            client.ehlo()
            client.mail("a@origin.test")
            assert client.rcpt("slow@dest.test")[0] == 250
            assert client.data(MESSAGE) == (451, b"4.7.1 throttled")
        assert sink.count == 0
        assert not sink.wait_for(1, timeout=0.1)


def test_sink_starttls(tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path, "mx.test")
    with RecordingSink("127.0.0.5", tls_cert=cert, tls_key=key) as sink:
        with smtplib.SMTP(sink.host, sink.port) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            client.starttls(context=_unverified_context())
            client.ehlo()
            client.sendmail("a@origin.test", ["b@dest.test"], MESSAGE)
            client.sendmail("a@origin.test", ["c@dest.test"], MESSAGE)
        assert sink.wait_for(2, timeout=5)
        assert [m.tls for m in sink.messages] == [True, True]
        assert sink.connections == 1  # the TLS upgrade is not a new connection


def test_sink_without_cert_has_no_starttls(sink: RecordingSink) -> None:
    with smtplib.SMTP(sink.host, sink.port) as client:
        client.ehlo()
        assert not client.has_extn("starttls")


def test_sink_restart_keeps_port_and_drops_clients(sink: RecordingSink) -> None:
    port = sink.port
    client = smtplib.SMTP(sink.host, sink.port)
    try:
        client.ehlo()
        sink.stop()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    finally:
        client.close()
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP(sink.host, port, timeout=2)
    sink.start()
    assert sink.port == port
    with smtplib.SMTP(sink.host, sink.port) as client:
        client.sendmail("a@origin.test", ["b@dest.test"], MESSAGE)
    assert sink.wait_for(1, timeout=5)


def test_sinks_share_a_port_on_different_addresses() -> None:
    port = free_port("127.0.0.5")
    with RecordingSink("127.0.0.5", port) as one, RecordingSink("127.0.0.6", port) as two:
        for server in (one, two, one):
            with smtplib.SMTP(server.host, port) as client:
                client.sendmail("a@origin.test", ["b@dest.test"], MESSAGE)
        assert one.wait_for(2, timeout=5)
        assert two.wait_for(1, timeout=5)
        assert (one.count, two.count) == (2, 1)


def test_free_port_is_dead() -> None:
    port = free_port("127.0.0.8")
    with pytest.raises(ConnectionRefusedError):
        smtplib.SMTP("127.0.0.8", port, timeout=2)


# -- PostfixSmtpSink ------------------------------------------------------------------------


def test_postfix_smtp_sink_counts() -> None:
    with PostfixSmtpSink("127.0.0.9") as sink:
        with smtplib.SMTP(sink.host, sink.port) as client:
            assert client.sendmail("a@origin.test", ["b@dest.test"], MESSAGE) == {}
            client.sendmail("a@origin.test", ["c@dest.test"], MESSAGE)
        assert sink.wait_for(2, timeout=5)
        assert sink.messages == 2
        proc = sink._proc
        assert proc is not None
    assert proc.poll() is not None


# -- RelayProcess ---------------------------------------------------------------------------


def test_a_relay_that_is_not_ready_in_time_is_not_left_running(tmp_path: Path) -> None:
    """A fixture whose relay start times out never reaches its own stop: start ends it."""
    relay = RelayProcess(tmp_path)
    with pytest.raises(TimeoutError, match="not ready"):
        relay.start(timeout=0.0)  # no relay is ready before it was even looked at
    assert relay.proc is not None
    assert relay.proc.poll() is not None
