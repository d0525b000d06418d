"""Listeners, credential backends and login limits: the configuration and the pure parts."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from hamta.auth_backends import (
    PasswordFileError,
    hash_password,
    password_matches,
    read_password_file,
    write_password_file,
)
from hamta.auth_guard import Gate, LoginGuard, SendRate
from hamta.commands import cmd_config_check
from hamta.config import AuthConfig, ConfigError, parse_config
from tests.support import make_self_signed


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> str:
    cert, key = make_self_signed(tmp_path_factory.mktemp("tls"), "relay.hamta.test")
    return f'tls_cert = "{cert}"\ntls_key = "{key}"\n'


def test_the_older_listen_list_becomes_smtp_listeners() -> None:
    config = parse_config('[smtp]\nlisten = ["127.0.0.1:25", "[::1]:25"]\n')
    assert [(item.listen, item.role, item.auth) for item in config.smtp.listeners] == [
        ("127.0.0.1:25", "smtp", None),
        ("[::1]:25", "smtp", None),
    ]
    assert parse_config("").smtp.listeners[0].listen == "127.0.0.1:2525"


def test_listeners_give_the_listen_addresses(tls: str, tmp_path: Path) -> None:
    config = parse_config(
        f"[smtp]\n{tls}listeners = ["
        '{listen = "0.0.0.0:25"}, '
        '{listen = "0.0.0.0:587", role = "submission", auth = "users"}, '
        '{listen = "0.0.0.0:465", role = "submissions", auth = "users"}]\n'
        f'[auth.backends.users]\ntype = "password_file"\npath = "{tmp_path / "users"}"\n'
    )
    assert config.smtp.listen == ["0.0.0.0:25", "0.0.0.0:587", "0.0.0.0:465"]
    assert [item.role for item in config.smtp.listeners] == ["smtp", "submission", "submissions"]


def test_config_check_names_the_roles(
    tls: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        f"[smtp]\n{tls}listeners = ["
        '{listen = "127.0.0.1:25"}, {listen = "127.0.0.1:465", role = "submissions", auth = "u"}]\n'
        f'[auth.backends.u]\ntype = "password_file"\npath = "{tmp_path / "users"}"\n'
    )
    assert cmd_config_check(argparse.Namespace(file=path)) == 0
    out = capsys.readouterr().out
    assert "SMTP on 127.0.0.1:25, 127.0.0.1:465 (submissions, auth u)," in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[smtp]\nlisten = ["0.0.0.0:25"]\nlisteners = [{listen = "0.0.0.0:587"}]\n',
            "give smtp.listeners or smtp.listen, not both",
        ),
        (
            '[smtp]\nlisteners = [{listen = "0.0.0.0:587", role = "submission"}]\n',
            "needs auth = the name of an [auth.backends] entry",
        ),
        (
            '[smtp]\nlisteners = [{listen = "0.0.0.0:587", role = "submission", auth = "u"}]\n',
            "needs smtp.tls_cert and smtp.tls_key",
        ),
        (
            '[smtp]\nlisteners = [{listen = "0.0.0.0:25"}, {listen = "0.0.0.0:25"}]\n',
            "an address is given twice",
        ),
        (
            '[smtp]\nlisteners = [{listen = "0.0.0.0:465", role = "smtps"}]\n',
            "listeners.0.role",
        ),
        ('[auth.backends.x]\ntype = "dovecot"\npath = "/etc/x"\n', "takes socket"),
        ('[auth.users.bob]\nsenders = ["not an address"]\n', "not an address or @domain"),
        ('[auth]\nfailure_delay = "10s"\nmax_failure_delay = "1s"\n', "exceeds max_failure"),
    ],
)
def test_contradictions_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text)
    assert message in str(error.value)


def test_a_listener_names_a_defined_backend(tls: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(
            f"[smtp]\n{tls}"
            'listeners = [{listen = "0.0.0.0:587", role = "submission", auth = "nope"}]\n'
        )
    assert "names auth backend 'nope', which [auth.backends] does not define" in str(error.value)


def test_hashes_argon2id_and_bcrypt() -> None:
    for scheme in ("argon2id", "bcrypt"):
        hashed = hash_password("pw", scheme)
        assert password_matches(hashed, "pw")
        assert not password_matches(hashed, "pW")
    assert not password_matches("{PLAIN}pw", "pw")  # no weak scheme is ever taken
    with pytest.raises(PasswordFileError):
        hash_password("")


def test_a_broken_password_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# users\nalice:$argon2id$x\nno hash here\n")
    with pytest.raises(PasswordFileError, match=r"users:3: not a 'user:hash' line"):
        read_password_file(path)


def test_a_rewritten_password_file_keeps_its_owner(tmp_path: Path) -> None:
    # The relay reads it as its own user after dropping root: root's edit must not take it away.
    path = tmp_path / "users"
    write_password_file(path, {"alice": hash_password("a", "bcrypt")})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chown(path, 65534, 65534)
    write_password_file(path, {"alice": "$2b$x", "bob": "$2b$y"})
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_password_file(path) == {"alice": "$2b$x", "bob": "$2b$y"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_back_off_then_lock_out_then_expire() -> None:
    clock = Clock()
    config = AuthConfig(
        failure_delay=1.0,
        max_failure_delay=4.0,
        max_failures_per_client=4,
        max_failures_per_user=100,
        lockout=60.0,
        failure_window=600.0,
    )
    guard = LoginGuard(config, clock)
    delays = []
    for _ in range(3):
        delays.append(guard.gate("192.0.2.1", "alice").delay)
        assert guard.failed("192.0.2.1", "alice") is None
    delays.append(guard.gate("192.0.2.1", "alice").delay)
    assert delays == [0.0, 1.0, 2.0, 4.0]
    assert guard.failed("192.0.2.1", "alice") == "client"
    assert guard.gate("192.0.2.1", "alice").locked == "client"
    assert guard.gate("192.0.2.2", "alice").locked is None  # another address tries on
    clock.now += 60.0
    # Expired: the address starts afresh (alice's own failures still count against alice).
    assert guard.gate("192.0.2.1", "bob") == Gate(0.0, None)
    assert guard.gate("192.0.2.1", "alice") == Gate(4.0, None)


def test_a_success_forgets_the_failures() -> None:
    clock = Clock()
    guard = LoginGuard(AuthConfig(), clock)
    guard.failed("192.0.2.1", "alice")
    assert guard.gate("192.0.2.1", "alice").delay > 0
    guard.succeeded("192.0.2.1", "alice")
    assert guard.gate("192.0.2.1", "alice").delay == 0


def test_failures_per_user_lock_the_user_from_any_address() -> None:
    clock = Clock()
    config = AuthConfig(max_failures_per_client=100, max_failures_per_user=3, failure_delay=0)
    guard = LoginGuard(config, clock)
    for n in range(3):
        guard.failed(f"192.0.2.{n}", "alice")
    assert guard.gate("198.51.100.1", "alice").locked == "user"
    assert guard.gate("198.51.100.1", "bob").locked is None


def test_send_rate_is_a_sliding_minute() -> None:
    clock = Clock()
    rate = SendRate(clock)
    assert rate.allow("carol", 2) and rate.allow("carol", 2)
    assert not rate.allow("carol", 2)
    assert rate.allow("dave", None)
    clock.now += 60.0
    assert rate.allow("carol", 2)
