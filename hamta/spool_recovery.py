"""Recovery: the live state rebuilt from a spool's checkpoint, journals and, where damage
left gaps, its segments; damaged files kept aside for an operator.

Run by ``Spool.recover`` in a thread while the relay already listens, and offline by ``hamta
queue`` and ``hamta spool check`` (which change nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import mmap
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from hamta.durable_files import fsync_directory
from hamta.spool_format import (
    ENTRY_MAGIC,
    CheckpointEnd,
    Defer,
    Done,
    Enqueue,
    FrameScanner,
    Record,
    numbered,
    scan_entries,
)

_envelope_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Enqueue)


class LiveMessage(msgspec.Struct, gc=False):
    """A message with recipients still to finish, and their retry state: what a deep queue
    holds per message, so kept small.

    The envelope (sender, recipients, message id, client, where the body lies) is held as the
    journal holds it, its Enqueue record's msgpack bytes (about 115 bytes for two recipients,
    against about 600 as Python objects), and decoded by :attr:`rec` when a delivery, a DSN or
    a listing needs it. Checkpoints write those bytes back as they are. Not tracked by the
    cyclic garbage collector (it never takes part in a cycle), so that a queue of a million
    messages costs the collector nothing.
    """

    qid: str
    envelope: bytes
    segment: int
    # Which recipients are finished: bit i for recipient i (delivered, bounced or expired),
    # and above them bit n, n the number of recipients, always set, so that the count is
    # known without decoding the envelope. An int costs nothing for the usual few recipients
    # (small ints are shared); the set it replaces cost 216 bytes.
    marks: int
    # Set by the I/O thread once the Enqueue record is on disk; checkpoints take only these.
    durable: bool = False
    # Recipient index -> (attempts so far, next attempt as wall-clock time).
    retry: dict[int, tuple[int, float]] | None = None

    @classmethod
    def of(cls, rec: Enqueue, envelope: bytes | None = None) -> LiveMessage:
        """The live message of an Enqueue record, nothing finished yet; ``envelope`` is the
        record's msgpack bytes when the caller has them (recovery: as the file holds them)."""
        if envelope is None:
            envelope = _envelope_encoder.encode(rec)
        return cls(rec.qid, envelope, rec.segment, 1 << len(rec.recipients))

    @property
    def rec(self) -> Enqueue:
        """The message's Enqueue record, decoded from its envelope (a new object each time)."""
        return _envelope_decoder.decode(self.envelope)

    @property
    def recipient_count(self) -> int:
        """How many recipients the message has, finished or not."""
        return self.marks.bit_length() - 1

    @property
    def left(self) -> int:
        """How many recipients are not finished yet."""
        return self.marks.bit_length() - self.marks.bit_count()

    @property
    def untouched(self) -> bool:
        """No recipient finished nor deferred yet (most of a deep queue)."""
        return self.retry is None and self.marks.bit_count() == 1

    @property
    def finished(self) -> list[int]:
        """Indices of the recipients finished (delivered, bounced or expired)."""
        marks = self.marks
        return [i for i in range(self.recipient_count) if marks >> i & 1]

    @property
    def pending(self) -> list[int]:
        """Indices of the recipients not yet finished."""
        marks = self.marks
        return [i for i in range(self.recipient_count) if not marks >> i & 1]

    def finish(self, rcpts: tuple[int, ...] | list[int]) -> bool:
        """Mark recipients finished; return True when no recipient is left."""
        count = self.recipient_count
        for index in rcpts:
            if 0 <= index < count:  # an index no recipient has changes nothing
                self.marks |= 1 << index
        if self.retry:
            for index in rcpts:
                self.retry.pop(index, None)
        return self.left == 0

    def defer(self, rcpts: tuple[int, ...] | list[int], attempts: int, when: float) -> None:
        """Record the retry state of unfinished recipients."""
        if self.retry is None:
            self.retry = {}
        state = (attempts, when)  # one tuple for the recipients deferred together
        for index in rcpts:
            if not self.marks >> index & 1:
                self.retry[index] = state


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
    # The messages of live in its order (and others since finished, which the queue passes
    # over), and their recipients' keys one after another, as recovery found them with the
    # ``recipient_key`` it was given (None without): what the queue is built from without
    # decoding every envelope again. See take_queue.
    queue_order: list[LiveMessage] = field(default_factory=list)
    queue_keys: list[str] | None = None

    def take_queue(self) -> tuple[list[LiveMessage], list[str]]:
        """The messages to queue and their recipients' keys (``MailQueue.add_all``), handed
        over once: the state keeps nothing of them, so that they go once the queue is built
        (16 bytes or more a message at depth)."""
        if self.queue_keys is None:
            raise ValueError("recovered without recipient_key: nothing to queue from")
        taken = self.queue_order, self.queue_keys
        self.queue_order, self.queue_keys = [], []
        return taken


#: What the queue keys a recipient by (the relay's: its domain): given to recovery, so that
#: the queue's keys are found where the records are decoded, and the spool knows no domain.
RecipientKey = Callable[[str], str]

_Pos = tuple[int, int]  # (segment, offset): a place in the segments, in the order written


def load_state(
    path: Path,
    before_journal: int | None = None,
    before_segment: int | None = None,
    *,
    recipient_key: RecipientKey | None = None,
) -> SpoolState:
    """Read the live state from a spool's checkpoint and journals, and repair what is damaged.

    Only journals numbered below ``before_journal`` and segments below ``before_segment`` are
    considered (those of earlier runs, when a relay is running on the spool). Damaged frames
    are skipped; the messages whose Enqueue they may have held are rebuilt from the segments
    (each body carries its envelope). Bodies are read only there: in the gaps the journals
    leave (normally a few bytes where one run's journal ends and the next begins).

    The caller that owns the spool (``before_journal`` given) also gets damaged files linked
    into ``damaged/`` for an operator; an offline reader (``hamta queue``, ``hamta spool
    check``) changes nothing. With ``recipient_key``, the state also says what to queue
    (:meth:`SpoolState.take_queue`).
    """
    with _collector_paused():
        return _load_state(path, before_journal, before_segment, recipient_key)


def _load_state(
    path: Path,
    before_journal: int | None,
    before_segment: int | None,
    recipient_key: RecipientKey | None,
) -> SpoolState:
    started = time.perf_counter()
    journal_dir, data_dir = path / "journal", path / "data"
    limit = before_journal if before_journal is not None else 1 << 62
    journals = [n for n in numbered(journal_dir, ".jnl") if n < limit]
    checkpoints = [n for n in numbered(journal_dir, ".ckpt") if n < limit]
    base = checkpoints[-1] if checkpoints else 0
    sources = [journal_dir / f"{base:08d}.ckpt"] if checkpoints else []
    sources += [journal_dir / f"{n:08d}.jnl" for n in journals if n > base]
    replay = _Replay(recipient_key)
    live = replay.live
    # Stretches of the segments that may hold messages no intact record names. One is open
    # (``gap``) from the start, after damage and at each file boundary; the next intact
    # Enqueue of a journal closes it. Journals name bodies in the order they were written.
    gaps: list[tuple[_Pos, _Pos | None]] = []
    gap: _Pos | None = (0, 0)
    last: _Pos = (0, 0)
    damaged_files: list[Path] = []
    torn = total_bytes = damaged_frames = 0
    for source in sources:
        with _mapped(source) as data:
            total_bytes += len(data)
            # With each frame's records, their own bytes: the envelopes kept as read.
            scan = FrameScanner(data, raw=True)
            spans = 0  # damaged spans of scan.damaged already accounted
            is_checkpoint = source.suffix == ".ckpt"
            end: CheckpointEnd | None = None
            enqueued = 0
            ckpt_last: _Pos = (0, 0)
            released = 0
            for offset, records, raws in scan:
                while spans < len(scan.damaged) and scan.damaged[spans][0] < offset:
                    gap = gap or last
                    spans += 1
                # Where the bodies lie matters for a journal's gaps and for a version 1
                # checkpoint's end; a version 2 checkpoint says where it ends (CheckpointEnd).
                if not is_checkpoint or scan.version == 1:
                    for rec in records:
                        if type(rec) is not Enqueue:
                            continue
                        if is_checkpoint:
                            ckpt_last = max(ckpt_last, (rec.segment, rec.offset + rec.length))
                            continue
                        if gap is not None:
                            gaps.append((gap, (rec.segment, rec.offset)))
                            gap = None
                        last = max(last, (rec.segment, rec.offset + rec.length))
                elif records and type(records[-1]) is CheckpointEnd:
                    end = records[-1]  # written alone, in the checkpoint's last frame
                enqueued += replay.apply(records, raws)
                released = _release(data, offset, released)
        torn += scan.torn
        damaged_frames += len(scan.damaged)
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
    segments = {n for n in numbered(data_dir, ".seg") if n < seg_limit}
    referenced = {m.segment for m in live.values()}
    gone = replay.gone
    lost: list[str] = []
    if not referenced <= segments:
        lost = [qid for qid, m in live.items() if m.segment not in segments]
        for qid in lost:
            del live[qid]
        gone.update(lost)
        referenced &= segments
    missing = len(lost)
    found = _rebuild(data_dir, sorted(segments), gaps, lambda qid: qid in live or qid in gone)
    rebuilt: list[str] = []
    for rec in found.rebuilt:
        replay.apply([rec])
        replay.apply(replay.orphans.get(rec.qid, []), orphans=False)
        if rec.qid in live:
            rebuilt.append(rec.qid)
            referenced.add(rec.segment)
    if lost:
        replay.drop_gone()
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
    return SpoolState(
        live=live,
        # While anything is damaged, no segment goes: one may hold what a damaged record named.
        unreferenced_segments=[] if damage else sorted(segments - referenced),
        stats=RecoveryStats(
            messages=len(live),
            recipients=sum(m.left for m in live.values()),
            journal_files=len(sources),
            journal_bytes=total_bytes,
            torn_frames=torn,
            missing_segments=missing,
            seconds=time.perf_counter() - started,
        ),
        damage=damage,
        queue_order=replay.order,
        queue_keys=replay.keys if recipient_key is not None else None,
    )


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while recovery runs, and back as it was after.

    Recovery makes millions of short-lived containers (each record's tuple of recipients),
    and every few thousand that outlive a young collection push the collector into a full
    one, which walks the live table, the queue order and its keys (millions of entries by
    the end): about a tenth of a million messages' recovery. Nothing recovery makes is part
    of a cycle. The collector is the process's: the event loop's cycles, if any, wait the
    few seconds until it is back.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(slots=True)
class _Found:
    rebuilt: list[Enqueue]
    lost: list[str]
    damaged_entries: int
    damaged_segments: list[int]


def _rebuild(
    data_dir: Path,
    segments: list[int],
    gaps: list[tuple[_Pos, _Pos | None]],
    named: Callable[[str], bool],
) -> _Found:
    """The messages in the gaps of the segments that no intact record named."""
    found = _Found([], [], 0, [])
    seen: set[str] = set()  # those found here: a message is rebuilt once
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
                if entry.rec.qid in seen or named(entry.rec.qid):
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


class _Replay:
    """The live table as records are replayed onto it, and what the queue is built from."""

    def __init__(self, recipient_key: RecipientKey | None) -> None:
        self.live: dict[str, LiveMessage] = {}
        # Every qid an intact Enqueue named is in live, or in gone once finished (or its
        # segment is missing): no set of every qid beside the table, a million at depth.
        self.gone: set[str] = set()
        # Done and Defer records for qids not (yet) known: their Enqueue may be rebuilt.
        self.orphans: dict[str, list[Record]] = {}
        # Each message put in live, in that order, and its recipients' keys one after another
        # (SpoolState.take_queue): found here, where the records are decoded anyway.
        self.order: list[LiveMessage] = []
        self.keys: list[str] = []
        self._recipient_key = recipient_key

    def apply(
        self, records: list[Record], raws: list[msgspec.Raw] | None = None, orphans: bool = True
    ) -> int:
        """Replay ``records`` (with ``raws``, their bytes as read, for the envelopes); keep
        Done and Defer records of unknown qids with ``orphans``. Return how many were Enqueue
        records."""
        live, order = self.live, self.order
        addresses: list[str] = []
        enqueued = 0
        for index, rec in enumerate(records):
            if type(rec) is Enqueue:
                enqueued += 1
                # A copy of the record's bytes: the same bytes LiveMessage.of would encode
                # (the journal's encoder wrote them), without encoding a million records.
                added = LiveMessage.of(rec, bytes(raws[index]) if raws else None)
                # One look-up in a table of a million; an Enqueue seen before (a checkpoint
                # and the journal after it can both hold it) keeps the message it made.
                if live.setdefault(rec.qid, added) is added:
                    order.append(added)
                    addresses += rec.recipients
                continue
            if isinstance(rec, CheckpointEnd):
                continue
            message = live.get(rec.qid)
            if message is None:
                if orphans:
                    self.orphans.setdefault(rec.qid, []).append(rec)
                continue
            if type(rec) is Done:
                if message.finish(rec.rcpts):
                    del live[rec.qid]
                    self.gone.add(rec.qid)
            elif type(rec) is Defer:
                message.defer(rec.rcpts, rec.attempts, rec.next_attempt)
        if addresses and self._recipient_key is not None:
            self.keys += map(self._recipient_key, addresses)  # a frame's at once
        return enqueued

    def drop_gone(self) -> None:
        """Keep in ``order`` (and ``keys``) only the messages still live: after some were
        taken out of live for a reason other than being finished (their segment is gone)."""
        order: list[LiveMessage] = []
        keys: list[str] = []
        start = 0
        for message in self.order:
            stop = start + message.recipient_count
            if self.live.get(message.qid) is message:
                order.append(message)
                keys += self.keys[start:stop]
            start = stop
        self.order, self.keys = order, keys


# Bytes of a journal read between two releases of its pages (see _release).
_RELEASE_STEP = 8 * 1024 * 1024


@contextlib.contextmanager
def _mapped(source: Path) -> Iterator[mmap.mmap | bytes]:
    """A journal or checkpoint file's bytes, mapped rather than read whole, so that recovery
    holds a few megabytes of it at a time (with :func:`_release`), not a 100 MiB file."""
    with open(source, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            yield b""  # an empty file cannot be mapped
            return
        data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            yield data
        finally:
            # A scan left unfinished by an exception may still export the buffer: the mapping
            # then goes with its last reference instead.
            with contextlib.suppress(BufferError):
                data.close()


def _release(data: mmap.mmap | bytes, offset: int, released: int) -> int:
    """Drop the pages of ``data`` before ``offset`` from the process's memory, every
    _RELEASE_STEP bytes; return the offset released up to.

    A scan reads forwards, so those pages are done with; should one be read again, the kernel
    reads it back from the file (the mapping is read-only and file-backed).
    """
    if not isinstance(data, mmap.mmap) or offset - released < _RELEASE_STEP:
        return released
    upto = offset - offset % mmap.PAGESIZE
    data.madvise(mmap.MADV_DONTNEED, 0, upto)
    return upto
