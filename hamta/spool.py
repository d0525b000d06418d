"""The durable spool: message bodies in append-only segments, their state in a journal.

Why this shape. A relay may answer 250 only once a message is on stable storage, and on failover
the new primary must rebuild its queue from the spool in well under a second at ordinary depths.
Both point to logs rather than a file per message: appending many messages to one file and
syncing it once (group commit) costs one fsync for every session that finished DATA in the same
instant, and rebuilding the queue means reading a compact journal, never the bodies.

* ``data/NNNNNNNN.seg`` hold the bodies, back to back, exactly as queued (Received: header
  included), each preceded by its envelope (its Enqueue record), so that the segments alone can
  rebuild a damaged journal. A segment is deleted once every message in it is finished and that
  fact is durable.
* ``journal/NNNNNNNN.jnl`` hold the state: one frame per group commit, each a CRC-checked list of
  records: :class:`Enqueue` (envelope plus where the body lies), :class:`Defer` (retry state of
  some recipients) and :class:`Done` (recipients finished: delivered, bounced or expired).
* ``journal/NNNNNNNN.ckpt`` is a checkpoint: the live state as of the end of journal ``NNNNNNNN``,
  so that recovery reads one checkpoint plus the journals after it, and old journals can go.

A group commit writes the bodies, fdatasyncs the segment, then writes the frame durably (one
``pwritev2`` with ``RWF_DSYNC``: a write and an fdatasync in one syscall), so a frame that
survives a crash never points at a body that did not. The bodies' write to the page cache is
made in the event loop's thread, the syncs and the frame's write in the spool's I/O thread.
Frames start with a magic: recovery skips a torn or damaged frame, goes on with the next, and
rebuilds from the segments the messages no intact record names (damage costs at most the damaged
message).
Replay is idempotent (a repeated Enqueue or a Done for an unknown message is ignored), which is
what lets a checkpoint be taken while mail keeps flowing.
The format is documented for operators in ``docs/spool-format.md``.

Three modules: this one (the ``Spool`` a relay opens: append, group commit, checkpoint),
``hamta.spool_format`` (records, frames, segment entries, their readers) and
``hamta.spool_recovery`` (the live state rebuilt from the files, damage kept aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import os
import sys
import time
import zlib
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from hamta.durable_files import (
    SyncedWriter,
    append_synced,
    fsync_directory,
    write_all,
    write_durably,
)
from hamta.spool_format import (
    FORMAT_VERSION,
    OLD_VERSIONS,
    CheckpointEnd,
    Defer,
    Done,
    Enqueue,
    Record,
    encode_frame,
    entry_head,
    numbered,
)
from hamta.spool_recovery import Damage, LiveMessage, RecipientKey, SpoolState, load_state

# The spool's public face: the spool, its errors, its messages and what its recovery returns
# (also read offline). The bytes are hamta.spool_format's, their replay hamta.spool_recovery's.
__all__ = [
    "Damage",
    "LiveMessage",
    "RecipientKey",
    "Spawn",
    "Spool",
    "SpoolError",
    "SpoolFencedError",
    "SpoolFullError",
    "SpoolState",
    "create_task",
    "load_state",
]

_CHECKPOINT_CHUNK = 4096  # live messages per checkpoint frame
_CHECKPOINT_WRITE = 8 * 1024 * 1024  # bytes of checkpoint frames held before they are written


#: Starts one of the spool's background tasks (its name, its coroutine): the relay passes its
#: supervisor's, so that a task dying of a bug stops the relay instead of silently hanging it.
Spawn = Callable[[str, Coroutine[Any, Any, None]], "asyncio.Task[None]"]


def create_task(name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro, name=name)


class SpoolError(Exception):
    """The spool cannot be used (locked, unreadable, wrong format)."""


class SpoolFencedError(SpoolError):
    """A newer term owns the spool: this relay must not write to it any more."""


class SpoolFullError(SpoolError):
    """The spool's file system has no room: refuse temporarily, lose nothing."""


class _Batch:
    """One group commit in the making: bodies, records and who waits for them."""

    __slots__ = (
        "appended",
        "bodies",
        "frame",
        "messages",
        "new_segment",
        "records",
        "segment_deletes",
        "syncs",
        "written",
    )

    def __init__(self) -> None:
        self.bodies: list[tuple[int, int, bytes, bytes]] = []  # segment, offset, head, body
        self.messages: list[LiveMessage] = []
        self.records: list[Record] = []
        self.appended: list[asyncio.Future[None]] = []  # one per message, in order
        self.syncs: list[asyncio.Future[None]] = []
        self.segment_deletes: list[int] = []
        # Set by Spool._write_bodies in the event loop, for the I/O thread's Spool._write_batch:
        self.written: list[tuple[int, int]] = []  # (segment fd, its length before the batch)
        self.new_segment = False  # a segment file was created: its directory entry to sync
        self.frame = b""  # the records, encoded

    def empty(self) -> bool:
        return not (self.records or self.syncs or self.segment_deletes)


class Spool:
    """A spool directory opened by one relay: append, track state, recover, checkpoint."""

    def __init__(
        self,
        path: Path,
        *,
        segment_size: int = 64 * 1024 * 1024,
        journal_size: int = 64 * 1024 * 1024,
        min_free: int = 0,
        wall_clock: Callable[[], float] = time.time,
        on_checkpoint: Callable[[str | None], None] | None = None,
        checkpoint_retry: float = 30.0,
        spawn: Spawn = create_task,
        on_commit: Callable[[int, float], None] | None = None,
        guard: Callable[[], str | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        recipient_key: RecipientKey | None = None,
    ) -> None:
        self.path = path
        self._clock = clock
        # The queue's keys of recipients (their domains), found by recovery as it reads the
        # journals: the queue is then built without decoding the envelopes again.
        self._recipient_key = recipient_key
        self._spawn = spawn
        self._segment_size = segment_size
        self._journal_size = journal_size
        self._min_free = min_free
        self._data_path = str(path / "data")
        self._wall = wall_clock
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-io")
        self._lock_fd: int | None = None
        self.live: dict[str, LiveMessage] = {}
        self._refs: dict[int, int] = {}
        self._segment = 0
        self._offset = 0
        self._journal = 0
        self._journal_bytes_since_ckpt = 0
        # Journals and segments numbered below these belong to earlier runs.
        self._first_journal = 0
        self._first_segment = 0
        self._seg_fds: dict[int, int] = {}
        self._jnl_fd: int | None = None
        # The journal's length, known without an fstat per commit (None: ask the file).
        self._jnl_size: int | None = None
        self._batch = _Batch()
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._checkpointing = False
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._recovered = False
        self._closed = False
        self._counter = int.from_bytes(os.urandom(3), "big")
        self.checkpoint_error: str | None = None
        # Told the error of every checkpoint that failed, and None for each one that succeeds.
        self._on_checkpoint = on_checkpoint
        # A failed checkpoint is tried again after this (monotonic), not only after another
        # journal_size of records: the space may come back while the relay is quiet.
        self._checkpoint_retry_at = 0.0
        self._checkpoint_retry = checkpoint_retry
        self.fsyncs = 0
        # Told the messages and seconds of every group commit.
        self.on_commit = on_commit
        # The fencing check (``hamta.epoch_token.EpochGuard.check``): the reason this spool
        # belongs to a newer term, or None. Run before every batch's first write (in the event
        # loop) and after its last sync (in the I/O thread).
        self.guard = guard
        self.fenced: str | None = None

    # ---------------------------------------------------------------- opening

    @property
    def active_segment(self) -> int:
        """The number of the segment new bodies are appended to."""
        return self._segment

    @property
    def data_dir(self) -> Path:
        """Where the body segments are."""
        return self.path / "data"

    @property
    def journal_dir(self) -> Path:
        """Where the journal and checkpoints are."""
        return self.path / "journal"

    def open(self) -> None:
        """Lock the directory and start a fresh journal and segment; fast, reads no state."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.data_dir.mkdir(mode=0o700, exist_ok=True)  # mail is private
            self.journal_dir.mkdir(mode=0o700, exist_ok=True)
            version = self.path / "VERSION"
            found = version.read_text() if version.exists() else None
            if found is not None and found not in (FORMAT_VERSION, *OLD_VERSIONS):
                raise SpoolError(f"{self.path}: unknown spool format {found!r}")
            if found != FORMAT_VERSION:
                # A version 1 spool's files stay readable; from now on a version 1 relay must
                # refuse it, since it could not read what this one writes.
                write_durably(self.path, version.name, FORMAT_VERSION.encode())
            self._lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"{self.path}: cannot open spool: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SpoolError(f"{self.path}: spool is in use by pid {holder or '?'}") from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        existing_journals = numbered(self.journal_dir, ".jnl") + numbered(self.journal_dir, ".ckpt")
        existing_segments = numbered(self.data_dir, ".seg")
        self._journal = (max(existing_journals) if existing_journals else 0) + 1
        self._first_journal = self._journal
        self._segment = (max(existing_segments) if existing_segments else 0) + 1
        self._first_segment = self._segment
        self._offset = 0
        self._flusher = self._spawn("spool group commit", self._flush_loop())

    # --------------------------------------------------------------- appending

    def new_qid(self) -> str:
        """A queue id: milliseconds since the epoch and a counter, unique and sortable."""
        self._counter = (self._counter + 1) & 0xFFFFF
        return f"{int(self._wall() * 1000):011X}{self._counter:05X}"

    async def append(
        self,
        body: bytes,
        sender: str,
        recipients: list[str] | tuple[str, ...],
        *,
        qid: str | None = None,
        message_id: str = "",
        client: str = "",
        is_dsn: bool = False,
    ) -> LiveMessage:
        """Queue a message; return once body and envelope are on stable storage."""
        if self._closed:
            raise SpoolError("spool is closed")
        if self._min_free:
            # Like Postfix's queue_minfree: keep room for the state records that let delivered
            # mail be deleted, or a full spool could never empty itself.
            stat = os.statvfs(self._data_path)
            if stat.f_bavail * stat.f_frsize < self._min_free + len(body):
                raise SpoolFullError(f"spool file system has less than {self._min_free} bytes free")
        rec = Enqueue(
            qid=qid or self.new_qid(),
            segment=0,
            offset=0,
            length=len(body),
            crc=zlib.crc32(body),
            arrival=self._wall(),
            sender=sys.intern(sender),  # held once however many messages it sends
            recipients=tuple(recipients),
            message_id=message_id,
            client=sys.intern(client),  # a relay's clients are few: each held once
            is_dsn=is_dsn,
        )
        try:
            head = entry_head(rec)
        except (msgspec.EncodeError, ValueError, TypeError, OverflowError) as exc:
            # Fails this message alone (a 451 to its session), never the batch it would join.
            raise SpoolError(f"envelope cannot be encoded: {exc}") from None
        if self._offset and self._offset + len(head) + len(body) > self._segment_size:
            self._next_segment()
        rec = msgspec.structs.replace(rec, segment=self._segment, offset=self._offset + len(head))
        self._offset += len(head) + len(body)
        message = LiveMessage.of(rec)
        # Known to the spool at once, so that a checkpoint or a segment retirement running
        # while the commit is under way accounts for it.
        self.live[rec.qid] = message
        self._refs[rec.segment] = self._refs.get(rec.segment, 0) + 1
        batch = self._batch
        batch.bodies.append((rec.segment, rec.offset - len(head), head, body))
        batch.records.append(rec)
        batch.messages.append(message)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch.appended.append(waiter)
        self._wake.set()
        try:
            await waiter
        except SpoolError:
            self._forget(message)
            raise
        return message

    def _forget(self, message: LiveMessage) -> None:
        if self.live.pop(message.qid, None) is None:
            return
        segment = message.segment
        self._refs[segment] -= 1
        if self._refs[segment] == 0 and segment != self._segment:
            del self._refs[segment]
            # Only once the Done records are durable may the body go.
            self._batch.segment_deletes.append(segment)
            self._wake.set()

    def _next_segment(self) -> None:
        old = self._segment
        self._segment += 1
        self._offset = 0
        if self._refs.get(old, 0) == 0:
            self._refs.pop(old, None)
            self._batch.segment_deletes.append(old)

    def mark_done(self, message: LiveMessage, rcpts: list[int]) -> bool:
        """Record recipients as finished; return True when the whole message is finished.

        Durable at the next group commit. Losing it to a crash only means a repeated delivery,
        never a lost message, so delivery does not wait for it.
        """
        finished = message.finish(rcpts)
        self._batch.records.append(Done(message.qid, tuple(rcpts)))
        self._wake.set()
        if not finished:
            return False
        self._forget(message)
        return True

    def mark_deferred(
        self, message: LiveMessage, rcpts: list[int], attempts: int, next_attempt: float
    ) -> None:
        """Record the retry state of recipients that failed temporarily."""
        message.defer(rcpts, attempts, next_attempt)
        self._batch.records.append(Defer(message.qid, tuple(rcpts), attempts, next_attempt))
        self._wake.set()

    async def read_body(self, rec: Enqueue) -> bytes:
        """Read a queued message's body back, checking its CRC."""
        body = self._pread(rec)
        if zlib.crc32(body) != rec.crc:
            raise SpoolError(f"{rec.qid}: body in segment {rec.segment} fails its checksum")
        return body

    def _pread(self, rec: Enqueue) -> bytes:
        fd = self._seg_fds.get(rec.segment)
        if fd is not None:
            return os.pread(fd, rec.length, rec.offset)
        with open(self.data_dir / f"{rec.segment:08d}.seg", "rb") as handle:
            handle.seek(rec.offset)
            return handle.read(rec.length)

    async def sync(self) -> None:
        """Wait until every record appended so far is durable."""
        if self._closed:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._batch.syncs.append(waiter)
        self._wake.set()
        await waiter

    # ------------------------------------------------------------ group commit

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while not self._batch.empty():
                batch = self._take_batch()
                started = time.perf_counter()
                try:
                    self._write_bodies(batch)
                    await loop.run_in_executor(self._io, self._write_batch, batch)
                except Exception as exc:  # whatever it was, this batch alone fails
                    self._fail_batch(batch, exc)
                    # The state records it kept are tried again with the next append, not in
                    # a loop against a full disk or a spool that a newer term owns.
                    break
                for waiter in batch.appended + batch.syncs:
                    if not waiter.done():
                        waiter.set_result(None)
                if self.on_commit is not None:
                    self.on_commit(len(batch.appended), time.perf_counter() - started)
                if (
                    self._recovered
                    and not self._checkpointing
                    and (
                        self._journal_bytes_since_ckpt > self._journal_size
                        or (
                            self.checkpoint_error is not None
                            and self._clock() >= self._checkpoint_retry_at
                        )
                    )
                ):
                    self._checkpointing = True
                    self._checkpoint_task = self._spawn("spool checkpoint", self._checkpoint())
            if self._closed:
                return

    def _take_batch(self) -> _Batch:
        batch, self._batch = self._batch, _Batch()
        return batch

    def _check_fence(self) -> None:
        """Raise SpoolFencedError when a newer term owns the spool (see ``guard``)."""
        reason = self.guard() if self.guard is not None else None
        if reason is not None:
            self.fenced = reason
            raise SpoolFencedError(reason)

    def _write_bodies(self, batch: _Batch) -> None:
        """In the event loop: the fencing check, the bodies into the page cache, the frame encoded.

        Why here and not in the I/O thread: every syscall there hands the GIL to and fro between
        the two threads (futex calls, context switches), while a write to the page cache made
        here, when the I/O thread is idle between batches, costs one uncontended syscall. What
        makes mail durable stays in the I/O thread: the fdatasyncs, and the frame's write,
        which must follow the bodies' sync (:meth:`_write_batch`). The fencing check comes
        first, as before: a term that lost the spool must not write to it (the guard reads the
        token only when its last read is stale, as delivery's check in this thread does).
        """
        self._check_fence()
        if batch.records:
            batch.frame = encode_frame(batch.records)
        if not batch.bodies:
            return
        by_segment: dict[int, list[bytes]] = {}
        before: dict[int, int] = {}  # a segment's length before the batch: where its entry starts
        for segment, offset, head, body in batch.bodies:
            if segment not in by_segment:
                by_segment[segment] = []
                before[segment] = offset
            by_segment[segment].extend((head, body))
        try:
            for segment, chunks in by_segment.items():
                fd = self._seg_fds.get(segment)
                if fd is None:
                    fd = self._open_segment(segment)
                    batch.new_segment = True
                batch.written.append((fd, before[segment]))
                write_all(fd, b"".join(chunks))
        except Exception:
            self._truncate(batch.written)
            raise

    def _write_batch(self, batch: _Batch) -> None:
        """In the I/O thread: fdatasync the bodies, then the frame written durably, deletions.

        The bodies were written by :meth:`_write_bodies`; the frame is written only once they
        are durable, so that a frame that survives a crash never points at a body that did
        not. The fencing check ran before the first write and runs again after the last
        fdatasync: a batch is acknowledged only if this term owned the spool all along. One
        that lost it in between is written but not acknowledged (the client retries; a
        duplicate at worst).
        """
        touched = list(batch.written)  # (fd, length before) for rollback
        try:
            for fd, _ in batch.written:
                os.fdatasync(fd)
                self.fsyncs += 1
            if batch.new_segment:
                fsync_directory(self.data_dir)
            if batch.frame:
                fd = self._journal_fd()
                size = self._jnl_size if self._jnl_size is not None else os.fstat(fd).st_size
                touched.append((fd, size))
                self._jnl_size = None  # unknown until the write and its sync succeed
                append_synced(fd, batch.frame)
                self.fsyncs += 1
                self._jnl_size = size + len(batch.frame)
                self._journal_bytes_since_ckpt += len(batch.frame)
            for message in batch.messages:
                message.durable = True
        except Exception:
            self._truncate(touched)
            raise
        self._check_fence()
        for segment in batch.segment_deletes:
            self._delete_segment(segment)

    @staticmethod
    def _truncate(touched: list[tuple[int, int]]) -> None:
        """Cut a failed batch's writes off again (recovery would skip them all the same)."""
        for fd, size in touched:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)

    def _fail_batch(self, batch: _Batch, exc: Exception) -> None:
        error: SpoolError
        if isinstance(exc, SpoolFencedError):
            error = exc
        elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            error = SpoolFullError(f"spool file system is full: {exc.strerror}")
        elif isinstance(exc, OSError):
            error = SpoolError(f"spool write failed: {exc.strerror}")
        else:
            error = SpoolError(f"spool write failed: {type(exc).__name__}: {exc}")
        # Messages appended since this batch was taken were given offsets that assumed its
        # bodies were written; they fail with it and later appends start a fresh segment.
        pending, self._batch = self._batch, _Batch()
        for waiter in batch.appended + batch.syncs + pending.appended:
            if not waiter.done():
                waiter.set_exception(error)
        # State changes stay in memory and are written with the next batch that succeeds.
        for failed in (batch, pending):
            self._batch.records += [r for r in failed.records if not isinstance(r, Enqueue)]
            self._batch.segment_deletes += failed.segment_deletes
        self._batch.syncs = pending.syncs
        self._next_segment()

    def _open_segment(self, segment: int) -> int:
        """Create a segment; its directory entry is synced by the I/O thread, before the frame
        that names it."""
        fd = os.open(
            self.data_dir / f"{segment:08d}.seg", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600
        )
        self._seg_fds[segment] = fd
        # Keep only the newest segment open for writing; older ones are read by path.
        for old in [s for s in self._seg_fds if s < segment - 1]:
            os.close(self._seg_fds.pop(old))
        return fd

    def _journal_fd(self) -> int:
        if self._jnl_fd is None:
            self._jnl_fd = os.open(
                self.journal_dir / f"{self._journal:08d}.jnl",
                os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                0o600,
            )
            fsync_directory(self.journal_dir)
            self._jnl_size = os.fstat(self._jnl_fd).st_size
        return self._jnl_fd

    def _delete_segment(self, segment: int) -> None:
        fd = self._seg_fds.pop(segment, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.data_dir / f"{segment:08d}.seg")

    # --------------------------------------------------------------- recovery

    async def recover(self) -> SpoolState:
        """Rebuild the live state left by earlier runs (once, right after :meth:`open`).

        Reads the newest checkpoint and the journals after it, never a body, in a thread; the
        relay may already be accepting mail meanwhile, and what it accepted is merged in. The
        earlier runs' journals are then folded into one checkpoint in the background. Returns
        what was recovered (the earlier runs' messages only; read its ``live`` table before the
        next await, see below).
        """
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(
            None,
            functools.partial(
                load_state,
                self.path,
                self._first_journal,
                self._first_segment,
                recipient_key=self._recipient_key,
            ),
        )
        for segment in state.unreferenced_segments:
            self._delete_segment(segment)
        for message in state.live.values():
            message.durable = True
            segment = message.segment
            self._refs[segment] = self._refs.get(segment, 0) + 1
        # Older messages first in the table, then those accepted while recovering. When none
        # was, the recovered table becomes the spool's own, not a copy (a million entries at
        # depth): what this returns is then the spool's live table, which changes as mail is
        # delivered, so a caller reads it before its next await.
        if self.live:
            merged = dict(state.live)
            merged.update(self.live)
            self.live = merged
        else:
            self.live = state.live
        self._recovered = True
        if state.stats.journal_files and not self._checkpointing:
            # Fold the earlier runs' journals into one checkpoint, off the failover path.
            self._checkpointing = True
            self._checkpoint_task = self._spawn("spool checkpoint", self._checkpoint())
        return state

    # ------------------------------------------------------------- checkpoint

    async def _checkpoint(self) -> None:
        """Write the live state as of a journal rotation, then drop what it replaces."""
        loop = asyncio.get_running_loop()
        # Where the next body goes: every message before it is durable once the sync below
        # returns, so it is in this checkpoint or finished; later ones are also in journals
        # after the cut. Recovery rebuilds from the segments after it what those journals lost.
        high_water = (self._segment, self._offset)
        try:
            # Rotate first: everything before the cut is in journals <= cut.
            await self.sync()
            cut = self._journal
            await loop.run_in_executor(self._io, self._rotate_journal)
            qids = list(self.live)
            # Written as it is encoded, a few megabytes at a time, so that a checkpoint of a
            # deep queue (115 MiB for a million messages) is never held whole in memory.
            writer = await loop.run_in_executor(self._io, self._open_checkpoint, cut)
            try:
                await self._write_live(writer, qids, high_water)
                stale = [
                    p
                    for p in self.journal_dir.iterdir()
                    if p.suffix in (".jnl", ".ckpt") and p.stem.isdigit() and int(p.stem) <= cut
                ]
                await loop.run_in_executor(self._io, self._finish_checkpoint, writer, cut, stale)
            finally:
                # Through the I/O thread, after any write of it still queued there.
                self._io.submit(writer.close)
            self._checkpoint_done(None)
        except SpoolError as exc:  # fenced, or the rotation's sync failed
            self._checkpoint_done(f"checkpoint failed: {exc}")
        except OSError as exc:
            # The journals it would have replaced stay, so nothing is lost; try again later.
            self._checkpoint_done(f"checkpoint failed: {exc.strerror or exc}")
            with contextlib.suppress(OSError):
                (self.journal_dir / f"{cut:08d}.tmp").unlink(missing_ok=True)
        finally:
            self._checkpointing = False

    async def _write_live(
        self, writer: SyncedWriter, qids: list[str], high_water: tuple[int, int]
    ) -> None:
        """Encode the durable messages among ``qids`` into checkpoint frames and write them
        with ``writer`` in the I/O thread as they accumulate; end with CheckpointEnd."""
        loop = asyncio.get_running_loop()
        frames: list[bytes] = []
        size = count = 0
        for start in range(0, len(qids), _CHECKPOINT_CHUNK):
            records: list[Record | msgspec.Raw] = []
            for qid in qids[start : start + _CHECKPOINT_CHUNK]:
                message = self.live.get(qid)
                if message is None or not message.durable:
                    continue
                # The Enqueue record's bytes as the journal had them: nothing to decode.
                records.append(msgspec.Raw(message.envelope))
                count += 1
                finished = message.finished
                if finished:
                    records.append(Done(qid, tuple(finished)))
                for index, (attempts, when) in (message.retry or {}).items():
                    records.append(Defer(qid, (index,), attempts, when))
            frames.append(encode_frame(records))
            size += len(frames[-1])
            if size >= _CHECKPOINT_WRITE:
                await loop.run_in_executor(self._io, writer.write, frames)
                frames, size = [], 0
            else:
                await asyncio.sleep(0)  # let sessions run between chunks
        # Its absence tells recovery that the checkpoint lost frames at its end.
        frames.append(encode_frame([CheckpointEnd(count, *high_water)]))
        await loop.run_in_executor(self._io, writer.write, frames)

    def _checkpoint_done(self, error: str | None) -> None:
        self.checkpoint_error = error
        if error is not None:
            self._checkpoint_retry_at = self._clock() + self._checkpoint_retry
        if self._on_checkpoint is not None:
            self._on_checkpoint(error)

    def _rotate_journal(self) -> None:
        if self._jnl_fd is not None:
            os.close(self._jnl_fd)
            self._jnl_fd = None
        self._journal += 1
        self._journal_bytes_since_ckpt = 0

    def _open_checkpoint(self, cut: int) -> SyncedWriter:
        """The checkpoint's temporary file, created empty, once this term owns the spool."""
        self._check_fence()
        return SyncedWriter(self.journal_dir / f"{cut:08d}.tmp")

    def _finish_checkpoint(self, writer: SyncedWriter, cut: int, stale: list[Path]) -> None:
        """Sync the written checkpoint, put it in place, and drop the files it replaces."""
        writer.sync()
        # The rename and the deletions replace journals a newer term may be recovering from.
        self._check_fence()
        final = self.journal_dir / f"{cut:08d}.ckpt"
        os.rename(final.with_suffix(".tmp"), final)
        fsync_directory(self.journal_dir)
        for path in stale:
            if path != final:
                path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- closing

    async def close(self) -> None:
        """Flush what is pending, stop the writer and release the lock."""
        if self._closed:
            return
        if self._checkpoint_task is not None:
            await asyncio.gather(self._checkpoint_task, return_exceptions=True)
        # Records a full disk or a newer term kept from the disk stay unwritten: they are state
        # changes (Done, Defer) whose loss repeats a delivery, never loses a message.
        flushing = self._flusher is not None and not self._flusher.done()
        if flushing:  # a group commit that died (its supervisor said so) syncs nothing more
            with contextlib.suppress(SpoolError):
                await self.sync()
        self._closed = True
        self._wake.set()
        if self._flusher is not None and flushing:
            await self._flusher
        for waiter in self._batch.appended + self._batch.syncs:  # never to be written now
            if not waiter.done():
                waiter.set_exception(SpoolError("spool is closed"))
        for fd in self._seg_fds.values():
            os.close(fd)
        self._seg_fds.clear()
        if self._jnl_fd is not None:
            os.close(self._jnl_fd)
            self._jnl_fd = None
        self._io.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def is_writable(self) -> bool:
        """True while the spool accepts mail."""
        # A file system remounted read-only after an I/O error (ext4 errors=remount-ro) shows
        # here, not only at the next write.
        return (
            self._lock_fd is not None
            and not self._closed
            and self.fenced is None
            and os.access(self._data_path, os.W_OK)
        )
