"""Submission on 587 and 465 with SMTP AUTH, against a real relay process and real clients.

One relay serves five listeners: smtp (no AUTH), submission (587-like, password file),
submissions (465-like, password file), submission with Dovecot's auth service (a Dovecot of the
test's own), and submission with a Dovecot socket that does not exist. Clients are smtplib,
swaks and raw sessions; accepted mail is followed to the recording MX sink.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import ssl
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hamtactl import build_parser
from tests.support import DnsServer, RecordingSink, free_port, make_self_signed
from tests.support.dovecot import Dovecot
from tests.support.postfix_client import PostfixClient
from tests.support.relay import HAMTA, RelayProcess, read_events
from tests.support.sink import Delivered

HELO = "client.origin.test"
PASSWORDS = {"alice@example.test": "alice-pw", "bob": "bob-pw", "carol@example.test": "carol-pw"}
BRUTE_CLIENT = "127.0.0.9"  # the guesser's own address, so its lockout touches no other test


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def add_user(path: Path, user: str, password: str, scheme: str) -> None:
    """``hamta auth add`` with the password on standard input."""
    subprocess.run(
        [*HAMTA, "auth", "add", user, "--file", str(path), "--scheme", scheme],
        input=password + "\n",
        text=True,
        check=True,
        capture_output=True,
        env={**os.environ},
    )


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    with Dovecot(tmp_path_factory.mktemp("dovecot"), {"dave@example.test": "dave-pw"}) as server:
        yield server


@pytest.fixture(scope="module")
def sick_dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dovecot]:
    """A Dovecot whose auth service cannot read its passwd-file."""
    directory = tmp_path_factory.mktemp("sick-dovecot")
    with Dovecot(directory, {"dave@example.test": "dave-pw"}, readable=False) as server:
        yield server


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    names = ("smtp", "sub", "subs", "dove", "dead", "sick")
    return {name: free_port("127.0.0.1") for name in names}


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory,
    dns_server: DnsServer,
    mx_port: int,
    dovecot: Dovecot,
    sick_dovecot: Dovecot,
    ports: dict[str, int],
) -> Iterator[RelayProcess]:
    work = tmp_path_factory.mktemp("submission")
    cert, key = make_self_signed(work / "tls", "relay.hamta.test")
    users = work / "users"
    add_user(users, "alice@example.test", PASSWORDS["alice@example.test"], "argon2id")
    add_user(users, "bob", PASSWORDS["bob"], "bcrypt")
    add_user(users, "carol@example.test", PASSWORDS["carol@example.test"], "argon2id")
    listeners = [
        {"listen": f"127.0.0.1:{ports['smtp']}", "role": "smtp"},
        {"listen": f"127.0.0.1:{ports['sub']}", "role": "submission", "auth": "file"},
        {"listen": f"127.0.0.1:{ports['subs']}", "role": "submissions", "auth": "file"},
        {"listen": f"127.0.0.1:{ports['dove']}", "role": "submission", "auth": "dovecot"},
        {"listen": f"127.0.0.1:{ports['dead']}", "role": "submission", "auth": "gone"},
        {"listen": f"127.0.0.1:{ports['sick']}", "role": "submission", "auth": "sick"},
    ]
    process = RelayProcess(
        work,
        {
            "smtp": {"listeners": listeners, "tls_cert": cert, "tls_key": key},
            "dns": {"nameservers": [dns_server.nameserver]},
            "delivery": {"port": mx_port},
            "auth": {
                "failure_delay": "150ms",
                "max_failure_delay": "600ms",
                "max_failures_per_client": 4,
                "lockout": "1h",
                "backends": {
                    "file": {"type": "password_file", "path": users},
                    "dovecot": {"type": "dovecot", "socket": dovecot.socket},
                    "sick": {"type": "dovecot", "socket": sick_dovecot.socket},
                    "gone": {"type": "dovecot", "socket": work / "no-such-socket", "timeout": "2s"},
                },
                "users": {
                    "bob": {"senders": ["@bob.test"]},
                    "carol@example.test": {"messages_per_minute": 2},
                },
            },
        },
    )
    process.start()
    yield process
    process.stop()


def submit(
    port: int,
    user: str,
    password: str,
    *,
    implicit: bool = False,
    sender: str | None = None,
    header_from: str | None = None,
    recipient: str = "someone@sink.test",
) -> tuple[int, str]:
    """Log in and send one message; the reply to the first command that is not a success."""
    sender = sender or user
    body = f"From: {header_from or sender}\r\nSubject: submission\r\n\r\nHello.\r\n".encode()
    if implicit:
        client: smtplib.SMTP = smtplib.SMTP_SSL(
            "127.0.0.1", port, local_hostname=HELO, timeout=10, context=_client_context()
        )
    else:
        client = smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=10)
        client.starttls(context=_client_context())
    with client:
        client.ehlo()
        login(client, user, password)
        code, text = client.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = client.rcpt(recipient)
        if code != 250:
            return code, text.decode()
        code, text = client.data(body)
        return code, text.decode()


def delivered_to(sink: RecordingSink, recipient: str, timeout: float = 30.0) -> Delivered:
    """The message the sink got for ``recipient`` (other tests' mail may arrive meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for message in sink.messages:
            if recipient in message.rcpt_tos:
                return message
        time.sleep(0.05)
    raise AssertionError(f"nothing delivered to {recipient}: {sink.messages}")


def login(client: smtplib.SMTP, user: str, password: str) -> None:
    """One AUTH PLAIN (``login()`` would try LOGIN after a failed PLAIN: two failures)."""
    client.user, client.password = user, password
    client.auth("PLAIN", client.auth_plain)


# ------------------------------------------------------------------ refusals before TLS


def test_submission_offers_auth_only_inside_tls(relay: RelayProcess, ports: dict[str, int]) -> None:
    with smtplib.SMTP("127.0.0.1", ports["sub"], local_hostname=HELO, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert not client.has_extn("auth")  # never offered in plaintext
        assert client.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABhbGljZS1wdw==") == (
            530,
            b"5.7.0 Must issue a STARTTLS command first",
        )
        code, text = client.mail("alice@example.test")
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        client.starttls(context=_client_context())
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        code, text = client.mail("alice@example.test")
        assert (code, text) == (530, b"5.7.0 Authentication required")


def test_smtp_listener_takes_no_auth(relay: RelayProcess, ports: dict[str, int]) -> None:
    with smtplib.SMTP("127.0.0.1", ports["smtp"], local_hostname=HELO, timeout=10) as client:
        client.starttls(context=_client_context())
        client.ehlo()
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN")[0] == 502


# ------------------------------------------------------------------------ accepted


def test_submission_after_starttls_relays_anywhere(
    relay: RelayProcess, ports: dict[str, int], sink: RecordingSink
) -> None:
    code, text = submit(
        ports["sub"],
        "alice@example.test",
        PASSWORDS["alice@example.test"],
        recipient="far@sink.test",
    )
    assert code == 250, text
    header = delivered_to(sink, "far@sink.test").data.split(b"\r\n\r\n")[0]
    assert b"with ESMTPSA id" in header  # RFC 3848: TLS and authenticated


def test_implicit_tls_advertises_and_takes_auth(
    relay: RelayProcess, ports: dict[str, int], sink: RecordingSink
) -> None:
    with smtplib.SMTP_SSL(
        "127.0.0.1", ports["subs"], local_hostname=HELO, timeout=10, context=_client_context()
    ) as client:
        client.ehlo()
        # aiosmtpd issue 281: with its own TLS check AUTH would be missing on 465.
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        assert not client.has_extn("starttls")  # TLS inside TLS is never offered
    code, text = submit(
        ports["subs"],
        "bob",
        PASSWORDS["bob"],
        implicit=True,
        sender="b@bob.test",
        recipient="465@sink.test",
    )
    assert code == 250, text
    assert delivered_to(sink, "465@sink.test").mail_from == "b@bob.test"


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
@pytest.mark.parametrize(
    ("mechanism", "tls", "listener"),
    [("PLAIN", "--tls", "sub"), ("LOGIN", "--tls", "sub"), ("LOGIN", "--tlsc", "subs")],
)
def test_swaks_logs_in_and_sends(
    relay: RelayProcess, ports: dict[str, int], mechanism: str, tls: str, listener: str
) -> None:
    server = ["--server", "127.0.0.1", "--port", str(ports[listener]), tls, "--helo", HELO]
    login = ["--auth", mechanism, "--auth-user", "alice@example.test"]
    login += ["--auth-password", PASSWORDS["alice@example.test"]]
    envelope = ["--from", "alice@example.test", "--to", "swaks@sink.test"]
    result = subprocess.run(
        ["swaks", *server, *login, *envelope],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0 Authentication successful" in result.stdout
    assert "250 2.0.0 Ok: queued as" in result.stdout


# ------------------------------------------------------------------- user policy


def test_wrong_envelope_sender_is_refused(relay: RelayProcess, ports: dict[str, int]) -> None:
    code, text = submit(ports["sub"], "bob", PASSWORDS["bob"], sender="alice@example.test")
    assert (code, text) == (553, "5.7.1 Sender address not allowed for this login")


def test_wrong_from_domain_is_refused(relay: RelayProcess, ports: dict[str, int]) -> None:
    code, text = submit(
        ports["sub"], "bob", PASSWORDS["bob"], sender="b@bob.test", header_from="ceo@bank.test"
    )
    assert (code, text) == (553, "5.7.1 From: domain not allowed for this login")
    events = read_events(relay.log_path, "SubmissionRefused")
    assert any(e.get("header_from") == "ceo@bank.test" and e["user"] == "bob" for e in events)


def test_user_rate_limit(relay: RelayProcess, ports: dict[str, int]) -> None:
    user, password = "carol@example.test", PASSWORDS["carol@example.test"]
    assert submit(ports["sub"], user, password)[0] == 250
    assert submit(ports["sub"], user, password)[0] == 250
    assert submit(ports["sub"], user, password) == (
        450,
        "4.7.1 Sending rate limit reached for this login, try again later",
    )


# ------------------------------------------------------------------ failed logins


def _login_from(port: int, source: str, user: str, password: str) -> tuple[int, bytes, float]:
    """One login attempt from ``source``: the reply and how long it took."""
    with smtplib.SMTP(
        "127.0.0.1", port, local_hostname=HELO, timeout=10, source_address=(source, 0)
    ) as client:
        client.starttls(context=_client_context())
        client.ehlo()
        started = time.monotonic()
        try:
            login(client, user, password)
        except smtplib.SMTPAuthenticationError as exc:
            error = exc.smtp_error
            text = error if isinstance(error, bytes) else error.encode()
            return exc.smtp_code, text, time.monotonic() - started
        return 235, b"", time.monotonic() - started


def test_brute_force_is_slowed_then_locked_out(relay: RelayProcess, ports: dict[str, int]) -> None:
    user = "alice@example.test"
    replies = [_login_from(ports["sub"], BRUTE_CLIENT, user, f"guess{n}") for n in range(4)]
    assert [r[:2] for r in replies] == [(535, b"5.7.8 Authentication credentials invalid")] * 4
    # The backoff: the 2nd attempt waits failure_delay, the 3rd twice that, the 4th four times.
    assert replies[3][2] >= 0.6
    # Locked out: even the right password is not looked at, and says so temporarily.
    code, text, _ = _login_from(ports["sub"], BRUTE_CLIENT, user, PASSWORDS[user])
    assert (code, text) == (454, b"4.7.0 Too many failed logins, try again later")
    # The user is not locked for everyone: another address logs in.
    assert _login_from(ports["sub"], "127.0.0.1", user, PASSWORDS[user])[0] == 235
    failed = read_events(relay.log_path, "AuthFailed")
    assert any(e["client"] == BRUTE_CLIENT and e["lockout"] == "client" for e in failed)
    log = relay.log_path.read_text()
    assert "guess0" not in log and PASSWORDS[user] not in log  # no secret in the log
    listener = f"127.0.0.1:{ports['sub']}"
    assert relay.metric("hamta_smtp_auth_total", listener=listener, outcome="locked") >= 1
    assert relay.metric("hamta_smtp_auth_total", listener=listener, outcome="failure") >= 4


# ---------------------------------------------------------------------- Dovecot


def test_dovecot_backend_accepts_its_user_and_refuses_a_wrong_password(
    relay: RelayProcess, ports: dict[str, int]
) -> None:
    code, text = submit(ports["dove"], "dave@example.test", "dave-pw")
    assert code == 250, text
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        submit(ports["dove"], "dave@example.test", "not-dave-pw")
    assert refused.value.smtp_code == 535


@pytest.mark.parametrize("listener", ["dead", "sick"])
def test_a_backend_that_cannot_tell_is_a_temporary_failure(
    relay: RelayProcess, ports: dict[str, int], listener: str
) -> None:
    # dead: no Dovecot on the socket; sick: Dovecot answers FAIL code=temp_fail.
    with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
        submit(ports[listener], "dave@example.test", "dave-pw")
    assert refused.value.smtp_code == 454
    assert str(refused.value.smtp_error).startswith("b'4.7.0")
    listen = f"127.0.0.1:{ports[listener]}"
    errors = [e["error"] for e in read_events(relay.log_path, "AuthUnavailable")]
    events = [e for e in read_events(relay.log_path, "AuthUnavailable") if e["listener"] == listen]
    assert events, errors
    if listener == "sick":
        assert events[-1]["error"] == "dovecot: temporary failure"


# ------------------------------------------------------------------ hamta auth


def hamta_auth(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``hamta auth ARGS`` in this process (the first test runs it as a command): code, out, err."""
    parsed = build_parser(["hamta.auth_cli"]).parse_args(["auth", *args])
    code = parsed.func(parsed)
    out, err = capsys.readouterr()
    return code, out, err


def test_auth_cli_writes_lists_and_removes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users"
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    added = subprocess.run(
        [*HAMTA, "auth", "add", "erin", "--file", str(users), "--password-file", str(secret)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert "s3cret" not in users.read_text()
    assert hamta_auth(capsys, "list", "--file", str(users))[1].split() == ["erin", "argon2id"]
    code, _, err = hamta_auth(capsys, "add", "bad:name", "--file", str(users))
    assert code == 1 and "not a user name" in err
    assert hamta_auth(capsys, "remove", "erin", "--file", str(users))[0] == 0
    code, _, err = hamta_auth(capsys, "remove", "erin", "--file", str(users))
    assert code == 1 and "no user 'erin'" in err


# ------------------------------------------------------------ Postfix as a client


@pytest.mark.skipif(shutil.which("postfix") is None, reason="postfix is not installed")
def test_postfix_relays_through_submission_with_sasl(
    relay: RelayProcess, ports: dict[str, int], sink: RecordingSink
) -> None:
    user = "alice@example.test"
    with PostfixClient(free_port("127.0.0.1"), ports["sub"], user, PASSWORDS[user]) as postfix:
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as client:
            client.sendmail(user, ["via-postfix@sink.test"], b"Subject: via postfix\r\n\r\nHi.\r\n")
        try:
            delivered = delivered_to(sink, "via-postfix@sink.test")
        except AssertionError:
            raise AssertionError(postfix.log_text()) from None
    assert b"by relay.hamta.test (hamta) with ESMTPSA" in delivered.data
    succeeded = read_events(relay.log_path, "AuthSucceeded")
    assert any(e["user"] == user and e["listener"].endswith(f":{ports['sub']}") for e in succeeded)
