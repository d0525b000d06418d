"""The fencing token on the spool: the epoch of the term that owns it.

The cluster agent writes the epoch of its new term (an ever-increasing number handed out by
ZooKeeper) into ``hamta-epoch`` at the root of the shared storage before its relay touches the
spool. A relay activated for epoch N checks the token before every write to the spool and before
every acknowledgement and delivery: once the token is above N, a newer term owns the spool, and
this relay (a "zombie": frozen, partitioned, or simply late) stops accepting and delivering at
once. This is the storage side of fencing (Kleppmann's fencing tokens), and it does not depend
on the zombie's agent noticing anything.

The token is one 4096-byte block, rewritten in place and read back with ``O_DIRECT`` where the
file system allows it: two machines sharing a disk do not share a page cache, and a cached copy
of an old token is exactly what a zombie must not trust. (On one kernel, as in the namespace
lab, the page cache is shared and a buffered read is as good.)

A direct read is a real I/O (0.1-0.2 ms on this machine's disk, more on a SAN), too much for
every message of a busy relay's event loop. So a check re-reads the token only when the last
read is older than ``max_age`` (20 ms), measured on ``CLOCK_BOOTTIME``, which goes on counting
while a process is stopped or a machine is suspended: a zombie always re-reads when it wakes.
What a running relay may miss is a token changed in the last 20 ms, and a running relay is one
whose agent is alive and demotes it long before its peer's session-expiry-plus-grace takeover.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hamta.durable_files import fsync_directory

TOKEN_FILE = "hamta-epoch"
_BLOCK = 4096


class TokenError(Exception):
    """The token cannot be written: it is unreadable, or a newer term already wrote one."""


def _open(path: Path, flags: int) -> tuple[int, bool]:
    """Open with ``O_DIRECT`` when the file system supports it; say whether it did."""
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # tmpfs and some others refuse O_DIRECT
                raise
    return os.open(path, flags, 0o644), False


def _parse(data: bytes, path: Path) -> int | None:
    text = data.split(b"\0", 1)[0].strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise TokenError(f"{path}: not a fencing token: {text[:40]!r}") from None
    if value < 0:
        raise TokenError(f"{path}: negative epoch {value}")
    return value


def read_token(path: Path) -> int | None:
    """The epoch in the token file at ``path``; None when there is none (missing or empty)."""
    try:
        fd, direct = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if direct:
            # O_DIRECT wants an aligned buffer: an anonymous mapping is page-aligned.
            with mmap.mmap(-1, _BLOCK) as buffer:
                length = os.preadv(fd, [buffer], 0)
                data = bytes(buffer[:length])
        else:
            data = os.pread(fd, _BLOCK, 0)
    finally:
        os.close(fd)
    return _parse(data, path)


def write_token(directory: Path, epoch: int) -> Path:
    """Write ``epoch`` durably as the token in ``directory``; refuse to go back in time.

    A node whose term is older than what the storage carries was superseded and must not take
    the spool, so a token above ``epoch`` raises ``TokenError``. Rewriting the same block in
    place (rather than renaming a new file over it) keeps the file's inode and block, so that a
    reader on another machine reading with ``O_DIRECT`` sees the new value.
    """
    if epoch < 0:
        raise TokenError(f"cannot write a negative epoch ({epoch})")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TOKEN_FILE
    current = read_token(path)
    if current is not None and current > epoch:
        raise TokenError(f"{path} carries epoch {current}, newer than ours ({epoch})")
    text = f"{epoch}\n".encode()
    block = text + b" " * (_BLOCK - len(text) - 1) + b"\n"
    created = not path.exists()
    fd, direct = _open(path, os.O_WRONLY | os.O_CREAT)
    try:
        # Readable by the relay, which runs as a user of its own (hamta/privileges.py), whatever
        # the writer's umask: the term is no secret.
        if os.fstat(fd).st_mode & 0o777 != 0o644:
            os.fchmod(fd, 0o644)
        if direct:
            with mmap.mmap(-1, _BLOCK) as buffer:
                buffer[:] = block
                os.pwritev(fd, [buffer], 0)
        else:
            os.pwrite(fd, block, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_directory(directory)
    return path


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class EpochGuard:
    """A relay's check of its term against the token: ``check()`` says why it may not write.

    Once superseded, always superseded: the first check that finds a newer token (or none, or an
    unreadable one) makes every later check fail too, and calls ``on_fenced`` once with the
    reason. Checks run in the event loop and in the spool's I/O thread, hence the lock.
    """

    def __init__(
        self,
        path: Path,
        epoch: int,
        on_fenced: Callable[[str], None] | None = None,
        reader: Callable[[Path], int | None] = read_token,
        *,
        max_age: float = 0.02,
        clock: Callable[[], float] = _boottime,
    ) -> None:
        self.path = path
        self.epoch = epoch
        self.on_fenced = on_fenced
        self._read = reader
        self._lock = threading.Lock()
        self.max_age = max_age
        self._clock = clock
        self._read_at = float("-inf")  # when the token last showed this term owns the spool
        self.fenced: str | None = None
        self.checks = 0
        self.reads = 0

    def verify(self) -> None:
        """At activation: the token must carry exactly this term's epoch."""
        self._read_at = float("-inf")
        reason = self.check()
        if reason is not None:
            raise TokenError(reason)

    def check(self) -> str | None:
        """None while this term still owns the spool; otherwise why it does not."""
        if self.fenced is not None:
            return self.fenced
        now = self._clock()
        if now - self._read_at <= self.max_age:
            self.checks += 1
            return None
        try:
            self.reads += 1
            found = self._read(self.path)
            reason = None
            if found is None:
                reason = f"the fencing token {self.path} is gone"
            elif found != self.epoch:
                # Newer: a later term owns the spool. Older: a superseded agent wrote it late;
                # either way this relay cannot tell who owns the spool, and stops.
                reason = f"the spool belongs to epoch {found}; this relay serves epoch {self.epoch}"
        except (OSError, TokenError) as exc:
            # Not knowing is not owning: a storage that cannot show the token is not ours.
            reason = f"cannot read the fencing token {self.path}: {exc}"
        with self._lock:
            self.checks += 1
            if reason is None and self.fenced is None:
                self._read_at = now
            if reason is None or self.fenced is not None:
                return self.fenced
            self.fenced = reason
        if self.on_fenced is not None:
            with contextlib.suppress(Exception):  # the caller's report must not mask the fence
                self.on_fenced(reason)
        return reason
