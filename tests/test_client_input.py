"""What clients send: HELO/EHLO names, MAIL/RCPT paths, SMTPUTF8, STARTTLS, all at the door.

Every test talks to a real ``hamta serve`` process over TCP (raw bytes through SmtpWire, where
the exact bytes matter) and follows accepted mail to the recording MX sink, to show that nothing a
client wrote ends up raw in a header. The pure checks behind the replies are property-tested in
``tests/test_addresses.py``; here is what a client sees. What delivery does with addresses it
cannot send is in ``tests/test_undeliverable_input.py``.
"""

from __future__ import annotations

import email
import smtplib
from collections.abc import Iterator

import pytest

from tests.support import DnsServer, RecordingSink
from tests.support.relay import RelayProcess
from tests.support.smtpwire import SmtpWire
from tests.test_reception import (
    CLIENT_HELO,
    assert_nothing_queued,
    header_block,
    queue_id,
    send_clean,
    session,
    settle,
    start_relay,
    tls_files,  # noqa: F401 - a fixture, used by tls_relay
    tls_relay,  # noqa: F401 - a fixture
    unverified_context,
)


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DnsServer, mx_port: int
) -> Iterator[RelayProcess]:
    """One relay for the module (loopback relay networks)."""
    process = start_relay(tmp_path_factory, dns_server, mx_port, "input", {})
    yield process
    process.stop()


# ---------------------------------------------------------------- HELO/EHLO

INJECTION = b"EHLO client.test\rX-Injected-Via-EHLO: yes\rBcc: boss@sink.test"


def test_ehlo_cannot_carry_headers_into_the_message(
    relay: RelayProcess, sink: RecordingSink
) -> None:
    with SmtpWire("127.0.0.1", relay.port) as wire:
        reply = wire.command(INJECTION)
        if reply.code != 250:  # refused: greet properly and go on
            assert wire.command(f"EHLO {CLIENT_HELO}").code == 250
        qid = send_clean(wire)
        assert wire.command("QUIT").code == 221
    settle(relay, sink, 1)
    headers = header_block(sink.messages[0].data)
    assert b"X-Injected" not in headers and b"Bcc:" not in headers, headers
    received = email.message_from_bytes(sink.messages[0].data).get_all("Received")
    assert received is not None and len(received) == 1
    assert received[0].startswith(f"from {CLIENT_HELO} ([127.0.0.1])")
    assert f"id {qid}" in received[0]
    assert reply.text.startswith("501 5.5.4 "), reply


REFUSED_HELO = {
    "cr-header-injection": INJECTION,
    "cr-nul-dot-cr": b"EHLO client.test\r\x00.\r",
    "invalid-utf8": b"EHLO cl\xffient.test",
    "utf8-nel": b"EHLO client\xc2\x85test",
    "space": b"EHLO client test",
    "empty-label": b"EHLO client..test",
    "punctuation": b"EHLO client(test)",
    "bad-literal": b"EHLO [300.1.2.3]",
    "v6-without-tag": b"EHLO [::1]",
    "helo-injection": b"HELO client.test\rBcc: boss@sink.test",
    "long-label": b"EHLO " + b"a" * 64 + b".test",
}


@pytest.mark.parametrize("command", REFUSED_HELO.values(), ids=REFUSED_HELO.keys())
def test_bad_helo_is_refused_and_leaves_the_session_ungreeted(
    relay: RelayProcess, command: bytes
) -> None:
    with SmtpWire("127.0.0.1", relay.port) as wire:
        reply = wire.command(command)
        assert reply.text.startswith("501 5.5.4 "), reply
        # Nothing was taken from the refused greeting: MAIL still wants a HELO/EHLO.
        assert wire.command("MAIL FROM:<a@origin.test>").text.startswith("503 5.5.1 ")
        assert wire.command(f"EHLO {CLIENT_HELO}").code == 250
        assert wire.command("QUIT").code == 221
    assert_nothing_queued(relay)


ACCEPTED_HELO = [
    "EHLO my_host.example.test",  # underscores: Windows host names; accepted, as Postfix does
    "EHLO localhost",
    "EHLO mail.example.test.",
    "EHLO [127.0.0.1]",
    "EHLO [IPv6:::1]",
    "HELO DESKTOP-4F2K",
]


@pytest.mark.parametrize("command", ACCEPTED_HELO)
def test_lenient_helo_forms_are_accepted(relay: RelayProcess, command: str) -> None:
    with SmtpWire("127.0.0.1", relay.port) as wire:
        assert wire.command(command).code == 250
        assert wire.command("MAIL FROM:<a@origin.test>").code == 250
        assert wire.command("QUIT").code == 221


# -------------------------------------------------------------- MAIL, RCPT

LABEL63 = "d" * 63
LONG_DOMAIN = ".".join([LABEL63] * 4) + ".test"  # 261 octets
MAX_DOMAIN = ".".join(["d" * 61] * 3) + "." + "d" * 60 + ".test"  # 249: path of 256 with "a@"

BAD_PATHS: dict[str, tuple[bytes, bytes, str]] = {
    # name: (MAIL FROM argument, RCPT TO argument or b"", expected start of the refusal)
    "mail-empty-label": (b"<a@x..test>", b"", "501 5.1.7 "),
    "rcpt-empty-label": (b"<a@origin.test>", b"<a@x..test>", "501 5.1.3 "),
    "rcpt-64-label": (b"<a@origin.test>", b"<a@" + b"d" * 64 + b".test>", "501 5.1.3 "),
    "rcpt-long-domain": (b"<a@origin.test>", f"<a@{LONG_DOMAIN}>".encode(), "501 5.1.3 "),
    "rcpt-300-local": (b"<a@origin.test>", b"<" + b"l" * 300 + b"@sink.test>", "501 5.1.3 "),
    "mail-65-local": (b"<" + b"l" * 65 + b"@origin.test>", b"", "501 5.1.7 "),
    "rcpt-space": (b"<a@origin.test>", b"<a b@sink.test>", "501 5.1.3 "),
    "mail-no-brackets": (b"a@origin.test", b"", "501 5.1.7 "),
    "rcpt-no-brackets": (b"<a@origin.test>", b"a@sink.test", "501 5.1.3 "),
    "mail-invalid-utf8": (b"<j\xe9@client.test>", b"", "501 5.1.7 "),
    "rcpt-invalid-utf8": (b"<a@origin.test>", b"<\x85@sink.test>", "501 5.1.3 "),
    "rcpt-utf8-nel": (b"<a@origin.test> SMTPUTF8", b"<a\xc2\x85b@sink.test>", "501 5.1.3 "),
    "mail-utf8-without-smtputf8": ("<jörg@origin.test>".encode(), b"", "553 5.6.7 "),
    "rcpt-utf8-without-smtputf8": (b"<a@origin.test>", "<jörg@sink.test>".encode(), "553 5.6.7 "),
    "mail-trailing-garbage": (b"<a@origin.test>x", b"", "501 5.1.7 "),
}


@pytest.mark.parametrize(("mail", "rcpt", "expected"), BAD_PATHS.values(), ids=BAD_PATHS.keys())
def test_bad_paths_are_refused_at_mail_or_rcpt(
    relay: RelayProcess, mail: bytes, rcpt: bytes, expected: str
) -> None:
    with session(relay) as wire:
        reply = wire.command(b"MAIL FROM:" + mail)
        if rcpt:
            assert reply.code == 250, reply
            reply = wire.command(b"RCPT TO:" + rcpt)
        assert reply.text.startswith(expected), reply
        # The session goes on: RSET, and a good transaction is still taken.
        assert wire.command("RSET").code == 250
        assert wire.command("MAIL FROM:<a@origin.test>").code == 250
        assert wire.command("RSET").code == 250
        assert wire.command("QUIT").code == 221
    assert_nothing_queued(relay)


GOOD_PATHS: dict[str, tuple[str, str]] = {
    "64-local-63-label": ("<" + "l" * 64 + "@origin.test>", f"<a@{LABEL63}.sink.test>"),
    "256-octet-path": ("<a@origin.test>", f"<a@{MAX_DOMAIN}>"),
    "quoted-local-part": ('<"a b>c"@origin.test>', '<"x\\"y"@sink.test>'),
    "source-route": ("<@hop.test,@hop2.test:a@origin.test>", "<@hop.test:x@sink.test>"),
    "utf8-with-smtputf8": ("<jörg@origin.test> SMTPUTF8", "<ñandú@sink.test>"),
    "null-sender-with-size": ("<> SIZE=100", "<x@sink.test>"),
}


@pytest.mark.parametrize(("mail", "rcpt"), GOOD_PATHS.values(), ids=GOOD_PATHS.keys())
def test_good_paths_at_the_limits_are_accepted(relay: RelayProcess, mail: str, rcpt: str) -> None:
    with session(relay) as wire:
        assert wire.command(f"MAIL FROM:{mail}").text == "250 2.0.0 Ok"
        assert wire.command(f"RCPT TO:{rcpt}").text == "250 2.1.5 Ok"
        assert wire.command("RSET").code == 250


def test_utf8_mail_with_smtputf8_is_delivered(relay: RelayProcess, sink: RecordingSink) -> None:
    with session(relay) as wire:
        assert wire.command("MAIL FROM:<jörg@origin.test> SMTPUTF8").code == 250
        assert wire.command("RCPT TO:<ñandú@sink.test>").code == 250
        assert wire.command("DATA").code == 354
        wire.send(b"Subject: utf8\r\n\r\nbody\r\n.\r\n")
        queue_id(wire.read_reply())
    settle(relay, sink, 1)
    assert (sink.messages[0].mail_from, sink.messages[0].rcpt_tos) == (
        "jörg@origin.test",
        ("ñandú@sink.test",),
    )


# ---------------------------------------------------------------- STARTTLS


def test_second_starttls_inside_tls_is_refused(tls_relay: RelayProcess) -> None:  # noqa: F811
    with smtplib.SMTP("127.0.0.1", tls_relay.port, local_hostname=CLIENT_HELO, timeout=10) as c:
        c.ehlo()
        assert c.starttls(context=unverified_context())[0] == 220
        c.ehlo()
        code, text = c.docmd("STARTTLS")
        assert (code, text.decode()[:6]) == (503, "5.5.1 "), (code, text)
        assert c.noop()[0] == 250  # still in step, still inside the one TLS layer
