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

A group commit writes the bodies, fdatasyncs the segment, then writes the frame and fdatasyncs the
journal, so a frame that survives a crash never points at a body that did not. Frames start
with a magic: recovery skips a torn or damaged frame, goes on with the next, and rebuilds from
the segments the messages no intact record names (damage costs at most the damaged message).
Replay is idempotent (a repeated Enqueue or a Done for an unknown message is ignored), which is
what lets a checkpoint be taken while mail keeps flowing.
The format is documented for operators in ``docs/spool-format.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import os
import struct
import time
import zlib
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from hamta.durable_files import fsync_directory, write_all, write_durably, write_synced

FORMAT_VERSION = "hamta-spool 2\n"
# Version 1 spools are read (their journals and checkpoints) and upgraded in place; see
# docs/spool-format.md.
_OLD_VERSIONS = ("hamta-spool 1\n",)
# A frame starts with a magic so that a reader can find the next frame after damaged bytes.
# As a version 1 length (u32 LE) it would be 2.7 GB, which no version 1 frame ever was.
FRAME_MAGIC = b"HJ2\xa5"
_FRAME = struct.Struct("<4sII")  # magic, payload length, crc32 of payload
_FRAME_V1 = struct.Struct("<II")  # payload length, crc32 of payload
# Each body in a segment is preceded by its own Enqueue record, so that the segments alone can
# rebuild what a damaged journal or checkpoint lost.
ENTRY_MAGIC = b"HS2\xa5"
_ENTRY = struct.Struct("<4sII")  # magic, envelope length, crc32 of envelope
_CHECKPOINT_CHUNK = 4096


class Enqueue(msgspec.Struct, tag=1, array_like=True, gc=False):
    """A message accepted into the spool: its envelope and where its body lies."""

    qid: str
    segment: int
    offset: int
    length: int
    crc: int
    arrival: float
    sender: str
    recipients: tuple[str, ...]
    message_id: str = ""
    client: str = ""
    is_dsn: bool = False


class Defer(msgspec.Struct, tag=2, array_like=True, gc=False):
    """Some recipients failed temporarily: how often, and when to try next (wall clock)."""

    qid: str
    rcpts: tuple[int, ...]
    attempts: int
    next_attempt: float


class Done(msgspec.Struct, tag=3, array_like=True, gc=False):
    """Some recipients are finished: delivered, bounced or expired."""

    qid: str
    rcpts: tuple[int, ...]


class CheckpointEnd(msgspec.Struct, tag=4, array_like=True, gc=False):
    """The last record of a checkpoint: how many messages it holds, and the position in the
    segments where the next body was to be written when it was taken (every message before it
    is in the checkpoint, in a later journal, or finished)."""

    messages: int
    segment: int
    offset: int


Record = Enqueue | Defer | Done | CheckpointEnd
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Record])
_entry_decoder = msgspec.msgpack.Decoder(Enqueue)


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


class LiveMessage(msgspec.Struct, gc=False):
    """A message with recipients still to finish, and their retry state.

    Not tracked by the cyclic garbage collector (it never takes part in a cycle), so that a
    queue of a million messages costs the collector nothing.
    """

    rec: Enqueue
    # Set by the I/O thread once the Enqueue record is on disk; checkpoints take only these.
    durable: bool = False
    done: set[int] | None = None
    # Recipient index -> (attempts so far, next attempt as wall-clock time).
    retry: dict[int, tuple[int, float]] | None = None

    @property
    def pending(self) -> list[int]:
        """Indices of the recipients not yet finished."""
        done = self.done or ()
        return [i for i in range(len(self.rec.recipients)) if i not in done]

    def finish(self, rcpts: tuple[int, ...] | list[int]) -> bool:
        """Mark recipients finished; return True when no recipient is left."""
        if self.done is None:
            self.done = set()
        self.done.update(rcpts)
        if self.retry:
            for index in rcpts:
                self.retry.pop(index, None)
        return len(self.done) >= len(self.rec.recipients)

    def defer(self, rcpts: tuple[int, ...] | list[int], attempts: int, when: float) -> None:
        """Record the retry state of unfinished recipients."""
        if self.retry is None:
            self.retry = {}
        for index in rcpts:
            if not self.done or index not in self.done:
                self.retry[index] = (attempts, when)


@dataclass(frozen=True, slots=True)
class RecoveryStats:
    """What a recovery found and how long it took."""

    messages: int
    recipients: int
    journal_files: int
    journal_bytes: int
    torn_frames: int
    missing_segments: int
    seconds: float


def _frame(records: Iterable[Record]) -> bytes:
    payload = _encoder.encode(list(records))
    return _FRAME.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _entry_head(rec: Enqueue) -> bytes:
    """The bytes written before a body in its segment: magic, length and CRC, the envelope.

    The envelope is the Enqueue record without its position (the reader knows where it found
    it), so that it does not depend on the offset it describes.
    """
    envelope = _encoder.encode(msgspec.structs.replace(rec, segment=0, offset=0))
    return _ENTRY.pack(ENTRY_MAGIC, len(envelope), zlib.crc32(envelope)) + envelope


@dataclass(frozen=True, slots=True)
class FrameScan:
    """What a journal or checkpoint file holds: its valid frames and its damaged bytes."""

    frames: list[tuple[int, list[Record]]]  # (offset, records), in file order
    damaged: list[tuple[int, int]]  # [start, end) spans holding no valid frame, torn tail aside
    torn: bool  # the file ends in an incomplete frame: a crash while it was being written
    version: int  # 2, or 1 for a file written by a version 1 spool


def scan_frames(data: bytes) -> FrameScan:
    """Every valid frame of a journal or checkpoint, skipping damaged bytes.

    Never raises. Bytes that are not a valid frame (no magic, a length past the end, a CRC-32
    or msgpack that does not check) are reported as damaged spans and the scan goes on at the
    next frame magic; records come only from frames whose CRC-32 matches. A file that does not
    start with the magic but reads as version 1 frames is a version 1 file.
    """
    if data[:4] != FRAME_MAGIC:
        old = _scan_frames_v1(data)
        if old.frames:
            return old
    frames: list[tuple[int, list[Record]]] = []
    damaged: list[tuple[int, int]] = []
    view = memoryview(data)
    pos, end = 0, len(data)
    bad: int | None = None
    while pos < end:
        records = _frame_at(data, view, pos)
        if records is not None:
            if bad is not None:
                damaged.append((bad, pos))
                bad = None
            frames.append((pos, records))
            pos += _FRAME.size + _FRAME.unpack_from(data, pos)[1]
            continue
        if bad is None:
            bad = pos
        found = data.find(FRAME_MAGIC, pos + 1)
        pos = found if found >= 0 else end
    torn = bad is not None and _incomplete(data, bad)
    if bad is not None and not torn:
        damaged.append((bad, end))
    return FrameScan(frames, damaged, torn, 2)


def _frame_at(data: bytes, view: memoryview, pos: int) -> list[Record] | None:
    if pos + _FRAME.size > len(data) or data[pos : pos + 4] != FRAME_MAGIC:
        return None
    _, length, crc = _FRAME.unpack_from(data, pos)
    start = pos + _FRAME.size
    if start + length > len(data) or zlib.crc32(view[start : start + length]) != crc:
        return None
    try:
        return _decoder.decode(view[start : start + length])
    except msgspec.DecodeError:
        return None


def _incomplete(data: bytes, pos: int) -> bool:
    """Whether the bytes from ``pos`` to the end are the start of a frame cut short."""
    rest = data[pos:]
    if len(rest) < _FRAME.size:
        return FRAME_MAGIC.startswith(rest[:4])
    _, length, _ = _FRAME.unpack_from(rest)
    return rest[:4] == FRAME_MAGIC and _FRAME.size + length > len(rest)


def _scan_frames_v1(data: bytes) -> FrameScan:
    """Version 1 frames had no magic: the first bad frame ends what can be read."""
    frames: list[tuple[int, list[Record]]] = []
    view = memoryview(data)
    pos, end = 0, len(data)
    while pos + _FRAME_V1.size <= end:
        length, crc = _FRAME_V1.unpack_from(data, pos)
        start = pos + _FRAME_V1.size
        if start + length > end:
            return FrameScan(frames, [], True, 1)
        if zlib.crc32(view[start : start + length]) != crc:
            break
        try:
            frames.append((pos, _decoder.decode(view[start : start + length])))
        except msgspec.DecodeError:
            break
        pos = start + length
    if pos == end:
        return FrameScan(frames, [], False, 1)
    if end - pos < _FRAME_V1.size:
        return FrameScan(frames, [], True, 1)
    return FrameScan(frames, [(pos, end)], False, 1)


@dataclass(frozen=True, slots=True)
class SegmentEntry:
    """A message found in a segment: its envelope, and whether its body passes its CRC."""

    rec: Enqueue
    intact: bool


def scan_entries(
    data: bytes, segment: int, base: int = 0
) -> tuple[list[SegmentEntry], list[tuple[int, int]]]:
    """The messages in ``data``, bytes of segment ``segment`` read from file offset ``base``.

    Never raises. Returns the entries whose envelope checks (with their position filled in)
    and the damaged spans (file offsets) where none could be read; like :func:`scan_frames`
    it goes on at the next entry magic. An entry whose body runs past ``data`` is returned
    with ``intact`` False.
    """
    entries: list[SegmentEntry] = []
    damaged: list[tuple[int, int]] = []
    view = memoryview(data)
    pos, end = 0, len(data)
    bad: int | None = None
    while pos < end:
        rec = _envelope_at(data, view, pos)
        if rec is not None:
            if bad is not None:
                damaged.append((base + bad, base + pos))
                bad = None
            start = pos + _ENTRY.size + _ENTRY.unpack_from(data, pos)[1]
            stop = start + rec.length
            intact = stop <= end and zlib.crc32(view[start:stop]) == rec.crc
            rec = msgspec.structs.replace(rec, segment=segment, offset=base + start)
            entries.append(SegmentEntry(rec, intact))
            pos = min(stop, end)
            continue
        if bad is None:
            bad = pos
        found = data.find(ENTRY_MAGIC, pos + 1)
        pos = found if found >= 0 else end
    if bad is not None:
        damaged.append((base + bad, base + end))
    return entries, damaged


def _envelope_at(data: bytes, view: memoryview, pos: int) -> Enqueue | None:
    if pos + _ENTRY.size > len(data) or data[pos : pos + 4] != ENTRY_MAGIC:
        return None
    _, length, crc = _ENTRY.unpack_from(data, pos)
    start = pos + _ENTRY.size
    if start + length > len(data) or zlib.crc32(view[start : start + length]) != crc:
        return None
    try:
        return _entry_decoder.decode(view[start : start + length])
    except msgspec.DecodeError:
        return None


def _numbered(directory: Path, suffix: str) -> list[int]:
    numbers = []
    for entry in directory.iterdir():
        if entry.name.endswith(suffix) and entry.name[: -len(suffix)].isdigit():
            numbers.append(int(entry.name[: -len(suffix)]))
    return sorted(numbers)


class _Batch:
    """One group commit in the making: bodies, records and who waits for them."""

    __slots__ = ("appended", "bodies", "messages", "records", "segment_deletes", "syncs")

    def __init__(self) -> None:
        self.bodies: list[tuple[int, bytes, bytes]] = []  # segment, entry head, body
        self.messages: list[LiveMessage] = []
        self.records: list[Record] = []
        self.appended: list[asyncio.Future[None]] = []  # one per message, in order
        self.syncs: list[asyncio.Future[None]] = []
        self.segment_deletes: list[int] = []

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
    ) -> None:
        self.path = path
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
        self.on_commit: Callable[[int, float], None] | None = None
        # The fencing check (``hamta.epoch_token.EpochGuard.check``): the reason this spool
        # belongs to a newer term, or None. Run before and after every write, in the I/O thread.
        self.guard: Callable[[], str | None] | None = None
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
            if found is not None and found not in (FORMAT_VERSION, *_OLD_VERSIONS):
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
        existing_journals = _numbered(self.journal_dir, ".jnl") + _numbered(
            self.journal_dir, ".ckpt"
        )
        existing_segments = _numbered(self.data_dir, ".seg")
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
            sender=sender,
            recipients=tuple(recipients),
            message_id=message_id,
            client=client,
            is_dsn=is_dsn,
        )
        try:
            head = _entry_head(rec)
        except (msgspec.EncodeError, ValueError, TypeError, OverflowError) as exc:
            # Fails this message alone (a 451 to its session), never the batch it would join.
            raise SpoolError(f"envelope cannot be encoded: {exc}") from None
        if self._offset and self._offset + len(head) + len(body) > self._segment_size:
            self._next_segment()
        rec = msgspec.structs.replace(rec, segment=self._segment, offset=self._offset + len(head))
        self._offset += len(head) + len(body)
        message = LiveMessage(rec)
        # Known to the spool at once, so that a checkpoint or a segment retirement running
        # while the commit is under way accounts for it.
        self.live[rec.qid] = message
        self._refs[rec.segment] = self._refs.get(rec.segment, 0) + 1
        batch = self._batch
        batch.bodies.append((rec.segment, head, body))
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
        if self.live.pop(message.rec.qid, None) is None:
            return
        segment = message.rec.segment
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
        self._batch.records.append(Done(message.rec.qid, tuple(rcpts)))
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
        self._batch.records.append(Defer(message.rec.qid, tuple(rcpts), attempts, next_attempt))
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
                            and time.monotonic() >= self._checkpoint_retry_at
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

    def _write_batch(self, batch: _Batch) -> None:
        """In the I/O thread: bodies, fdatasync, journal frame, fdatasync, then deletions.

        The fencing check runs before the first write and again after the last fdatasync: a
        batch is acknowledged only if this term owned the spool all along. One that lost it
        in between is written but not acknowledged (the client retries; a duplicate at worst).
        """
        self._check_fence()
        touched: list[tuple[int, int]] = []  # (fd, length before) for rollback
        try:
            if batch.bodies:
                by_segment: dict[int, list[bytes]] = {}
                for segment, head, body in batch.bodies:
                    by_segment.setdefault(segment, []).extend((head, body))
                for segment, bodies in by_segment.items():
                    fd = self._segment_fd(segment)
                    touched.append((fd, os.fstat(fd).st_size))
                    write_all(fd, b"".join(bodies))
                for segment in by_segment:
                    os.fdatasync(self._seg_fds[segment])
                    self.fsyncs += 1
            if batch.records:
                frame = _frame(batch.records)
                fd = self._journal_fd()
                touched.append((fd, os.fstat(fd).st_size))
                write_all(fd, frame)
                os.fdatasync(fd)
                self.fsyncs += 1
                self._journal_bytes_since_ckpt += len(frame)
            for message in batch.messages:
                message.durable = True
        except Exception:
            for fd, size in touched:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
            raise
        self._check_fence()
        for segment in batch.segment_deletes:
            self._delete_segment(segment)

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

    def _segment_fd(self, segment: int) -> int:
        fd = self._seg_fds.get(segment)
        if fd is None:
            fd = os.open(
                self.data_dir / f"{segment:08d}.seg", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600
            )
            fsync_directory(self.data_dir)
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
        what was recovered (the earlier runs' messages only).
        """
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(
            None, load_state, self.path, self._first_journal, self._first_segment
        )
        for segment in state.unreferenced_segments:
            self._delete_segment(segment)
        for message in state.live.values():
            message.durable = True
            segment = message.rec.segment
            self._refs[segment] = self._refs.get(segment, 0) + 1
        # Older messages first in the table, then those accepted while recovering.
        merged = dict(state.live)
        merged.update(self.live)
        self.live = merged
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
            frames: list[bytes] = []
            count = 0
            for start in range(0, len(qids), _CHECKPOINT_CHUNK):
                records: list[Record] = []
                for qid in qids[start : start + _CHECKPOINT_CHUNK]:
                    message = self.live.get(qid)
                    if message is None or not message.durable:
                        continue
                    records.append(message.rec)
                    count += 1
                    if message.done:
                        records.append(Done(qid, tuple(sorted(message.done))))
                    for index, (attempts, when) in (message.retry or {}).items():
                        records.append(Defer(qid, (index,), attempts, when))
                frames.append(_frame(records))
                await asyncio.sleep(0)  # let sessions run between chunks
            # Its absence tells recovery that the checkpoint lost frames at its end.
            frames.append(_frame([CheckpointEnd(count, *high_water)]))
            stale = [
                p
                for p in self.journal_dir.iterdir()
                if p.suffix in (".jnl", ".ckpt") and p.stem.isdigit() and int(p.stem) <= cut
            ]
            await loop.run_in_executor(self._io, self._write_checkpoint, cut, frames, stale)
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

    def _checkpoint_done(self, error: str | None) -> None:
        self.checkpoint_error = error
        if error is not None:
            self._checkpoint_retry_at = time.monotonic() + self._checkpoint_retry
        if self._on_checkpoint is not None:
            self._on_checkpoint(error)

    def _rotate_journal(self) -> None:
        if self._jnl_fd is not None:
            os.close(self._jnl_fd)
            self._jnl_fd = None
        self._journal += 1
        self._journal_bytes_since_ckpt = 0

    def _write_checkpoint(self, cut: int, frames: list[bytes], stale: list[Path]) -> None:
        self._check_fence()
        final = self.journal_dir / f"{cut:08d}.ckpt"
        tmp = final.with_suffix(".tmp")
        write_synced(tmp, frames)
        # The rename and the deletions replace journals a newer term may be recovering from.
        self._check_fence()
        os.rename(tmp, final)
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


@dataclass(frozen=True, slots=True)
class Damage:
    """What recovery found damaged, and what that cost, by queue id."""

    # Messages put back from their segment because no intact journal or checkpoint record
    # named them (a damaged or truncated journal or checkpoint, or a crash before their 250).
    rebuilt: tuple[str, ...] = ()
    # Messages whose own bytes are unreadable (body CRC, or their segment is gone).
    lost: tuple[str, ...] = ()
    damaged_frames: int = 0  # spans of journal or checkpoint bytes that hold no valid frame
    damaged_entries: int = 0  # spans of segment bytes that hold no valid message
    files: tuple[str, ...] = ()  # spool files with damaged bytes, relative to the spool
    kept: tuple[str, ...] = ()  # where they were kept aside for an operator (damaged/...)

    def __bool__(self) -> bool:
        return bool(self.rebuilt or self.lost or self.damaged_frames or self.damaged_entries)


@dataclass(slots=True)
class SpoolState:
    """What the journals of a spool say is still to be done."""

    live: dict[str, LiveMessage]
    unreferenced_segments: list[int]
    stats: RecoveryStats
    damage: Damage = Damage()


_Pos = tuple[int, int]  # (segment, offset): a place in the segments, in the order written


def load_state(
    path: Path, before_journal: int | None = None, before_segment: int | None = None
) -> SpoolState:
    """Read the live state from a spool's checkpoint and journals, and repair what is damaged.

    Only journals numbered below ``before_journal`` and segments below ``before_segment`` are
    considered (those of earlier runs, when a relay is running on the spool). Damaged frames
    are skipped; the messages whose Enqueue they may have held are rebuilt from the segments
    (each body carries its envelope). Bodies are read only there: in the gaps the journals
    leave (normally a few bytes where one run's journal ends and the next begins).

    The caller that owns the spool (``before_journal`` given) also gets damaged files linked
    into ``damaged/`` for an operator; an offline reader (``hamta queue``, ``hamta spool
    check``) changes nothing.
    """
    started = time.perf_counter()
    journal_dir, data_dir = path / "journal", path / "data"
    limit = before_journal if before_journal is not None else 1 << 62
    journals = [n for n in _numbered(journal_dir, ".jnl") if n < limit]
    checkpoints = [n for n in _numbered(journal_dir, ".ckpt") if n < limit]
    base = checkpoints[-1] if checkpoints else 0
    sources = [journal_dir / f"{base:08d}.ckpt"] if checkpoints else []
    sources += [journal_dir / f"{n:08d}.jnl" for n in journals if n > base]
    live: dict[str, LiveMessage] = {}
    seen: set[str] = set()  # every qid an intact Enqueue named, finished or not
    orphans: dict[str, list[Record]] = {}  # Done and Defer records for qids not (yet) known
    # Stretches of the segments that may hold messages no intact record names. One is open
    # (``gap``) from the start, after damage and at each file boundary; the next intact
    # Enqueue of a journal closes it. Journals name bodies in the order they were written.
    gaps: list[tuple[_Pos, _Pos | None]] = []
    gap: _Pos | None = (0, 0)
    last: _Pos = (0, 0)
    damaged_files: list[Path] = []
    torn = total_bytes = damaged_frames = 0
    for source in sources:
        data = source.read_bytes()
        total_bytes += len(data)
        scan = scan_frames(data)
        torn += scan.torn
        damaged_frames += len(scan.damaged)
        spans = iter(scan.damaged)
        span = next(spans, None)
        is_checkpoint = source.suffix == ".ckpt"
        end: CheckpointEnd | None = None
        enqueued = 0
        ckpt_last: _Pos = (0, 0)
        for offset, records in scan.frames:
            while span is not None and span[0] < offset:
                gap = gap or last
                span = next(spans, None)
            for rec in records:
                if type(rec) is Enqueue:
                    seen.add(rec.qid)
                    enqueued += 1
                    if is_checkpoint:
                        ckpt_last = max(ckpt_last, (rec.segment, rec.offset + rec.length))
                        continue
                    if gap is not None:
                        gaps.append((gap, (rec.segment, rec.offset)))
                        gap = None
                    last = max(last, (rec.segment, rec.offset + rec.length))
                elif type(rec) is CheckpointEnd:
                    end = rec
            _apply(live, records, orphans)
        if is_checkpoint:
            if scan.version == 1:  # no CheckpointEnd then: trust it as version 1 did
                gap, last = None, ckpt_last
            elif end is not None and end.messages == enqueued and not scan.damaged:
                gap = last = (end.segment, end.offset)
            elif not scan.damaged:  # frames lost at its end: truncated
                damaged_frames += 1
        if scan.damaged or (is_checkpoint and scan.version == 2 and gap == (0, 0)):
            damaged_files.append(source)
        gap = gap or last
    if gap is not None:
        gaps.append((gap, None))
    seg_limit = before_segment if before_segment is not None else 1 << 62
    segments = {n for n in _numbered(data_dir, ".seg") if n < seg_limit}
    lost = [qid for qid, m in live.items() if m.rec.segment not in segments]
    for qid in lost:
        del live[qid]
    missing = len(lost)
    found = _rebuild(data_dir, sorted(segments), gaps, seen)
    rebuilt: list[str] = []
    for rec in found.rebuilt:
        message = LiveMessage(rec)
        live[rec.qid] = message
        _apply(live, orphans.get(rec.qid, []), None)
        if rec.qid in live:
            rebuilt.append(rec.qid)
    lost += found.lost
    damaged_files += [data_dir / f"{n:08d}.seg" for n in found.damaged_segments]
    damage = Damage(
        rebuilt=tuple(rebuilt),
        lost=tuple(lost),
        damaged_frames=damaged_frames,
        damaged_entries=found.damaged_entries,
        files=tuple(str(p.relative_to(path)) for p in damaged_files),
    )
    if damage and before_journal is not None:
        damage = dataclasses.replace(damage, kept=tuple(_keep_aside(path, damaged_files)))
    referenced = {m.rec.segment for m in live.values()}
    return SpoolState(
        live=live,
        # While anything is damaged, no segment goes: one may hold what a damaged record named.
        unreferenced_segments=[] if damage else sorted(segments - referenced),
        stats=RecoveryStats(
            messages=len(live),
            recipients=sum(len(m.rec.recipients) - len(m.done or ()) for m in live.values()),
            journal_files=len(sources),
            journal_bytes=total_bytes,
            torn_frames=torn,
            missing_segments=missing,
            seconds=time.perf_counter() - started,
        ),
        damage=damage,
    )


@dataclass(slots=True)
class _Found:
    rebuilt: list[Enqueue]
    lost: list[str]
    damaged_entries: int
    damaged_segments: list[int]


def _rebuild(data_dir: Path, segments: list[int], gaps: list[tuple[_Pos, _Pos | None]],
             seen: set[str]) -> _Found:  # fmt: skip
    """The messages in the gaps of the segments that no intact record named."""
    found = _Found([], [], 0, [])
    for start, stop in gaps:
        if stop is not None and stop <= start:
            continue
        for segment in segments:
            if segment < start[0] or (stop is not None and segment > stop[0]):
                continue
            low = start[1] if segment == start[0] else 0
            high = stop[1] if stop is not None and segment == stop[0] else None
            try:
                with open(data_dir / f"{segment:08d}.seg", "rb") as handle:
                    legacy = handle.read(4) != ENTRY_MAGIC
                    handle.seek(low)
                    data = handle.read(-1 if high is None else max(0, high - low))
            except OSError:
                continue
            entries, damaged = scan_entries(data, segment, low)
            if legacy and not entries:
                continue  # a version 1 segment: bodies only, nothing to rebuild from
            lost = len(found.lost)
            for entry in entries:
                if entry.rec.qid in seen:
                    continue
                seen.add(entry.rec.qid)
                if entry.intact:
                    found.rebuilt.append(entry.rec)
                else:
                    found.lost.append(entry.rec.qid)
            if damaged or len(found.lost) > lost:
                found.damaged_entries += len(damaged)
                if segment not in found.damaged_segments:
                    found.damaged_segments.append(segment)
    return found


def _keep_aside(path: Path, files: list[Path]) -> list[str]:
    """Link damaged files into ``damaged/`` (same volume: no copy, and they outlive deletion).

    The spool never rewrites a journal, checkpoint or segment in place, so a link keeps the
    bytes as found.
    """
    directory = path / "damaged"
    directory.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = []
    for source in files:
        target = directory / f"{stamp}-{source.parent.name}-{source.name}"
        with contextlib.suppress(FileExistsError):
            try:
                os.link(source, target)
            except OSError:
                continue
        kept.append(str(target.relative_to(path)))
    if kept:
        fsync_directory(directory)
    return kept


def _apply(
    live: dict[str, LiveMessage],
    records: list[Record],
    orphans: dict[str, list[Record]] | None,
) -> None:
    for rec in records:
        if type(rec) is Enqueue:
            if rec.qid not in live:
                live[rec.qid] = LiveMessage(rec)
            continue
        if isinstance(rec, CheckpointEnd):
            continue
        message = live.get(rec.qid)
        if message is None:
            if orphans is not None:  # its Enqueue may be rebuilt from a segment
                orphans.setdefault(rec.qid, []).append(rec)
            continue
        if type(rec) is Done:
            if message.finish(rec.rcpts):
                del live[rec.qid]
        elif type(rec) is Defer:
            message.defer(rec.rcpts, rec.attempts, rec.next_attempt)
