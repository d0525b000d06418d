"""Small files that must survive a crash: written whole or not at all, then made durable.

A rename is durable only once the directory holding it is fsynced; both steps are here so that
no caller forgets the second. The spool has its own (it imports nothing of hamta).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``directory/name`` whole or not at all (mode 0600), and make it durable.

    A reader sees the old content or the new, never a part: the data goes to a hidden temporary
    file, fsynced, renamed over the name, and the directory is fsynced.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    temporary = directory / f".{name}.tmp"
    _write_synced(temporary, data)
    os.replace(temporary, path)
    fsync_directory(directory)
    return path


def create_once(directory: Path, name: str, data: bytes) -> bytes:
    """``directory/name``'s content, creating it (0600, durably) with ``data`` if absent.

    Several processes (a node's workers) may race to create it: the file is written whole
    under a name of this process's own and linked into place, which fails if another got there
    first; every caller then returns what is in place, so all of them agree on it.
    """
    path = directory / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{name}.{os.getpid()}.tmp"
    _write_synced(temporary, data)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(temporary)
    fsync_directory(directory)
    return path.read_bytes()


def _write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` (0600) holding ``data`` whole, fsynced: a write may be partial."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
