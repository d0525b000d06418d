"""The ``hamta fleet ...`` commands (``hamtactl``): every pair on one ZooKeeper ensemble.

``status`` and ``history`` read with the fleet reader's credentials (READ on every pair, no
more); ``create-pair`` runs with the administrator's, who owns the fleet's root; ``reader-id``
prints the digest identity a pair's ``agent.fleet_reader`` names. Credentials files hold one
line ``user:password`` and must be private (mode 0600).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException
from kazoo.handlers.threading import KazooTimeoutError

from cluster.coordination_layout import CoordinationError, Credentials
from cluster.fleet import (
    FleetError,
    PairExistsError,
    create_pair,
    fleet_history,
    fleet_root,
    fleet_status,
    format_fleet,
    format_fleet_history,
)
from cluster.zk_acl import check_digest_id
from hamta import eventlog


@contextmanager
def _client(hosts: str, credentials: Credentials | None, timeout: float) -> Iterator[KazooClient]:
    servers, _root = fleet_root(hosts)
    client = KazooClient(
        hosts=servers, timeout=4.0, auth_data=[credentials.auth] if credentials else None
    )
    try:
        client.start(timeout=timeout)
    except (KazooTimeoutError, KazooException) as exc:
        raise FleetError(f"ZooKeeper at {hosts} unreachable within {timeout:g}s ({exc})") from exc
    try:
        yield client
    finally:
        client.stop()
        client.close()


def _credentials(path: Path | None) -> Credentials | None:
    return Credentials.from_file(path) if path is not None else None


def cmd_status(args: argparse.Namespace) -> int:
    """``hamta fleet status [--json]``."""
    with _client(args.zookeeper, _credentials(args.credentials), args.timeout) as client:
        status = fleet_status(client, fleet_root(args.zookeeper)[1])
    print(json.dumps({"pairs": status}, indent=2) if args.json else format_fleet(status))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """``hamta fleet history [--json]``."""
    with _client(args.zookeeper, _credentials(args.credentials), args.timeout) as client:
        records = fleet_history(client, fleet_root(args.zookeeper)[1])
    print(json.dumps(records, indent=2) if args.json else format_fleet_history(records))
    return 0


def _stdin_credentials() -> Credentials:
    """``user:password`` on standard input: a deployment tool's way, no file on any disk."""
    user, colon, password = sys.stdin.readline().strip().partition(":")
    if not (user and colon and password):
        raise FleetError("--credentials -: standard input must hold one line 'user:password'")
    return Credentials(user, password)


def cmd_create_pair(args: argparse.Namespace) -> int:
    """``hamta fleet create-pair NAME --credentials ADMIN --owner FILE --reader FILE``."""
    if args.credentials is None:
        raise FleetError("create-pair needs the administrator's --credentials")
    if args.reader is not None and args.reader_id is not None:
        raise FleetError("create-pair takes --reader FILE or --reader-id USER:HASH, not both")
    admin = (
        _stdin_credentials()
        if str(args.credentials) == "-"
        else Credentials.from_file(args.credentials)
    )
    owner = Credentials.from_file(args.owner).digest_id
    # Without a reader the pair is hidden from `hamta fleet status` (listed as unreadable).
    readers = [Credentials.from_file(args.reader).digest_id] if args.reader is not None else []
    readers += [check_digest_id(args.reader_id)] if args.reader_id is not None else []
    with _client(args.zookeeper, admin, args.timeout) as client:
        try:
            created = create_pair(
                client,
                fleet_root(args.zookeeper)[1],
                args.pair,
                admin=admin,
                owner=owner,
                readers=readers,
            )
        except PairExistsError as exc:
            if not args.exist_ok:
                raise
            print(f"exists: {exc}")
            return 0
    print("\n".join(f"created {path}" for path in created))
    return 0


def cmd_reader_id(args: argparse.Namespace) -> int:
    """``hamta fleet reader-id --credentials FILE``: the ``user:hash`` for agent.fleet_reader."""
    print(Credentials.from_file(args.credentials).digest_id)
    return 0


def _run(args: argparse.Namespace) -> int:
    # The command's own error line says why it failed; kazoo's retries would bury it.
    eventlog.quiet_library("kazoo")
    try:
        result: int = args.action(args)
    except (FleetError, CoordinationError, ValueError) as exc:
        print(f"hamta fleet: {exc}", file=sys.stderr)
        return 1
    return result


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hamta fleet ...`` to the dispatcher's parser."""
    fleet = sub.add_parser("fleet", help="every pair on one ZooKeeper ensemble")
    actions = fleet.add_subparsers(dest="fleet_command", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--zookeeper",
            required=True,
            help='the ensemble, as agent.zookeeper without the pair: "h1:2181,h2:2181[/chroot]"',
        )
        parser.add_argument(
            "--credentials",
            type=Path,
            help="user:password file (0600): the reader's, or the admin's ('-': standard input)",
        )
        parser.add_argument("--timeout", type=float, default=10.0, help="to reach ZooKeeper (s)")
        parser.set_defaults(func=_run)

    status = actions.add_parser("status", help="every pair: nodes, roles, epochs, VIPs, queues")
    common(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(action=cmd_status)
    history = actions.add_parser("history", help="every pair's failovers, merged, oldest first")
    common(history)
    history.add_argument("--json", action="store_true")
    history.set_defaults(action=cmd_history)
    create = actions.add_parser("create-pair", help="create a pair's root (the administrator)")
    common(create)
    create.add_argument("pair", help="the pair's name (its agents' agent.cluster)")
    create.add_argument("--owner", type=Path, required=True, help="the pair's credentials file")
    create.add_argument("--reader", type=Path, help="the reader's credentials file")
    create.add_argument("--reader-id", help="or the reader's id, as `hamta fleet reader-id` says")
    create.add_argument(
        "--exist-ok", action="store_true", help="a pair that exists already is no error (exit 0)"
    )
    create.set_defaults(action=cmd_create_pair)
    reader = actions.add_parser("reader-id", help="print a reader's id for agent.fleet_reader")
    reader.add_argument("--credentials", type=Path, required=True, help="the reader's file")
    reader.set_defaults(func=_run, action=cmd_reader_id)
