"""``hamta auth add|remove|list``: the users of a password file backend (SMTP AUTH).

The file is named by ``--file``, or found in ``--config`` (its password_file backend, or the one
named by ``--backend``). The password is asked on a terminal (twice), or read from the first line
of ``--password-file`` or of standard input, so that scripts never put it on a command line
(where ``ps`` would show it). The relay reads the file again when it changes: no restart.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from hamta.auth_backends import (
    PasswordFileError,
    check_user_name,
    hash_password,
    read_password_file,
    write_password_file,
)
from hamta.config import ConfigError, load_config


def _file(args: argparse.Namespace) -> Path:
    if args.file is not None:
        return Path(args.file)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise PasswordFileError(str(exc)) from None
    files = {
        name: backend.path
        for name, backend in config.auth.backends.items()
        if backend.type == "password_file" and backend.path is not None
    }
    if args.backend is not None:
        if args.backend not in files:
            raise PasswordFileError(f"no password_file backend {args.backend!r} in the config")
        return files[args.backend]
    if len(files) != 1:
        names = ", ".join(sorted(files)) or "none"
        raise PasswordFileError(
            f"give --file, or --backend among the config's password files ({names})"
        )
    return next(iter(files.values()))


def _password(args: argparse.Namespace) -> str:
    if args.password_file is not None:
        try:
            lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise PasswordFileError(f"{args.password_file}: {exc.strerror}") from None
        return lines[0] if lines else ""
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise PasswordFileError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def cmd_auth(args: argparse.Namespace) -> int:
    """``hamta auth ACTION [USER]``."""
    try:
        path = _file(args)
        entries = read_password_file(path) if path.exists() or args.action != "add" else {}
        if args.action == "list":
            for user in sorted(entries):
                scheme = "argon2id" if entries[user].startswith("$argon2") else "bcrypt"
                print(f"{user}\t{scheme}")
            return 0
        if args.user is None:
            raise PasswordFileError(f"auth {args.action} needs a USER")
        user = check_user_name(args.user)
        if args.action == "remove":
            if entries.pop(user, None) is None:
                raise PasswordFileError(f"{path}: no user {user!r}")
            write_password_file(path, entries)
            print(f"hamta: removed {user} from {path}", file=sys.stderr)
            return 0
        replaced = user in entries
        entries[user] = hash_password(_password(args), args.scheme)
        write_password_file(path, entries)
        verb = "changed the password of" if replaced else "added"
        print(f"hamta: {verb} {user} in {path} ({args.scheme}, mode 0600)", file=sys.stderr)
        return 0
    except PasswordFileError as exc:
        print(f"hamta: {exc}", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``hamta auth`` on the top-level subparsers."""
    auth = sub.add_parser("auth", help="SMTP AUTH users of a password file")
    auth.add_argument("action", choices=["add", "remove", "list"])
    auth.add_argument("user", nargs="?", help="the login (add, remove)")
    auth.add_argument("--file", type=Path, help="the password file")
    auth.add_argument("--config", type=Path, help="relay TOML naming the password file")
    auth.add_argument("--backend", help="which password_file backend of --config")
    auth.add_argument(
        "--password-file", type=Path, help="read the password from this file's first line"
    )
    auth.add_argument("--scheme", choices=["argon2id", "bcrypt"], default="argon2id")
    auth.set_defaults(func=cmd_auth)
