"""Suspended destinations, kept on the spool volume so that a hold survives restart and failover.

``hamta queue suspend DOMAIN`` holds a destination in every worker of the running relay; each
worker writes the set it holds into its own spool directory (the spool root for worker 0,
``shard-K`` for worker K), next to the mail it holds back. Whichever node activates the spool
next reads the file at activation, so the hold moves with the mail: a suspended destination stays
suspended after a restart, a switchover or a failover, until someone resumes it.

The file is small JSON, replaced atomically (write, fsync, rename, fsync the directory): a crash
leaves the old set or the new one, never a torn file. The spool itself never reads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hamta.durable_files import write_durably

SUSPENDED_FILE = "suspended-destinations.json"


class SuspensionError(Exception):
    """The file of suspended destinations cannot be read or written."""


def read_suspended(spool: Path) -> set[str]:
    """The destination keys held in the spool directory ``spool`` (none if there is no file)."""
    path = spool / SUSPENDED_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as exc:
        raise SuspensionError(f"{path}: unreadable: {exc}") from None
    keys = data.get("suspended") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise SuspensionError(f'{path}: expected {{"suspended": [destination, ...]}}')
    return set(keys)


def write_suspended(spool: Path, keys: Iterable[str]) -> None:
    """Replace the set of held destinations in ``spool``, durably (blocking: run in a thread)."""
    path = spool / SUSPENDED_FILE
    data = json.dumps({"suspended": sorted(keys)}, indent=1).encode() + b"\n"
    try:
        write_durably(spool, SUSPENDED_FILE, data)
    except OSError as exc:
        raise SuspensionError(f"{path}: cannot write: {exc.strerror or exc}") from None


def load_suspended(spool: Path, log: Any) -> set[str]:
    """:func:`read_suspended` at activation: an unreadable file is logged, not fatal.

    A failover must not fail over a damaged hold file; the mail is delivered then, which is what
    the relay did before the hold, and the error says so.
    """
    try:
        return read_suspended(spool)
    except SuspensionError as exc:
        log.error("SuspensionsUnreadable", error=str(exc), action="no destination is held")
        return set()
