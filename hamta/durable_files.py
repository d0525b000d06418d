"""Files that must survive a crash: written whole, fsynced, and their directory entry too.

A new or renamed file is durable only once the directory holding it is fsynced; every sequence
of write, fsync of the file, fsync of its directory is here, so that no caller forgets a step.
Standard library only: the spool uses it too (and imports nothing else of hamta).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from pathlib import Path


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` whole to ``fd``: one ``os.write`` may write only a part."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def append_synced(fd: int, data: bytes) -> None:
    """Append ``data`` whole to ``fd`` (opened ``O_APPEND``), durable as after ``fdatasync``.

    One syscall where ``write`` and ``fdatasync`` were two: ``pwritev2`` with ``RWF_DSYNC``
    (``O_DSYNC`` for this write alone: the data and what reading it back needs, the new length,
    are on stable storage when it returns). For a thread that hands the GIL back and forth
    around each of its syscalls, one fewer is two context switches fewer.
    """
    view = memoryview(data)
    while view:
        view = view[os.pwritev(fd, [view], -1, os.RWF_DSYNC) :]  # -1: the file's end


def write_synced(path: Path, chunks: Iterable[bytes]) -> None:
    """Create or truncate ``path`` (0600), write ``chunks`` whole, fsync it; no directory sync.

    The first half of a replacement whose caller renames the file itself (the spool's
    checkpoint checks its fencing token in between), then calls ``fsync_directory``.
    """
    with SyncedWriter(path) as writer:
        writer.write(chunks)
        writer.sync()


class SyncedWriter:
    """:func:`write_synced` for a file whose chunks come a few at a time (a checkpoint of a
    deep queue, encoded between other work): create or truncate ``path`` (0600), ``write`` as
    often as needed, ``sync`` once, ``close``; no directory sync (the caller renames)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, chunks: Iterable[bytes]) -> None:
        """Append ``chunks`` whole."""
        for chunk in chunks:
            write_all(self._fd, chunk)

    def sync(self) -> None:
        """fsync what was written."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (synced or not: an unsynced one is the caller's to discard)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SyncedWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_durably(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to ``directory/name`` whole or not at all (mode 0600), and make it durable.

    A reader sees the old content or the new, never a part: the data goes to a hidden temporary
    file, fsynced, renamed over the name, and the directory is fsynced.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    temporary = directory / f".{name}.tmp"
    write_synced(temporary, [data])
    os.replace(temporary, path)
    fsync_directory(directory)
    return path


def create_new(directory: Path, name: str, data: bytes) -> Path:
    """Create ``directory/name`` (0600) holding ``data``, whole and durable, never over a file.

    ``FileExistsError`` when the name is taken. The data is written under a name of this
    process's own and linked into place, so that a crash never leaves a part under the name.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    temporary = directory / f".{name}.{os.getpid()}.tmp"
    write_synced(temporary, [data])
    try:
        os.link(temporary, path)
    except FileExistsError:
        # Named after the file that is there, not the temporary one the link came from.
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    finally:
        os.unlink(temporary)
    fsync_directory(directory)
    return path


def create_once(directory: Path, name: str, data: bytes) -> bytes:
    """``directory/name``'s content, creating it (0600, durably) with ``data`` if absent.

    Several processes (a node's workers) may race to create it: whoever links it first wins
    (``create_new``), and every caller returns what is in place, so all of them agree on it.
    """
    path = directory / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    try:
        create_new(directory, name, data)
    except FileExistsError:
        fsync_directory(directory)  # the winner's link may not be durable yet
    return path.read_bytes()


def append_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Append ``data`` whole to ``path`` and fsync it; creating the file syncs its directory too.

    For records appended one at a time (a reader skips a line a crash cut short).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        created = False
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
        created = True
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_directory(path.parent)
