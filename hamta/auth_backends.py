"""Where SMTP AUTH credentials are checked: a password file, or Dovecot's auth service.

A backend answers a login with :class:`Verdict` (the user it authenticated, or None) or raises
:class:`AuthUnavailableError` when it cannot tell (a file that cannot be read, a Dovecot that
does not answer): the session then gets 454 4.7.0 and nobody is let in on a backend's failure.

The password file holds ``user:hash`` lines (``#`` comments), argon2id (argon2-cffi) or bcrypt
hashes, written by ``hamta auth add``. It is read again when it changes, so that a user added or
removed counts from the next login without a restart. Hashes are checked in a thread: an
argon2id verification takes tens of milliseconds, which the event loop must not wait on.

Dovecot is spoken to in its own auth protocol (Dovecot's "auth protocol", doc/auth-protocol):
the client handshake (``VERSION``, ``CPID``; the server's ``MECH`` lines up to ``DONE``), then one
``AUTH`` request per login, answered ``OK``, ``FAIL`` or ``CONT``. One connection per login keeps
the client simple and survives a Dovecot restart; the handshake is a few hundred bytes on a unix
socket.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import argon2
import bcrypt

from hamta.config import AuthBackendConfig
from hamta.durable_files import fsync_directory, write_durably, write_synced

_USER = re.compile(r"^[^\s:#][^\s:]*$")
_hasher = argon2.PasswordHasher()  # argon2id with argon2-cffi's (RFC 9106 low-memory) defaults


class AuthUnavailableError(Exception):
    """The backend cannot tell whether a login is good (454 4.7.0, never a pass)."""


class PasswordFileError(Exception):
    """A password file that cannot be read or written, or a bad entry: says which."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A backend's answer: the authenticated user name, or None for bad credentials."""

    user: str | None


class Backend(Protocol):
    """Checks one login (PLAIN's or LOGIN's user and password)."""

    name: str

    async def verify(self, user: str, password: str, client: str, *, secured: bool) -> Verdict:
        """The verdict on ``user``/``password`` from ``client``; AuthUnavailableError if unknown."""
        ...


def check_user_name(user: str) -> str:
    """``user`` when it may be a password file's name: no space, colon or control character."""
    if not _USER.match(user) or any(ord(c) < 32 or ord(c) == 127 for c in user):
        raise PasswordFileError(
            f"not a user name (no spaces, colons or control characters): {user!r}"
        )
    return user


def hash_password(password: str, scheme: str = "argon2id") -> str:
    """A new hash of ``password``: argon2id (the default) or bcrypt."""
    if not password:
        raise PasswordFileError("an empty password is not accepted")
    if scheme == "argon2id":
        return _hasher.hash(password)
    if scheme == "bcrypt":
        if len(password.encode()) > 72:
            raise PasswordFileError("bcrypt takes at most 72 bytes of password; use argon2id")
        return bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    raise PasswordFileError(f"unknown hash scheme {scheme!r} (argon2id or bcrypt)")


def password_matches(hashed: str, password: str) -> bool:
    """Does ``password`` match ``hashed`` (argon2id or bcrypt)? Any other hash never matches."""
    if hashed.startswith("$argon2"):
        try:
            return _hasher.verify(hashed, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False
    if hashed.startswith(("$2a$", "$2b$", "$2y$")):
        try:
            return bcrypt.checkpw(password.encode(), hashed.encode())
        except ValueError:
            return False
    return False


def read_password_file(path: Path) -> dict[str, str]:
    """The ``user: hash`` entries of a password file; PasswordFileError names a bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PasswordFileError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise PasswordFileError(f"{path}: not UTF-8 text") from None
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not _USER.match(user) or not hashed.startswith("$"):
            raise PasswordFileError(f"{path}:{number}: not a 'user:hash' line")
        entries[user] = hashed
    return entries


def write_password_file(path: Path, entries: dict[str, str]) -> None:
    """Replace the password file with ``entries``, mode 0600, atomically and durably."""
    lines = ["# hamta SMTP AUTH users: user:hash (argon2id or bcrypt); see hamta auth --help"]
    lines += [f"{user}:{hashed}" for user, hashed in sorted(entries.items())]
    data = ("\n".join(lines) + "\n").encode()
    try:
        try:
            owner = os.stat(path)
        except FileNotFoundError:
            # A new file: 0600, whole or not at all (a reader never sees half a file).
            write_durably(path.parent, path.name, data)
            return
        # A replacement keeps the file's owner: the relay, no longer root, reads it as its own
        # user (chown hamta once), and an edit by root must not take that away from it.
        temporary = path.parent / f".{path.name}.tmp"
        write_synced(temporary, [data])
        os.chown(temporary, owner.st_uid, owner.st_gid)
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except OSError as exc:
        raise PasswordFileError(f"{path}: cannot write: {exc.strerror}") from None


class PasswordFile:
    """A password file backend, read again whenever the file changes."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, str] = {}

    def _current(self) -> dict[str, str]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise AuthUnavailableError(f"{self.path}: {exc.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                self._entries = read_password_file(self.path)
            except PasswordFileError as exc:
                raise AuthUnavailableError(str(exc)) from None
            self._stamp = stamp
        return self._entries

    async def verify(self, user: str, password: str, client: str, *, secured: bool) -> Verdict:
        hashed = self._current().get(user)
        if hashed is None:
            # Hash all the same, so that an unknown user takes as long as a wrong password.
            await asyncio.to_thread(password_matches, _DUMMY_HASH, password)
            return Verdict(None)
        good = await asyncio.to_thread(password_matches, hashed, password)
        return Verdict(user if good else None)


_DUMMY_HASH = _hasher.hash("hamta: no such user")
_request_ids = itertools.count(1)


def _dovecot_escape(value: str) -> str:
    # Dovecot's tab-escaping (lib/strescape.c): \1 for \001, \t for TAB, \r, \n.
    return (
        value.replace("\x01", "\x011")
        .replace("\t", "\x01t")
        .replace("\r", "\x01r")
        .replace("\n", "\x01n")
    )


class DovecotAuth:
    """Dovecot's auth service, through its auth-client unix socket (one connection a login)."""

    def __init__(self, name: str, socket: Path, timeout: float) -> None:
        self.name = name
        self.socket = socket
        self.timeout = timeout

    async def verify(self, user: str, password: str, client: str, *, secured: bool) -> Verdict:
        try:
            return await asyncio.wait_for(
                self._verify(user, password, client, secured), self.timeout
            )
        except TimeoutError:
            raise AuthUnavailableError(
                f"dovecot at {self.socket}: no answer in {self.timeout:g}s"
            ) from None
        except OSError as exc:
            raise AuthUnavailableError(f"dovecot at {self.socket}: {exc.strerror or exc}") from None

    async def _verify(self, user: str, password: str, client: str, secured: bool) -> Verdict:
        reader, writer = await asyncio.open_unix_connection(str(self.socket))
        try:
            writer.write(f"VERSION\t1\t2\nCPID\t{os.getpid()}\n".encode())
            mechanisms: set[str] = set()
            while True:  # the server's handshake, up to DONE
                line = await self._line(reader)
                fields = line.split("\t")
                if fields[0] == "VERSION" and fields[1:2] != ["1"]:
                    raise AuthUnavailableError(f"dovecot speaks auth protocol {fields[1:3]}")
                if fields[0] == "MECH" and len(fields) > 1:
                    mechanisms.add(fields[1].upper())
                if fields[0] == "DONE":
                    break
            if "PLAIN" not in mechanisms:
                raise AuthUnavailableError("dovecot does not offer PLAIN (auth_mechanisms)")
            request = next(_request_ids)
            response = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            parts = ["AUTH", str(request), "PLAIN", "service=smtp"]
            if secured:
                parts.append("secured")
            if client:
                parts.append(f"rip={_dovecot_escape(client)}")
            parts.append(f"resp={response}")
            writer.write(("\t".join(parts) + "\n").encode())
            await writer.drain()
            while True:
                fields = (await self._line(reader)).split("\t")
                if fields[1:2] != [str(request)]:
                    continue
                if fields[0] == "OK":
                    named = [f[5:] for f in fields[2:] if f.startswith("user=")]
                    return Verdict(named[0] if named else user)
                if fields[0] == "FAIL":
                    # "temp" (older) or code=temp_fail: Dovecot could not check (its passdb
                    # failed), which is not a wrong password.
                    if any(f in {"temp", "code=temp_fail"} for f in fields[2:]):
                        raise AuthUnavailableError("dovecot: temporary failure")
                    return Verdict(None)
                raise AuthUnavailableError(f"dovecot answered {fields[0]} to a PLAIN login")
        finally:
            writer.close()

    @staticmethod
    async def _line(reader: asyncio.StreamReader) -> str:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise AuthUnavailableError("dovecot closed the connection")
        return line.decode("utf-8", "replace").rstrip("\n")


def build_backends(backends: dict[str, AuthBackendConfig]) -> dict[str, Backend]:
    """The configured backends by name (nothing is opened: they connect or read per login)."""
    built: dict[str, Backend] = {}
    for name, config in backends.items():
        if config.type == "password_file":
            assert config.path is not None  # the configuration checked it
            built[name] = PasswordFile(name, config.path)
        else:
            assert config.socket is not None
            built[name] = DovecotAuth(name, config.socket, config.timeout)
    return built
