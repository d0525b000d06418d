"""Reception: what a real relay process advertises, accepts, refuses and stamps.

Every test talks to a ``hamta serve`` subprocess over TCP, with :mod:`smtplib`, with swaks, or with
:class:`~tests.support.smtpwire.SmtpWire` where the exact bytes matter (smuggling, bare line ends,
overlong lines). Accepted mail is followed to the recording MX sink; refused mail is shown never to
reach the spool, and a test that queued mail waits for the queue to drain before it ends, so that
the relays shared by a module hand each test a clean queue.
"""

from __future__ import annotations

import email
import re
import selectors
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RelayFactory
from tests.support import DnsServer, RecordingSink, make_self_signed
from tests.support.relay import RelayProcess
from tests.support.smtpwire import Reply, SmtpWire

SIZE_LIMIT = 10 * 1024
MAX_RECIPIENTS = 3
RELAY_HOSTNAME = "relay.hamta.test"
CLIENT_HELO = "client.origin.test"
ENHANCED = re.compile(r"^\d{3}[ -]\d\.\d+\.\d+ ")
QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\S+)$")
SMUGGLED = (
    b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@sink.test>\r\nDATA\r\n"
    b"From: evil@x.test\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
)


# ------------------------------------------------------------------ fixtures


def start_relay(
    tmp_path_factory: pytest.TempPathFactory,
    dns_server: DnsServer,
    mx_port: int,
    name: str,
    overrides: dict[str, dict[str, Any]],
) -> RelayProcess:
    """A relay wired like ``make_relay``'s, for fixtures that outlive one test."""
    sections: dict[str, dict[str, Any]] = {
        "dns": {"nameservers": [dns_server.nameserver]},
        "delivery": {"port": mx_port},
    }
    for section, keys in overrides.items():
        sections.setdefault(section, {}).update(keys)
    relay = RelayProcess(tmp_path_factory.mktemp(name), sections)
    relay.start()
    return relay


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory, dns_server: DnsServer, mx_port: int
) -> Iterator[RelayProcess]:
    """One plain relay (loopback relay networks) with small size and recipient limits."""
    process = start_relay(
        tmp_path_factory,
        dns_server,
        mx_port,
        "reception",
        {"smtp": {"max_message_size": "10k", "max_recipients": MAX_RECIPIENTS}},
    )
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for the relay's STARTTLS."""
    return make_self_signed(tmp_path_factory.mktemp("tls"), RELAY_HOSTNAME)


@pytest.fixture(scope="module")
def tls_relay(
    tmp_path_factory: pytest.TempPathFactory,
    dns_server: DnsServer,
    mx_port: int,
    tls_files: tuple[Path, Path],
) -> Iterator[RelayProcess]:
    """A relay with a certificate, so offering STARTTLS."""
    cert, key = tls_files
    process = start_relay(
        tmp_path_factory, dns_server, mx_port, "tls", {"smtp": {"tls_cert": cert, "tls_key": key}}
    )
    yield process
    process.stop()


# ------------------------------------------------------------------- helpers


def session(relay: RelayProcess, **kwargs: Any) -> SmtpWire:
    """A raw session that has said EHLO."""
    wire = SmtpWire("127.0.0.1", relay.port, **kwargs)
    assert wire.greeting.code == 220, wire.greeting
    assert wire.command(f"EHLO {CLIENT_HELO}").code == 250
    return wire


def begin_data(wire: SmtpWire, sender: str, recipients: list[str]) -> None:
    """MAIL, RCPT and DATA, each of which must succeed."""
    assert wire.command(f"MAIL FROM:<{sender}>").text == "250 2.0.0 Ok"
    for recipient in recipients:
        assert wire.command(f"RCPT TO:<{recipient}>").text == "250 2.1.5 Ok"
    assert wire.command("DATA").code == 354


def queue_id(reply: Reply | str) -> str:
    """The queue id from a ``250 2.0.0 Ok: queued as QID`` reply."""
    text = reply.text if isinstance(reply, Reply) else reply
    match = QUEUED.match(text)
    assert match is not None, text
    return match.group(1)


def send_clean(wire: SmtpWire, recipient: str = "clean@sink.test") -> str:
    """A well-formed message on an open session; returns its queue id."""
    begin_data(wire, "sender@origin.test", [recipient])
    wire.send(b"From: sender@origin.test\r\nSubject: clean\r\n\r\nclean body\r\n.\r\n")
    return queue_id(wire.read_reply())


def send_smtplib(
    port: int,
    sender: str,
    recipients: list[str],
    body: bytes = b"Subject: test\r\n\r\nHello.\r\n",
) -> str:
    """Send one message with smtplib; returns the queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=CLIENT_HELO, timeout=10) as client:
        client.ehlo()
        code, text = client.mail(sender)
        assert code == 250, text
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            assert code == 250, text
        code, text = client.data(body)
        assert code == 250, text
    return queue_id(f"{code} {text.decode()}")


def assert_nothing_queued(relay: RelayProcess) -> None:
    """The spool holds nothing: what was just refused never became the relay's responsibility."""
    summary = relay.queue()
    assert summary["depth"] == 0, summary


def settle(relay: RelayProcess, sink: RecordingSink, count: int) -> None:
    """Wait for ``count`` deliveries and an empty queue, then check nothing more arrived.

    The sink records a message before it answers 250 and the relay dequeues only after that, so
    once the queue is empty every delivery there will ever be has been recorded.
    """
    assert sink.wait_for(count, timeout=15), sink.messages
    relay.wait_queue_empty()
    assert sink.count == count, sink.messages


def metric(relay: RelayProcess, name: str, **labels: str) -> float:
    """One sample of the relay's ``/metrics``; 0 when the sample is not there yet."""
    status, body = relay.get("/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def unverified_context() -> ssl.SSLContext:
    """A client context that accepts the self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def tls11_context(*, server: bool) -> ssl.SSLContext:
    """A context that speaks TLS 1.0/1.1 only, with OpenSSL's security level lowered to allow it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if not server:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0]


# ---------------------------------------------------------------------- EHLO


def test_ehlo_advertises_extensions(relay: RelayProcess) -> None:
    with session(relay) as wire:
        assert wire.greeting.text == f"220 {RELAY_HOSTNAME} ESMTP hamta"
        reply = wire.command(f"EHLO {CLIENT_HELO}")
        assert reply.code == 250
        # No certificate configured: no STARTTLS, and no AUTH over plain text either.
        assert reply.lines == (
            RELAY_HOSTNAME,
            f"SIZE {SIZE_LIMIT}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
            "HELP",
        )
        # RFC 2034: EHLO reply lines carry no enhanced status codes.
        assert not any(ENHANCED.match(line) for line in reply.all_lines), reply.all_lines
        assert wire.command("QUIT").text == "221 2.0.0 Bye"


# ----------------------------------------------------------------------- TLS


def test_starttls_advertised_with_certificate(tls_relay: RelayProcess) -> None:
    with session(tls_relay) as wire:
        reply = wire.command(f"EHLO {CLIENT_HELO}")
        assert "STARTTLS" in reply.lines, reply.lines


def test_starttls_negotiates_modern_tls_and_stamps_esmtps(
    tls_relay: RelayProcess, sink: RecordingSink
) -> None:
    with smtplib.SMTP("127.0.0.1", tls_relay.port, local_hostname=CLIENT_HELO, timeout=10) as c:
        c.ehlo()
        code, _ = c.starttls(context=unverified_context())
        assert code == 220
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        c.ehlo()
        assert not c.has_extn("starttls")  # not offered twice
        assert not c.has_extn("auth")  # aiosmtpd's offer after STARTTLS: hamta has none
        assert c.has_extn("pipelining") and c.has_extn("enhancedstatuscodes")
        refused = c.sendmail("a@origin.test", ["tls@sink.test"], b"Subject: tls\r\n\r\nsecret\r\n")
        assert not refused
    settle(tls_relay, sink, 1)
    received = email.message_from_bytes(sink.messages[0].data).get_all("Received")
    assert received is not None and len(received) == 1
    assert f"by {RELAY_HOSTNAME} (hamta) with ESMTPS id" in received[0]
    assert tls_relay.wait_events("Reception")[-1]["tls"] is True


def _send_reading(tls: ssl.SSLSocket, data: bytes) -> bytes:
    """Send ``data`` as fast as the server reads it; return everything the server answers.

    The server closes mid-stream with our bytes unread: its kernel then resets the connection
    and our next write fails. Reading while writing takes its goodbye before that reset can,
    and a failed write only ends the writing.
    """
    received = b""
    tls.setblocking(False)
    deadline = time.monotonic() + 10
    with selectors.DefaultSelector() as selector:
        selector.register(tls, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while time.monotonic() < deadline:
            ready = {events for _, events in selector.select(timeout=1)}
            readable = any(e & selectors.EVENT_READ for e in ready) or tls.pending()
            if data and any(e & selectors.EVENT_WRITE for e in ready):
                try:
                    data = data[tls.send(data[:16384]) :]
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
                except OSError:  # the reset: the reading goes on
                    data = b""
                if not data:
                    selector.modify(tls, selectors.EVENT_READ)
            if readable:
                try:
                    chunk = tls.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    continue
                except OSError:
                    return received
                if not chunk:
                    return received
                received += chunk
    return received


def test_reading_on_after_the_goodbye_within_tls_is_no_session_error(
    tls_relay: RelayProcess,
) -> None:
    # aiosmtpd closes the connection after too many unknown commands, reads on and closes it
    # again; asyncio's TLS transport took the second close() as leave to drop its protocol, and
    # the next read raised AttributeError ('_resume_reading'), a SessionError (bench/fuzz.py).
    # The reads after the goodbye must be buffered past the reader's limit to resume reading.
    before = len(tls_relay.events("SessionError"))
    with socket.create_connection(("127.0.0.1", tls_relay.port), timeout=10) as raw:
        raw.recv(1024)
        raw.sendall(b"EHLO client.test\r\nSTARTTLS\r\n")
        greeting = b""
        while b"220 " not in greeting.split(b"\r\n", 1)[-1]:
            greeting += raw.recv(1024)
        with unverified_context().wrap_socket(raw, server_hostname="relay") as tls:
            bogus = b"".join(b"BOGUS%d\r\n" % i for i in range(30))
            received = _send_reading(tls, bogus + (b"N" * 1000 + b"\r\n") * 400)
    assert b"Too many unrecognized commands" in received
    with session(tls_relay) as wire:  # the relay goes on
        assert wire.command("NOOP").code == 250
    assert len(tls_relay.events("SessionError")) == before


def test_client_bytes_echoed_in_a_reply_are_escaped(relay: RelayProcess) -> None:
    # aiosmtpd echoes VRFY's argument; an invalid UTF-8 byte in it once raised
    # UnicodeEncodeError in the reply's encoding, a SessionError (found by bench/fuzz.py).
    before = len(relay.events("SessionError"))
    with session(relay) as wire:
        wire.command(f"EHLO {CLIENT_HELO}")
        reply = wire.command(b"VRFY j\xe9 <unclosed")
        assert reply.code in (252, 502), reply.lines
        assert wire.command("NOOP").code == 250
    assert len(relay.events("SessionError")) == before


def test_tls_below_1_2_is_refused(tls_relay: RelayProcess, tls_files: tuple[Path, Path]) -> None:
    client = tls11_context(server=False)
    # Calibration: this client context can complete a TLS 1.1 handshake with a peer that allows
    # it, so the failure against the relay below is the relay's refusal, not the client's.
    server = tls11_context(server=True)
    server.load_cert_chain(*tls_files)
    left, right = socket.socketpair()
    versions: list[str | None] = []

    def serve() -> None:
        with server.wrap_socket(left, server_side=True) as tls:
            versions.append(tls.version())

    thread = threading.Thread(target=serve)
    thread.start()
    with client.wrap_socket(right) as tls:
        versions.append(tls.version())
    thread.join(timeout=10)
    assert versions == ["TLSv1.1", "TLSv1.1"]

    with smtplib.SMTP("127.0.0.1", tls_relay.port, local_hostname=CLIENT_HELO, timeout=10) as c:
        c.ehlo()
        with pytest.raises(ssl.SSLError):
            c.starttls(context=client)


def test_no_auth_advertised_after_starttls(tls_relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", tls_relay.port, local_hostname=CLIENT_HELO, timeout=10) as c:
        c.ehlo()
        c.starttls(context=unverified_context())
        c.ehlo()
        assert not c.has_extn("auth"), c.esmtp_features


def test_session_gauge_returns_to_zero_after_starttls(
    make_relay: RelayFactory, tls_files: tuple[Path, Path]
) -> None:
    cert, key = tls_files
    relay = make_relay({"smtp": {"tls_cert": cert, "tls_key": key}})

    def wait_sessions(value: float, timeout: float = 3.0) -> None:
        # The gauge is the only sign of a closed session that the process gives.
        deadline = time.monotonic() + timeout
        while metric(relay, "hamta_smtp_sessions") != value:
            assert time.monotonic() < deadline, metric(relay, "hamta_smtp_sessions")
            time.sleep(0.05)

    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as c:
        c.ehlo()
        wait_sessions(1)
    wait_sessions(0)  # a plain session is counted once and forgotten
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname=CLIENT_HELO, timeout=10) as c:
        c.ehlo()
        c.starttls(context=unverified_context())
        c.ehlo()
        assert metric(relay, "hamta_smtp_sessions") == 1
    wait_sessions(0)


# ------------------------------------------------------------- relay control


def test_relay_denied_outside_relay_networks(make_relay: RelayFactory, sink: RecordingSink) -> None:
    relay = make_relay({"smtp": {"relay_networks": ["127.0.0.2/32"]}})
    with session(relay) as wire:
        assert wire.command("MAIL FROM:<a@origin.test>").code == 250
        denied = wire.command("RCPT TO:<x@sink.test>")
        assert denied.text == "554 5.7.1 Relay access denied"
        assert wire.command("DATA").text.startswith("503 5.5.1 ")
        assert_nothing_queued(relay)
        assert wire.command("QUIT").code == 221
    assert metric(relay, "hamta_smtp_rejections_total", code="554") == 1
    assert metric(relay, "hamta_messages_received_total") == 0
    # The configured network is served: the same relay accepts a client bound to 127.0.0.2.
    with session(relay, source_address=("127.0.0.2", 0)) as wire:
        qid = send_clean(wire, "allowed@sink.test")
    settle(relay, sink, 1)
    received = email.message_from_bytes(sink.messages[0].data)["Received"]
    assert "([127.0.0.2])" in received and f"id {qid}" in received


def test_loopback_is_a_relay_network_by_default(relay: RelayProcess, sink: RecordingSink) -> None:
    send_smtplib(relay.port, "a@origin.test", ["loopback@sink.test"])
    settle(relay, sink, 1)
    assert sink.messages[0].rcpt_tos == ("loopback@sink.test",)


# ---------------------------------------------------------------------- size


def test_declared_size_over_limit_refused_at_mail(relay: RelayProcess) -> None:
    with session(relay) as wire:
        reply = wire.command("MAIL FROM:<a@origin.test> SIZE=20000")
        assert reply.code == 552 and reply.lines[0].startswith("5.3.4 "), reply
        assert wire.command(f"MAIL FROM:<a@origin.test> SIZE={SIZE_LIMIT + 1}").code == 552
        # At the limit is allowed.
        assert wire.command(f"MAIL FROM:<a@origin.test> SIZE={SIZE_LIMIT}").code == 250
        assert wire.command("RSET").code == 250
    assert_nothing_queued(relay)


def _message_of_size(size: int) -> bytes:
    """Message data of exactly ``size`` bytes on the wire, before the final ``.``."""
    head = b"Subject: size\r\n\r\n"
    line = b"y" * 98 + b"\r\n"
    body_size = size - len(head)
    lines, rest = divmod(body_size, len(line))
    tail = b"z" * (rest - 2) + b"\r\n" if rest >= 2 else b""
    data = head + line * lines + tail
    if rest == 1:  # one byte short: lengthen the last line by one
        data = data[:-2] + b"y\r\n"
    assert len(data) == size
    return data


def test_data_over_size_limit_refused_without_size_parameter(
    relay: RelayProcess, sink: RecordingSink
) -> None:
    received_before = metric(relay, "hamta_messages_received_total")
    with session(relay) as wire:
        begin_data(wire, "a@origin.test", ["big@sink.test"])
        wire.send(_message_of_size(20 * 1024) + b".\r\n")
        assert wire.read_reply().text == "552 5.3.4 Message size exceeds fixed limit"
        assert_nothing_queued(relay)
        # One byte over the limit is refused too; exactly the limit is accepted.
        begin_data(wire, "a@origin.test", ["big@sink.test"])
        wire.send(_message_of_size(SIZE_LIMIT + 1) + b".\r\n")
        assert wire.read_reply().code == 552
        begin_data(wire, "a@origin.test", ["fits@sink.test"])
        wire.send(_message_of_size(SIZE_LIMIT) + b".\r\n")
        queue_id(wire.read_reply())
        assert wire.command("QUIT").code == 221
    settle(relay, sink, 1)
    assert sink.messages[0].rcpt_tos == ("fits@sink.test",)
    assert metric(relay, "hamta_messages_received_total") == received_before + 1


# ---------------------------------------------------------------- recipients


def test_recipients_over_limit_refused_first_ones_delivered(
    relay: RelayProcess, sink: RecordingSink
) -> None:
    recipients = [f"r{i}@sink.test" for i in range(MAX_RECIPIENTS + 1)]
    with session(relay) as wire:
        assert wire.command("MAIL FROM:<a@origin.test>").code == 250
        for recipient in recipients[:MAX_RECIPIENTS]:
            assert wire.command(f"RCPT TO:<{recipient}>").text == "250 2.1.5 Ok"
        extra = wire.command(f"RCPT TO:<{recipients[-1]}>")
        assert extra.text == "452 4.5.3 Too many recipients"
        assert wire.command("DATA").code == 354
        wire.send(b"Subject: many\r\n\r\nto three\r\n.\r\n")
        queue_id(wire.read_reply())
    assert sink.wait_for(1, timeout=15)
    relay.wait_queue_empty()
    delivered = [rcpt for message in sink.messages for rcpt in message.rcpt_tos]
    assert sorted(delivered) == recipients[:MAX_RECIPIENTS]


# ------------------------------------------------------------------ Received


def test_received_header_stamped_once_on_top(relay: RelayProcess, sink: RecordingSink) -> None:
    original = (
        b"From: alice@origin.test\r\nTo: bob@sink.test\r\nSubject: stamp\r\n"
        b"Message-ID: <stamp@origin.test>\r\n\r\nfirst line\r\n.leading dot\r\n"
    )
    qid = send_smtplib(relay.port, "alice@origin.test", ["bob@sink.test"], original)
    settle(relay, sink, 1)
    data = sink.messages[0].data
    assert data.startswith(b"Received: ")
    assert header_block(data).count(b"Received:") == 1
    # The stamp is prepended; the client's message follows byte for byte (dots unstuffed).
    stamp, _, rest = data.partition(b"From: alice@origin.test")
    assert b"From: alice@origin.test" + rest == original
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", stamp).decode()
    assert unfolded.startswith(f"Received: from {CLIENT_HELO} ([127.0.0.1]) by {RELAY_HOSTNAME}")
    assert f"with ESMTP id {qid} for <bob@sink.test>;" in unfolded
    reception = [e for e in relay.events("Reception") if e["queue_id"] == qid]
    assert len(reception) == 1 and reception[0]["message_id"] == "<stamp@origin.test>"


# ------------------------------------------------------------ SMTP smuggling

# Each is put between the first message's text and a smuggled second transaction, all of it
# followed by the one real end of data. A server that took any of them for end-of-data would
# answer 250 and then run the smuggled MAIL/RCPT/DATA as commands.
SMUGGLING_VARIANTS = {
    "lf-dot-lf": b"\n.\n",
    "lf-dot-crlf": b"\n.\r\n",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crlf-dot-cr": b"\r\n.\r",
    "cr-dot-cr": b"\r.\r",
    "dot-lf-inside": b"\r\ntext.\n",
    "bare-lf": b"\n",
    "bare-cr": b"\r",
}


@pytest.mark.parametrize("variant", SMUGGLING_VARIANTS.values(), ids=SMUGGLING_VARIANTS.keys())
def test_smuggling_variant_refused_whole(
    relay: RelayProcess, sink: RecordingSink, variant: bytes
) -> None:
    refused_before = len(relay.events("SmugglingRefused"))
    with session(relay) as wire:
        begin_data(wire, "sender@origin.test", ["rcpt@sink.test"])
        wire.send(b"Subject: first\r\n\r\nfirst body" + variant + SMUGGLED + b".\r\n")
        # Exactly one reply to the whole DATA, and a refusal: had the variant ended the data,
        # this would be a 250 followed by the replies to the smuggled commands.
        reply = wire.read_reply()
        assert reply.code == 550 and reply.lines[0].startswith("5.5.2 "), reply
        assert ENHANCED.match(reply.text)
        assert_nothing_queued(relay)
        # The session is still in step and usable: RSET, then a clean message, then QUIT.
        assert wire.command("RSET").text == "250 2.0.0 OK"
        qid = send_clean(wire)
        assert wire.command("QUIT").text == "221 2.0.0 Bye"
    events = relay.wait_events("SmugglingRefused", refused_before + 1)
    assert len(events) == refused_before + 1
    assert events[-1]["client"] == "127.0.0.1"
    assert events[-1]["sender"] == "sender@origin.test"
    settle(relay, sink, 1)
    (delivered,) = sink.messages
    assert delivered.rcpt_tos == ("clean@sink.test",)
    assert f"id {qid}".encode() in delivered.data
    assert b"smuggled" not in delivered.data


def test_nul_in_data_is_refused(relay: RelayProcess, sink: RecordingSink) -> None:
    # CRLF NUL "." CRLF has no bare line end, but a next hop that drops NUL bytes would read it
    # as end-of-data and split the message: hamta refuses NUL in DATA altogether.
    with session(relay) as wire:
        begin_data(wire, "sender@origin.test", ["rcpt@sink.test"])
        wire.send(b"Subject: nul\r\n\r\nfirst body\r\n\x00.\r\n" + SMUGGLED + b".\r\n")
        reply = wire.read_reply()
        assert reply.text.startswith("550 5.6.0 "), reply
        assert wire.command("RSET").code == 250
        assert wire.command("QUIT").code == 221
    assert_nothing_queued(relay)
    assert relay.wait_events("NulRefused")


# ------------------------------------------------------------- long lines


def test_overlong_data_line_refused(relay: RelayProcess, sink: RecordingSink) -> None:
    with session(relay) as wire:
        begin_data(wire, "a@origin.test", ["long@sink.test"])
        wire.send(b"Subject: long\r\n\r\n" + b"x" * 2000 + b"\r\n.\r\n")
        assert wire.read_reply().text == "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
        assert_nothing_queued(relay)
        # RFC 5321 4.5.3.1.6: 998 characters and CRLF is the longest line; one more is too long.
        begin_data(wire, "a@origin.test", ["long@sink.test"])
        wire.send(b"Subject: long\r\n\r\n" + b"x" * 999 + b"\r\n.\r\n")
        assert wire.read_reply().code == 500
        begin_data(wire, "a@origin.test", ["longest@sink.test"])
        wire.send(b"Subject: long\r\n\r\n" + b"x" * 998 + b"\r\n.\r\n")
        queue_id(wire.read_reply())
        assert wire.command("QUIT").code == 221
    settle(relay, sink, 1)
    assert sink.messages[0].rcpt_tos == ("longest@sink.test",)
    assert b"x" * 998 + b"\r\n" in sink.messages[0].data


@pytest.mark.parametrize("length", [600, 2000])
def test_overlong_command_line_refused(relay: RelayProcess, length: int) -> None:
    with session(relay) as wire:
        reply = wire.command(b"MAIL FROM:<" + b"a" * length + b"@origin.test>")
        assert re.match(r"^500 5\.5\.\d+ ", reply.text), reply
        # The rest of the long line was not taken for commands; the session goes on.
        assert wire.command("NOOP").text == "250 2.0.0 OK"
        assert wire.command("MAIL FROM:<a@origin.test>").code == 250
        assert wire.command("RSET").code == 250
    assert_nothing_queued(relay)


# ------------------------------------------------------------ malformed SMTP

MALFORMED: dict[str, tuple[list[str], str, str]] = {
    # name: (commands before, the command, the start of the expected reply)
    "rcpt-before-mail": ([], "RCPT TO:<x@sink.test>", "503 5.5.1 "),
    "data-before-rcpt": (["MAIL FROM:<a@origin.test>"], "DATA", "503 5.5.1 "),
    "data-before-mail": ([], "DATA", "503 5.5.1 "),
    "nested-mail": (["MAIL FROM:<a@origin.test>"], "MAIL FROM:<b@origin.test>", "503 5.5.1 "),
    "garbage": ([], "XYZZY plugh", "500 5.5."),
    "empty-line": ([], "", "500 5.5."),
    "rcpt-without-at": (["MAIL FROM:<a@origin.test>"], "RCPT TO:<no-at-sign>", "501 5.1.3 "),
    "rcpt-address-literal": (["MAIL FROM:<a@origin.test>"], "RCPT TO:<x@[127.0.0.5]>", "501 5.1.3"),
    "mail-without-from": ([], "MAIL <a@origin.test>", "501 5.5.4 "),
    "mail-bad-size": ([], "MAIL FROM:<a@origin.test> SIZE=lots", "501 5.5.4 "),
    "data-with-argument": (
        ["MAIL FROM:<a@origin.test>", "RCPT TO:<x@sink.test>"],
        "DATA now",
        "501 5.5.4 ",
    ),
    "null-sender": ([], "MAIL FROM:<>", "250 2.0.0 "),
}


@pytest.mark.parametrize(
    ("before", "command", "expected"), MALFORMED.values(), ids=MALFORMED.keys()
)
def test_command_replies(
    relay: RelayProcess, before: list[str], command: str, expected: str
) -> None:
    with session(relay) as wire:
        for line in before:
            assert wire.command(line).code == 250
        reply = wire.command(command)
        assert reply.text.startswith(expected), reply
        assert ENHANCED.match(reply.text), reply
        assert wire.command("RSET").code == 250
        assert wire.command("QUIT").code == 221
    assert_nothing_queued(relay)


@pytest.mark.parametrize(
    "command",
    # (A CR between the domain and ">" never reaches hamta: aiosmtpd's address parser drops it
    # as folding white space, so the envelope holds a clean address.)
    [b"RCPT TO:<a\rb@sink.test>", b"RCPT TO:<a\x00b@sink.test>"],
    ids=["cr-in-local-part", "nul-in-local-part"],
)
def test_control_characters_in_address_refused(relay: RelayProcess, command: bytes) -> None:
    with session(relay) as wire:
        assert wire.command("MAIL FROM:<a@origin.test>").code == 250
        reply = wire.command(command)
        assert wire.command("RSET").code == 250
        assert reply.text.startswith("501 5.1.3 "), reply


OUTCOMES = ("Delivery", "TransientFailure", "Bounce")


def test_accepted_control_character_address_is_not_orphaned(
    make_relay: RelayFactory, sink: RecordingSink
) -> None:
    relay = make_relay()
    with session(relay) as wire:
        assert wire.command("MAIL FROM:<sender@sink.test>").code == 250
        if wire.command(b"RCPT TO:<a\rb@sink.test>").code != 250:
            return  # refused at the door: nothing was made the relay's responsibility
        assert wire.command("DATA").code == 354
        wire.send(b"Subject: cr\r\n\r\nbody\r\n.\r\n")
        qid = queue_id(wire.read_reply())
    # Whatever the relay accepted must come to an outcome: delivered, deferred or bounced.
    deadline = time.monotonic() + 5
    while not any(e.get("queue_id") == qid for name in OUTCOMES for e in relay.events(name)):
        assert time.monotonic() < deadline, relay.queue()
        time.sleep(0.05)


def test_mail_before_ehlo_refused(relay: RelayProcess) -> None:
    with SmtpWire("127.0.0.1", relay.port) as wire:
        reply = wire.command("MAIL FROM:<a@origin.test>")
        assert reply.text.startswith("503 5.5.1 "), reply


def test_null_sender_message_accepted(relay: RelayProcess, sink: RecordingSink) -> None:
    send_smtplib(relay.port, "", ["postmaster@sink.test"], b"Subject: bounce\r\n\r\nDSN\r\n")
    settle(relay, sink, 1)
    assert sink.messages[0].mail_from == ""
    assert sink.messages[0].rcpt_tos == ("postmaster@sink.test",)


# --------------------------------------------------------------------- swaks

SWAKS = shutil.which("swaks") or "/usr/bin/swaks"


@pytest.mark.parametrize("extra", [[], ["--pipeline"]], ids=["plain", "pipeline"])
def test_swaks_delivers(relay: RelayProcess, sink: RecordingSink, extra: list[str]) -> None:
    result = subprocess.run(
        [
            SWAKS,
            "--server",
            f"127.0.0.1:{relay.port}",
            "--to",
            "x@sink.test",
            "--from",
            "a@origin.test",
            "--helo",
            CLIENT_HELO,
            "--timeout",
            "10",
            *extra,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"250 2\.0\.0 Ok: queued as (\S+)", result.stdout)
    assert match is not None, result.stdout
    settle(relay, sink, 1)
    delivered = sink.messages[0]
    assert (delivered.mail_from, delivered.rcpt_tos) == ("a@origin.test", ("x@sink.test",))
    assert f"id {match.group(1)}".encode() in delivered.data


# ------------------------------------------------------------ metrics, health


def test_metrics_count_accepted_messages(relay: RelayProcess, sink: RecordingSink) -> None:
    status, body = relay.get("/metrics")
    assert status == 200
    assert b"hamta_messages_received_total" in body
    before = metric(relay, "hamta_messages_received_total")
    rejected_before = metric(relay, "hamta_smtp_rejections_total", code="452")
    for i in range(2):
        send_smtplib(relay.port, "a@origin.test", [f"m{i}@sink.test"])
    with session(relay) as wire:  # a refused recipient is counted as a rejection, not a message
        assert wire.command("MAIL FROM:<a@origin.test>").code == 250
        for i in range(MAX_RECIPIENTS + 1):
            wire.command(f"RCPT TO:<t{i}@sink.test>")
        assert wire.command("RSET").code == 250
    assert metric(relay, "hamta_messages_received_total") == before + 2
    assert metric(relay, "hamta_smtp_rejections_total", code="452") == rejected_before + 1
    settle(relay, sink, 2)


def test_health_endpoints_on_active_relay(relay: RelayProcess) -> None:
    status, _ = relay.get("/health/live")
    assert status == 200
    status, body = relay.get("/health/ready")
    assert status == 200, body
    assert relay.queue()["state"] == "active"
